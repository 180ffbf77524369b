"""How far one job scales: the rows per second one driver carries, and its memory.

A prompt file of N rows (100,000 by default) goes through the job's own driver path: the shard
plan, the real readers, Ray Data streaming, `assemble` (metadata rows back, a commit per shard,
publish tasks, index.json) and the end of the run, with the model stages and the writer replaced
by one zero-cost stand-in task that adds the columns they add (no pixels, no image files). The
rate it reaches is the driver's ceiling: a cluster rendering more images per second than that
waits on its driver, whatever its GPUs.

    .venv/bin/python benchmarks/driver_scale.py [--rows 100000] [--shard-size 1000]

Writes benchmarks/results/driver-scale.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def zero_cost(batch: dict[str, np.ndarray], stages: tuple[str, ...], image_column: str) -> dict[str, np.ndarray]:
    """What the stages and the writer add to a row, at no cost: timings, settings, a key and a digest."""
    n = len(batch["id"])
    now = time.time()
    out = dict(batch)
    for stage in stages:
        out[f"{stage}_model"] = np.full(n, "stand-in", dtype=object)
        out[f"{stage}_params"] = np.full(n, "{}", dtype=object)
        out[f"{stage}_seconds"] = np.zeros(n)
        out[f"{stage}_started"] = np.full(n, now)
        out[f"{stage}_finished"] = np.full(n, now)
    out["image_key"] = np.array([f"images/stand-in/{i}.png" for i in batch["id"]], dtype=object)
    out["sha256"] = np.full(n, "0" * 64, dtype=object)
    out["width"] = np.full(n, 64, dtype=np.int64)
    out["height"] = np.full(n, 64, dtype=np.int64)
    out["write_seconds"] = np.zeros(n)
    return {k: v for k, v in out.items() if k != image_column}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results/driver-scale.json")
    args = parser.parse_args()

    import ray

    from jobs.input.shards import plan_shards
    from jobs.manifest import DEFAULT_MANIFEST, load_manifest
    from jobs.output.card import write_card
    from jobs.output.commits import check_input, list_commits, work_left
    from jobs.output.job_record import check_job
    from jobs.output.layout import Derived
    from jobs.output.publish import finish_output
    from jobs.run.assemble import assemble
    from jobs.run.chain import read_dataset
    from jobs.run.events import Clock
    from jobs.run.preflight import check_output
    from jobs.run.state import Run
    from jobs.run.summary import Summary
    from workers.stages import STAGES

    work_dir = Path(tempfile.mkdtemp(prefix="ifrender-driver-"))
    prompts = work_dir / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}: a lighthouse at dusk, oil on canvas\n" for i in range(args.rows)))
    manifest = load_manifest(
        DEFAULT_MANIFEST,
        [
            f"input.path={prompts}",
            f"input.shard_size={args.shard_size}",
            f"output.path={work_dir / 'out'}",
            "contact_sheets=false",
            "last_stage=stage1",
            "groups=[]",  # a pool per stage, each with its own batch size
            "stage1.batch_size=64",
            "encode.batch_size=64",
        ],
    )
    tracemalloc.start()
    clock = Clock()
    started = clock.started
    out = manifest.output.path
    shards = plan_shards(manifest.input)
    planned = time.perf_counter() - started
    check_output(manifest, overwrite=False)
    check_job(out, manifest, allow_changed=False)
    write_card(out, manifest, Derived.of(manifest))
    commits = list_commits(out)
    work = work_left(out, shards, commits, False, check_input(out, shards, commits, False))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    summary = Summary(manifest.name, out)
    ds, _ = read_dataset(manifest, work)
    ds = ds.map_batches(
        zero_cost,
        batch_size=None,
        num_cpus=0.25,
        fn_kwargs={"stages": manifest.stages(), "image_column": STAGES[manifest.last_stage].image_column},
    )
    streaming = time.perf_counter()
    pending = {w.shard.index: w for w in work}
    assemble(Run(manifest, clock, commits, work, summary), ds, pending, uuid.uuid4().hex[:8])
    collected = time.perf_counter() - streaming
    index = finish_output(out, Derived.of(manifest))
    total = time.perf_counter() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    ray.shutdown()
    result = {
        "rows": args.rows,
        "shards": len(shards),
        "committed_shards": summary.committed_shards,
        "uncommitted_shards": len(pending),
        "rows_in_index": index["rows"],
        "shard_plan_s": round(planned, 2),
        "stream_and_commit_s": round(collected, 2),
        "total_s": round(total, 2),
        "driver_rows_per_second": round(args.rows / collected, 1),
        "driver_peak_traced_mb": round(traced_peak / 2**20, 1),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
