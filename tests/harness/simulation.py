"""The simulation: stand-ins of the stages (tests/harness/simulated.py) on N logical GPUs, in the
layout and allocation the planner picks and in one pool per stage with equal shares, measured
side by side against the planner's prediction.

Each model is replaced by a stand-in that takes the profiled time per image of a time-sliced
logical GPU and passes tensors of the real sizes, through the same Ray Data streaming chain of
actor pools. Times are scaled so that every run predicts RATE images/s (more on big clusters,
whose many rows in flight would otherwise take minutes to fill and drain), with enough images
to fill the pools DEPTH times over: the ratio measured/predicted does not depend on the scale,
and a 2-core machine can carry the traffic of full-size tensors at that rate.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from jobs.plan.costs import Profile
from jobs.plan.search import Plan, naive, plan

RATE = 5.0  # predicted images/s of every simulated run, after time scaling
SECONDS = 20.0  # steady-state length aimed at per run
DEPTH = 5  # images per run, at least this many times the rows the pools hold in flight


def simulate(profile: Profile, chosen: Plan, time_scale: float, images: int) -> dict:
    """Run `images` rows through stand-ins allocated as `chosen`; steady-state images/s."""
    import tempfile

    import ray
    from ray.data import DataContext

    from jobs.run.pools import map_pool, release, reserve
    from tests.harness.simulated import SimulatedPool, sink
    from workers.config import PoolConfig

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Few logical CPUs for the plain tasks (each is a process on this machine); the stand-in
    # actors take 0.1 each, so the CPUs never limit them.
    actors = sum(a.pool_size for a in chosen.pools.values())
    stages = [s for a in chosen.pools.values() for s in a.stages]
    ray.init(num_cpus=2 + int(0.1 * actors + 1), num_gpus=chosen.gpus, include_dashboard=False, log_to_driver=False)
    gpu_root = tempfile.mkdtemp(prefix="ifrender-gpus-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        DataContext.get_current().enable_progress_bars = False
        # The same pool layout as a render (jobs/run/pools.py): reserved shares, re-cut blocks.
        pools = {
            n: PoolConfig(pool_size=a.pool_size, batch_size=a.batch_size, num_gpus=a.num_gpus, num_cpus=0.1)
            for n, a in chosen.pools.items()
        }
        placed, reservations = reserve(pools, timeout_s=120)
        ds = ray.data.range(images, override_num_blocks=max(1, images // 2))
        ds = ds.map_batches(lambda b: {"id": b["id"]}, batch_size=None, num_cpus=1)
        rows = 2
        for name, pool in pools.items():
            ds, rows = map_pool(
                ds,
                SimulatedPool,
                pool,
                rows,
                placed.get(name),
                stages=list(chosen.pools[name].stages),
                seconds_per_image={s: profile.stages[s].seconds_per_image for s in stages},
                last_stage=stages[-1],
                gpu_root=gpu_root,
                time_scale=time_scale,
                efficiency=profile.timeslice_efficiency,
            )
        ds = ds.map_batches(sink, batch_size=None, num_cpus=1)
        started = time.time()
        columns = [f"{s}_{k}" for s in stages for k in ("started", "finished", "actor")]
        calls = {c: [] for c in columns}  # per image: each stage's call and the actor that made it
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for c in columns:
                calls[c].extend(batch[c].tolist())
        release(reservations)
    finally:
        ray.shutdown()
        shutil.rmtree(gpu_root, ignore_errors=True)
    shared = len(chosen.pools) > 1 and any(0 < a.num_gpus < 1 for a in chosen.pools.values())
    return measure(
        {c: np.array(v) for c, v in calls.items()}, [a.stages for a in chosen.pools.values()], started, shared
    )


def measure(calls: dict[str, np.ndarray], pools: list[tuple[str, ...]], started: float, shared: bool = False) -> dict:
    """Steady-state rates, busy fractions and gaps from every image's per-stage calls; `pools`
    holds each pool's stages in order; `shared`: some GPU holds actors of several pools."""
    stages = [s for members in pools for s in members]
    arrivals = np.sort(calls[f"{stages[-1]}_finished"] - started)  # from the actors' own clocks

    def window(stage: str) -> tuple[float, float, float]:
        """Where the time went: a stage's own rate between its 25% and 90% marks (past the fill,
        before the drain) and the window's ends. A call finishes its whole batch at once, so each
        mark is the end of a call, and the images counted are those after the first mark."""
        done = np.sort(calls[f"{stage}_finished"])
        lo, hi = int(0.25 * len(done)), int(0.9 * len(done)) - 1
        lo, hi = (int(np.searchsorted(done, done[i], side="right")) - 1 for i in (lo, hi))
        return (hi - lo) / (done[hi] - done[lo]), done[lo], done[hi]

    # The job's steady rate: per pool, each actor's images over its own span (from its first call's
    # start to its last call's end: it works, or waits for work, all that time, so the span holds
    # neither the fill before it started nor the time after it ran dry), summed over the pool's
    # actors; the slowest pool's sum. Many actors start one after another on a small machine,
    # and each is counted from its own start.
    pool_rates = {}
    for members in pools:
        first, last = members[0], members[-1]
        total = 0.0
        for actor in np.unique(calls[f"{last}_actor"]):
            mine = calls[f"{last}_actor"] == actor
            begun = calls[f"{first}_started"][calls[f"{first}_actor"] == actor].min()
            span = calls[f"{last}_finished"][mine].max() - begun
            total += np.count_nonzero(mine) / span if span > 0 else 0.0
        pool_rates["+".join(members)] = total
    steady = min(pool_rates.values())
    # Pools that time-slice a GPU do not reach a steady state in a run this short: the first ones
    # race ahead while the GPU is theirs, and each pool's span holds less than its share of the
    # GPU's work. Such a run is measured whole, its fill and drain included (a lower bound).
    whole = len(arrivals) / (calls[f"{stages[-1]}_finished"].max() - calls[f"{stages[0]}_started"].min())
    if shared:
        steady = whole
    windows = {stage: window(stage) for stage in stages}
    rates = {stage: w[0] for stage, w in windows.items()}
    slowest = min(pool_rates, key=pool_rates.get)
    _, t0, t1 = windows[slowest.split("+")[-1]]
    busy = {}  # per stage: each actor's busy fraction of the slowest stage's window, lowest first
    for stage in stages:
        spans = {}
        for actor, a, b in zip(calls[f"{stage}_actor"], calls[f"{stage}_started"], calls[f"{stage}_finished"]):
            spans.setdefault(actor, set()).add((a, b))
        busy[stage] = sorted(
            round(sum(max(0.0, min(b, t1) - max(a, t0)) for a, b in s) / (t1 - t0), 2) for s in spans.values()
        )
    return {
        "images": len(arrivals),
        "seconds": round(float(arrivals[-1]), 2),
        "steady_images_per_second": round(steady, 3),
        "measured_as": "whole run (pools time-slice a GPU)" if shared else "per-actor spans",
        "whole_run_images_per_second": round(float(whole), 3),
        "pool_images_per_second": {k: round(v, 3) for k, v in pool_rates.items()},
        "stage_images_per_second": {k: round(v, 3) for k, v in rates.items()},
        "measured_bottleneck": slowest,
        "busy_in_steady_state": busy,
        "mean_gap_seconds": {
            f"{p}->{n}": round(float(np.mean(calls[f"{n}_started"] - calls[f"{p}_finished"])), 3)
            for p, n in zip(stages, stages[1:])
        },
    }


def sweep(
    profile: Profile, gpu_counts: list[int], gpu_memory: float, images: int | None = None, naive_too: bool = True
) -> list[dict]:
    """Per N: the planner's pick and (with `naive_too`) one pool per stage with equal shares."""
    results = []
    for n in gpu_counts:
        runs = [("planned", plan(profile, n, gpu_memory))]
        if naive_too:
            runs.append(("naive", naive(profile, n, gpu_memory)))
        for kind, chosen in runs:
            # Enough images that the steady state is not just the pipeline filling (big clusters
            # hold many rows in flight); the rate stays low enough for this machine to carry.
            in_flight = sum(a.pool_size * a.batch_size for a in chosen.pools.values())
            rate = max(RATE, n / 4)  # a big cluster's many rows in flight, in a steady state this long
            count = images or max(int(rate * SECONDS / 0.65), DEPTH * in_flight)
            time_scale = chosen.images_per_second / rate  # predicted `rate` images/s after scaling
            measured = simulate(profile, chosen, time_scale, count)
            real = measured["steady_images_per_second"] * time_scale  # back to unscaled images/s
            row = {
                "gpus": n,
                "allocation": kind,
                "layout": chosen.layout,
                "predicted_images_per_hour": round(chosen.images_per_hour),
                "measured_images_per_hour": round(real * 3600),
                "measured_over_predicted": round(real / chosen.images_per_second, 3),
                "bottleneck": chosen.bottleneck,
                "pools": {name: [a.pool_size, a.num_gpus] for name, a in chosen.pools.items()},
                "time_scale": round(time_scale, 5),
            } | measured
            print(json.dumps(row), flush=True)
            results.append(row)
    return results


def plot(results: list[dict], path: Path, title: str) -> None:
    """Images per hour against N: planned prediction, planned measured, naive measured (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.6, 4.8), dpi=100)
    series = [
        ("planner's pick, predicted", "planned", "predicted_images_per_hour", "tab:gray", "--"),
        ("planner's pick, measured", "planned", "measured_images_per_hour", "tab:blue", "-"),
        ("one pool per stage, measured", "naive", "measured_images_per_hour", "tab:orange", "-"),
    ]
    for label, kind, key, color, style in series:
        runs = sorted((r for r in results if r["allocation"] == kind), key=lambda r: r["gpus"])
        ax.plot([r["gpus"] for r in runs], [r[key] for r in runs], style, marker="o", color=color, label=label)
    ns = sorted({r["gpus"] for r in results})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("GPUs (N)")
    ax.set_ylabel("images/hour")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)  # figsize x dpi: a 760 x 480 px PNG
    plt.close(fig)


def markdown(results: list[dict]) -> str:
    """The results as docs/benchmarks.md shows them: one row per run, then planned over naive."""
    lines = [
        "| GPUs | allocation | pools: actors x GPU share | predicted images/h "
        "| measured images/h | measured / predicted | bottleneck, planned | measured | its actors busy (mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        shares = ", ".join(f"{name} {n}x{g:g}" for name, (n, g) in r["pools"].items())
        # A pool's actors are busy with each of its stages in turn: their mean busy fractions add up.
        busy = [r["busy_in_steady_state"][s] for s in r["measured_bottleneck"].split("+")]
        mean = sum(sum(b) / len(b) for b in busy)
        lines.append(
            f"| {r['gpus']} | {r['allocation']} | {shares} | {r['predicted_images_per_hour']:,} "
            f"| {r['measured_images_per_hour']:,} | {r['measured_over_predicted']:.0%} | {r['bottleneck']} "
            f"| {r['measured_bottleneck']} | {mean:.0%} |"
        )
    ratios = []
    for n in sorted({r["gpus"] for r in results}):
        by = {r["allocation"]: r for r in results if r["gpus"] == n}
        if {"planned", "naive"} <= set(by):
            p, q = by["planned"], by["naive"]
            predicted = p["predicted_images_per_hour"] / q["predicted_images_per_hour"]
            measured = p["measured_images_per_hour"] / q["measured_images_per_hour"]
            ratios.append(f"N={n}: predicted {predicted:.2f}x, measured {measured:.2f}x")
    return "\n".join(lines) + "\n\nPlanned over one pool per stage: " + "; ".join(ratios) + "."
