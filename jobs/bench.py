"""`ifrender bench`: the same prompts, models, steps and micro-batches rendered three ways, side
by side in one run:

(a) pipeline: the manifest's layout, as written (bench-tiny: one actor pool per stage);
(b) replicas: one actor per CPU (or GPU) holding the whole cascade, each batch through the four
    stages in turn: the data-parallel copies most users would run instead;
(c) sequential: the IF guides' way, the four pipelines called one after another in one process
    on all cores, batch by batch.

Throughput is measured in steady state for each: images finished after the first output batch,
over the time since it, so none is charged for loading models. Which layout the planner picks
for this machine comes from the pipeline's own per-stage timings (one slot per CPU, time-sliced
as GPUs are), so the pick is checked against measurements of all three.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from jobs.machine_load import OtherLoad, verdict
from jobs.manifest import Manifest
from jobs.output.layout import INDEX
from workers.sizes import JobSize
from workers.stages import STAGES

log = logging.getLogger(__name__)

SUBJECTS = [
    "a red fox",
    "a lighthouse",
    "a corgi",
    "an astronaut",
    "a castle",
    "a robot",
    "a hummingbird",
    "a ramen bowl",
]
PLACES = [
    "in the snow",
    "at dusk",
    "on the beach",
    "on the moon",
    "in fog",
    "in a greenhouse",
    "at night",
    "in a library",
]


def prompts(n: int) -> list[str]:
    """n distinct prompts (no deduplication helps either side)."""
    return [f"{SUBJECTS[i % 8]} {PLACES[(i // 8) % 8]}, picture {i}" for i in range(n)]


def steady_rate(finished: list[float]) -> tuple[float, float]:
    """(images/s after the first output call, that window's length in seconds). The first call is
    the rows that finished first, whatever its size: batches of a pool need not come out in order,
    and a smaller last batch may come out first."""
    finished = sorted(finished)
    later = [t for t in finished if t > finished[0]]
    window = finished[-1] - finished[0]
    return len(later) / window if window > 0 else 0.0, window


def pipeline_stats(rows: list[dict], manifest: Manifest) -> dict:
    stages = manifest.stages()
    last = stages[-1]
    rate, window = steady_rate([r[f"{last}_finished"] for r in rows])
    begin = min(r[f"{stages[0]}_started"] for r in rows)
    end = max(r[f"{last}_finished"] for r in rows)
    busy, gaps, per_batch = {}, {}, {}
    for stage in stages:
        calls = {(r[f"{stage}_started"], r[f"{stage}_finished"]) for r in rows}
        cfg = getattr(manifest, stage)
        busy[stage] = round(sum(b - a for a, b in calls) / (cfg.pool_size * (end - begin)), 3)
        per_batch[stage] = round(sum(b - a for a, b in calls) / len(calls), 3)
    for prev, nxt in zip(stages, stages[1:]):
        gaps[f"{prev}->{nxt}"] = round(float(np.mean([r[f"{nxt}_started"] - r[f"{prev}_finished"] for r in rows])), 3)
    return {
        "images_per_second": round(rate, 3),
        "window_s": round(window, 2),
        "busy_fraction": busy,
        "seconds_per_batch": per_batch,
        "gap_s": gaps,
    }


def run_pipeline(manifest: Manifest) -> tuple[dict, list[dict]]:
    """A render of the manifest in its layout; its numbers and its ok rows."""
    from jobs.render import run

    summary = run(manifest, overwrite=True, progress=False)
    out = Path(manifest.output.path)
    index = json.loads((out / INDEX).read_text())
    rows = []
    for shard in index["shards"]:
        rows += pq.read_table(out / shard["data"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    stats = pipeline_stats(ok, manifest) if manifest.layout == "pipeline" else replica_stats(ok, manifest)
    return stats | {"images": len(ok), "wall_s": summary.seconds, "layout": manifest.layout}, ok


def replica_stats(rows: list[dict], manifest: Manifest) -> dict:
    """A run whose pools hold several stages: the rate, and each stage's share of its actors' time."""
    stages = manifest.stages()
    pools = manifest.model_pools()
    rate, window = steady_rate([r[f"{stages[-1]}_finished"] for r in rows])
    per_batch = {}
    spent = {}
    for stage in stages:
        calls = {(r[f"{stage}_started"], r[f"{stage}_finished"]) for r in rows}
        spent[stage] = sum(b - a for a, b in calls)
        per_batch[stage] = round(spent[stage] / len(calls), 3)
    total = sum(spent.values())
    return {
        "images_per_second": round(rate, 3),
        "window_s": round(window, 2),
        "busy_fraction": {s: round(v / total, 3) for s, v in spent.items()},  # of the actors' busy time
        "seconds_per_batch": per_batch,
        "pools": {name: pool.pool_size for name, (_, pool) in pools.items()},
    }


def replicas_of(manifest: Manifest, actors: int) -> Manifest:
    """The manifest as `actors` copies of the whole cascade, with the pipeline's per-actor CPUs and
    GPUs, batches of its largest stage batch, and the same micro-batches (so the same pixels)."""
    from jobs.plan.layouts import with_groups

    stages = manifest.stages()
    first = getattr(manifest, stages[0])
    group = {
        "stages": list(stages),
        "pool_size": actors,
        "num_cpus": 1,
        "num_gpus": first.num_gpus,
        "batch_size": max(getattr(manifest, s).batch_size for s in stages),
    }
    out = manifest.output.model_copy(update={"path": manifest.output.path.rstrip("/") + "-replicas"})
    return with_groups(manifest, [group]).model_copy(update={"output": out})


def on_cpus(manifest: Manifest, chosen) -> Manifest:
    """A plan for this machine's CPU slots applied: a slot per actor is a CPU, not a GPU."""
    from jobs.plan.layouts import with_groups

    groups = [
        {
            "stages": list(a.stages),
            "pool_size": a.pool_size,
            "num_cpus": max(0.1, a.num_gpus),
            "batch_size": a.batch_size,
        }
        for a in chosen.pools.values()
        if len(a.stages) > 1
    ]
    out = manifest.output.model_copy(update={"path": manifest.output.path.rstrip("/") + "-" + chosen.layout})
    return with_groups(manifest, groups).model_copy(update={"output": out})


def machine_plan(manifest: Manifest, pipeline: dict, slots: int):
    """The planner's layouts for this machine, from the pipeline's measured seconds per batch of
    one single-threaded actor per stage: a CPU core is a slot the busy processes time-slice."""
    from jobs.plan.costs import Profile, StageProfile
    from jobs.plan.search import plan_layouts

    stages = {
        s: StageProfile(
            pipeline["seconds_per_batch"][s] / getattr(manifest, s).batch_size, 1.0, getattr(manifest, s).batch_size
        )
        for s in manifest.stages()
    }
    profile = Profile(f"measured by ifrender bench ({manifest.name})", f"{slots} CPU cores", stages)
    return profile, plan_layouts(profile, slots, 1e6)


def run_sequential(manifest: Manifest, rows: dict[str, np.ndarray], out: str) -> tuple[dict, dict[str, str]]:
    """The four pipelines in this process, batch by batch: each batch goes through every stage
    (each stage called on its own batch size) before the next batch starts. Returns the numbers
    and {row id: image key}."""
    import torch

    from workers.write import WriteWorker

    stages = manifest.stages()
    loaded = time.perf_counter()
    workers = {}
    for stage in stages:
        last = stage == manifest.last_stage and manifest.safety.wanted()
        workers[stage] = STAGES[stage].worker_class()(
            getattr(manifest, stage), **({"safety": manifest.safety} if last else {})
        )
    attempts = defaultdict(int)  # every shard's first attempt
    writer = WriteWorker(out, "seq", STAGES[manifest.last_stage].image_column, attempts, manifest.output.image_format)
    log.info(
        "sequential: models loaded in %.1f s, %d torch threads", time.perf_counter() - loaded, torch.get_num_threads()
    )
    n = len(rows["id"])
    chunk = max(getattr(manifest, s).batch_size for s in stages)
    finished: list[float] = []
    digests: dict[str, str] = {}
    busy = dict.fromkeys(stages, 0.0)
    calls = dict.fromkeys(stages, 0)
    start = time.perf_counter()
    for lo in range(0, n, chunk):
        batch = {k: v[lo : lo + chunk] for k, v in rows.items()}
        for stage in stages:
            size = getattr(manifest, stage).batch_size
            t = time.perf_counter()
            parts = [
                workers[stage]({k: v[i : i + size] for k, v in batch.items()}) for i in range(0, len(batch["id"]), size)
            ]
            batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            busy[stage] += time.perf_counter() - t
            calls[stage] += len(parts)
        written = writer(batch)
        digests.update(zip(written["id"], written["image_key"]))
        finished += [time.perf_counter()] * len(batch["id"])
    total = time.perf_counter() - start
    rate, window = steady_rate(finished)
    return (
        {
            "images": n,
            "images_per_second": round(rate, 3),
            "window_s": round(window, 2),
            "busy_fraction": {s: round(b / total, 3) for s, b in busy.items()},  # of the one process
            "seconds_per_batch": {s: round(busy[s] / calls[s], 3) for s in stages},
            "gap_s": {f"{a}->{b}": 0.0 for a, b in zip(stages, stages[1:])},
        },
        digests,
    )


def _max_diff(a: Path, b: Path) -> int:
    from PIL import Image

    x, y = (np.asarray(Image.open(p), dtype=np.int16) for p in (a, b))
    return int(np.abs(x - y).max())


def bench(manifest: Manifest, images: int, workdir: Path) -> dict:
    from jobs.input.rows import read_shards
    from jobs.input.shards import plan_shards, shard_items
    from jobs.run.preflight import resolve_models

    if manifest.layout != "pipeline":
        raise ValueError(
            f"bench {manifest.name}: expected a manifest in the pipeline layout (one pool per stage: the bench "
            f"measures it, then makes the replicas itself), found groups {[list(manifest.group_stages(g)) for g in manifest.groups]}. "
            f"Fix: manifests/bench-tiny.yaml (the default), or --set groups=[] with each stage's pool settings"
        )
    # Steady state starts after the first output batch, and the sequential way's batch is the
    # largest stage batch: with no more images than that there is nothing to measure.
    largest = max(getattr(manifest, s).batch_size for s in manifest.stages())
    if images <= largest:
        raise ValueError(
            f"bench --images {images}: expected more than the largest batch_size ({largest}), as the rate is "
            f"measured after the first output batch. Fix: --images {4 * largest} or more, or smaller batch sizes."
        )
    workdir.mkdir(parents=True, exist_ok=True)
    prompt_file = workdir / "prompts.txt"
    prompt_file.write_text("\n".join(prompts(images)) + "\n")
    manifest = manifest.model_copy(
        update={
            "input": manifest.input.model_copy(update={"path": str(prompt_file)}),
            "output": manifest.output.model_copy(update={"path": str(workdir / "pipeline")}),
            "contact_sheets": False,
        }
    )
    manifest = resolve_models(manifest)
    load = OtherLoad().start()  # each way's share of the machine, to tell a true pick from a busy neighbour
    marks = {"start": time.monotonic()}
    log.info("bench: %d images, (a) Ray pipeline", images)
    pipeline, done = run_pipeline(manifest)
    marks["pipeline"] = time.monotonic()
    slots = os.cpu_count() or 1
    log.info("bench: (b) replicas, %d copies of the cascade", slots)
    replicas, replica_rows = run_pipeline(replicas_of(manifest, slots))
    marks["replicas"] = time.monotonic()
    log.info("bench: (c) sequential, one process")
    items = shard_items(plan_shards(manifest.input))
    batches = [
        read_shards(
            {k: np.array([s[k]], dtype=object) for k in s},
            job_seed=manifest.seed,
            cfg=manifest.input,
            size=JobSize(manifest.width, manifest.height, manifest.last_stage),
        )
        for s in items
    ]
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    sequential, digests = run_sequential(manifest, rows, str(workdir / "sequential"))
    marks["sequential"] = time.monotonic()
    # Both ways must render the same images, or the comparison means nothing. Not bit for bit:
    # the actors run torch on 1 thread, the single process on all cores, and CPU kernels round
    # differently with the thread count (measured: 1/255 on under 0.1% of pixels).
    diffs = [
        _max_diff(workdir / "pipeline" / r["image_key"], workdir / "sequential" / digests[r["id"]])
        for r in done
        if digests.get(r["id"])
    ]
    # Replicas run each stage as the pipeline's actors do (same micro-batches, one thread each):
    # the same bytes, not merely close.
    same = {r["id"]: r["sha256"] for r in replica_rows} == {r["id"]: r["sha256"] for r in done}
    import torch

    from jobs.plan.search import choose, why

    profile, layouts = machine_plan(manifest, pipeline, slots)
    chosen = choose(layouts)
    ways = {"pipeline": pipeline, "replicas": replicas, "sequential": sequential}
    if chosen.layout == "fused":  # the pick is measured too, whatever it is
        log.info("bench: (d) the planner's pick, fused")
        ways["fused"], _ = run_pipeline(on_cpus(manifest, chosen))
        marks["fused"] = time.monotonic()
    load.stop()
    names = list(marks)
    other = {way: round(load.cores(marks[names[i - 1]], marks[way]), 3) for i, way in enumerate(names) if i}
    rates = {k: v["images_per_second"] for k, v in ways.items()}
    return {
        "manifest": manifest.name,
        "images": images,
        "machine": {"cpus": slots, "torch_threads": torch.get_num_threads(), "other_process_cores": other},
        **ways,
        "images_per_second": rates,
        "ratio": round(rates["pipeline"] / rates["sequential"], 3),
        "ratios": {
            "replicas/pipeline": round(rates["replicas"] / rates["pipeline"], 3),
            "replicas/sequential": round(rates["replicas"] / rates["sequential"], 3),
            "pipeline/sequential": round(rates["pipeline"] / rates["sequential"], 3),
        },
        "planner": {
            "chosen": chosen.layout,
            "unreliable": verdict(other),  # why the measurements cannot check the pick, or None
            "why": why(profile, layouts, chosen),
            "predicted_images_per_second": {
                k: round(p.images_per_second, 3) for k, p in layouts.items() if not isinstance(p, str)
            },
        },
        "images_compared": len(diffs),
        "max_pixel_diff": max(diffs, default=None),  # sequential against the pipeline, in 0-255 levels
        "replicas_bit_identical": same,
    }


def report(result: dict) -> str:
    p, s = result["pipeline"], result["sequential"]
    rates, ratios, chosen = result["images_per_second"], result["ratios"], result["planner"]["chosen"]
    lines = [
        f"bench {result['manifest']}: {result['images']} images on {result['machine']['cpus']} CPUs, "
        f"steady state after the first output batch",
        f"  pipeline: {rates['pipeline']:.3f} images/s   replicas ({result['replicas']['pools']}): "
        f"{rates['replicas']:.3f} images/s   sequential (one process): {rates['sequential']:.3f} images/s",
        f"  ratios: replicas/pipeline {ratios['replicas/pipeline']:.2f}x, replicas/sequential "
        f"{ratios['replicas/sequential']:.2f}x, pipeline/sequential {ratios['pipeline/sequential']:.2f}x",
        (
            f"  NO PICK: {result['planner']['unreliable']}"
            if result["planner"].get("unreliable")
            else f"  the planner picks {chosen} for this machine (measured {rates[chosen]:.3f} images/s; the best "
            f"of the others {max(v for k, v in rates.items() if k != chosen):.3f}):"
        ),
        *result["planner"]["why"],
        f"  same images: replicas and pipeline bit for bit: {result['replicas_bit_identical']}; sequential "
        f"{result['images_compared']}/{result['images']} compared, max pixel difference {result['max_pixel_diff']}/255",
        "  busy fraction per stage (pipeline, of its pool's time): "
        + ", ".join(f"{k} {v:.0%}" for k, v in p["busy_fraction"].items()),
        "  share of the sequential process per stage: "
        + ", ".join(f"{k} {v:.0%}" for k, v in s["busy_fraction"].items()),
        "  seconds per batch (pipeline actors, 1 thread each): "
        + ", ".join(f"{k} {v:.2f}" for k, v in p["seconds_per_batch"].items())
        + "; (sequential, all threads): "
        + ", ".join(f"{k} {v:.2f}" for k, v in s["seconds_per_batch"].items()),
        "  mean time between stages (pipeline): " + ", ".join(f"{k} {v:.2f} s" for k, v in p["gap_s"].items()),
    ]
    return "\n".join(lines)
