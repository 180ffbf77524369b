"""ifrender's job, top to bottom: manifest in -> one Ray Data streaming chain -> images + Parquet out.

    read shards -> encode (T5) -> stage1 (IF-I) -> stage2 (IF-II) -> upscale (x4) -> write

Each model stage is a callable class in its own fixed-size actor pool (workers/); embeddings and
images travel between them as columns through Ray's object store. The driver streams the small
metadata rows back (never an image) and commits each shard once all its rows are in
(jobs/commits.py); a Ray task then publishes the shard's files from storage (jobs/publish.py).
A re-run of the same command renders only what is missing.
"""

from __future__ import annotations

import json
import logging
import resource
import time
import uuid
from dataclasses import asdict

from jobs.commits import Work, check_input, commit_shard, list_commits, to_metadata, work_left
from jobs.job_record import check_job
from jobs.manifest import Manifest
from jobs.pools import init_ray, job_pools, map_pool, release, reserve
from jobs.preflight import check_resources, prepare_output, resolve_models
from jobs.publish import Derived, finish_output, publish, write_card, write_index
from jobs.rows import read_shards
from jobs.shards import plan_shards, shard_items
from jobs.summary import Summary
from workers.group import GroupWorker
from workers.keys import item_key
from workers.sizes import JobSize
from workers.stages import STAGES, drops
from workers.storage import join, write_bytes
from workers.write import WriteWorker

log = logging.getLogger(__name__)


def run(
    manifest: Manifest,
    overwrite: bool = False,
    retry_errors: bool = False,
    allow_changed: bool = False,
    progress: bool = True,
) -> Summary:
    started = time.perf_counter()
    out = manifest.output.path
    # 1. Everything that can fail without a model: input, output, the job record. The input is
    # planned before --overwrite deletes anything.
    shards = plan_shards(manifest.input)
    prepare_output(manifest, overwrite)
    check_job(out, manifest, allow_changed)
    write_card(out, manifest.name, Derived.of(manifest))
    # 2. What is left: shards without a commit, and with --retry-errors the failed rows of the rest.
    commits = list_commits(out)
    changed = check_input(out, shards, commits, allow_changed)
    work = work_left(out, shards, commits, retry_errors, changed)
    summary = Summary(manifest.name, out, skipped_shards=len(shards) - len(work))
    todo = sum(w.shard.todo for w in work)
    log.info(
        "%s: %d rows in %d shards; %d shards committed before, %d rows to render",
        manifest.name,
        sum(s.num_rows for s in shards),
        len(shards),
        len(commits),
        todo,
    )
    if work:
        # 3. The weights, then Ray (local or joined) and the pools' reservations.
        manifest = resolve_models(manifest)
        init_ray(manifest)
        import ray
        from ray.data import DataContext

        check_resources(manifest, ray.cluster_resources())
        placed, groups = reserve(job_pools(manifest), manifest.ray.reserve_timeout_s)
        DataContext.get_current().enable_progress_bars = progress
        # 4. The chain, streamed back row by row; each shard committed once it is whole.
        run_id = uuid.uuid4().hex[:8]
        try:
            ds = build_dataset(manifest, work, run_id, placed)
            pending = collect(manifest, ds, work, commits, run_id, summary, started)
        finally:
            release(groups)  # a cluster keeps no reservation of an ended job
        summary.uncommitted_shards = len(pending)
    # 5. What a kill or a slow writer left unpublished, the job's sheet and index, the summary.
    index = finish_output(out, Derived.of(manifest), submit=_publish_all if work else None)
    write_card(out, manifest.name, Derived.of(manifest), index)
    summary.driver_peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary.finish(time.perf_counter() - started)
    summary.output_rows, summary.output_ok = index["rows"], index["ok"]
    write_bytes(join(out, "summary.json"), json.dumps(asdict(summary), indent=2).encode())
    return summary


def read_dataset(manifest: Manifest, work: list[Work]):
    """The chain's start: one read task per shard (its rows, validated), re-cut into blocks of
    the first pools' batch. Returns the dataset and its rows per block."""
    import ray

    rows = manifest.ray.block_rows or min(pool.batch_size for _, pool in manifest.units().values())
    ds = ray.data.from_items(shard_items([w.shard for w in work]), override_num_blocks=len(work))
    ds = ds.map_batches(
        read_shards,
        batch_size=1,
        num_cpus=0.25,
        fn_kwargs={
            "job_seed": manifest.seed,
            "cfg": manifest.input,
            "num_images": manifest.num_images,
            "size": JobSize(manifest.width, manifest.height, manifest.last_stage),
        },
    )
    # Small blocks give each stage several tasks, so the stages overlap instead of taking turns.
    return ds.repartition(target_num_rows_per_block=rows), rows


def build_dataset(manifest: Manifest, work: list[Work], run_id: str, placed: dict[str, dict] | None = None):
    """The Ray Data chain, one line per stage; `placed` holds the pools' placement groups
    (jobs.pools.reserve)."""
    placed = placed or {}
    dropped = drops(manifest.last_stage)
    # 1-2. The shards' rows, in blocks.
    ds, rows = read_dataset(manifest, work)

    # 3. The model stages in registry order, each in its pool or fused with its neighbours in a
    # group's (the layout); the last one finishes its images with the safety checker.
    def worker_args(stage: str) -> dict:
        kwargs = {"cfg": manifest.stage_config(stage), "drop": dropped[stage]}
        if stage == manifest.last_stage and manifest.safety.wanted():
            kwargs["safety"] = manifest.safety
        return kwargs

    for name, (members, pool) in manifest.units().items():
        if len(members) == 1:
            fn, kwargs = STAGES[name].worker_class(), worker_args(name)
        else:
            fn, kwargs = GroupWorker, {"stages": [{"stage": s} | worker_args(s) for s in members]}
        ds, rows = map_pool(ds, fn, pool, rows, placed.get(name), manifest.ray.mps, **kwargs)
    # 4. The writer: image files out, their keys and digests on.
    out = manifest.output
    ds, _ = map_pool(
        ds,
        WriteWorker,
        manifest.write,
        rows,
        placed.get("write"),
        output=out.path,
        run_id=run_id,
        image_column=STAGES[manifest.last_stage].image_column,
        attempts={w.shard.index: w.attempt for w in work},
        image_format=out.image_format,
        quality=out.quality,
    )
    return ds


def _publisher():
    """publish() as a Ray task: it reads images from storage, so no image passes the driver."""
    import ray

    return ray.remote(publish).options(num_cpus=0.25, max_retries=3)


def _publish_all(out: str, shards: list[int], derived: Derived) -> None:
    import ray

    task = _publisher()
    ray.get([task.remote(out, s, derived) for s in shards])


def collect(
    manifest: Manifest, ds, work: list[Work], commits: dict, run_id: str, summary: Summary, started: float
) -> dict:
    """Stream the chain's metadata rows into their shards, committing each shard once it is whole
    and publishing it in a Ray task; `commits` (the output's, as run() found them) gains this
    run's, for index.json. Returns the shards left incomplete."""
    import ray

    out = manifest.output.path
    derived = Derived.of(manifest)
    task = _publisher()
    publishing: dict = {}  # task ref -> shard
    pending = {w.shard.index: w for w in work}
    todo = sum(w.shard.todo for w in work)
    open_rows = 0  # rendered rows whose shard is not committed yet
    last_report = last_index = time.perf_counter()

    def published(wait: bool) -> None:
        """Collect finished publish tasks; a failed one is published again by finish_output."""
        nonlocal last_index
        if not publishing:
            return
        done, _ = ray.wait(list(publishing), num_returns=len(publishing), timeout=None if wait else 0)
        for ref in done:
            shard = publishing.pop(ref)
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - the run's end publishes it again
                log.warning("publishing shard %d failed (%s); the end of the run tries again", shard, err)
        if done and (wait or time.perf_counter() - last_index > 5):
            last_index = time.perf_counter()
            write_index(out, commits, derived)  # never names a file that is not there

    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        table = to_metadata(block, manifest.last_stage)
        summary.add(table)
        summary.add_stage_counters(block, manifest.stages())
        expected = block.column("shard_items").to_pylist()
        for i, row in enumerate(table.to_pylist()):
            w = pending.get(row["shard"])
            if w is None:
                continue  # a retried task's repeat of a shard already committed
            item = item_key(row["row"], row["image_index"])
            open_rows += item not in w.rows
            w.rows[item] = row  # keyed by output: a repeated row counts once
            if len(w.rows) == expected[i]:
                commit = commit_shard(out, pending.pop(row["shard"]), run_id)
                open_rows -= len(w.rows)
                if commit is not None:
                    summary.committed_shards += 1
                    commits[commit.shard] = commit
                    publishing[task.remote(out, commit.shard, derived)] = commit.shard
            summary.max_uncommitted_rows = max(summary.max_uncommitted_rows, open_rows)
        published(wait=False)
        if time.perf_counter() - last_report > 5 or not pending:
            last_report = time.perf_counter()
            log.info("progress: %s", summary.progress(todo, len(work), last_report - started))
    published(wait=True)
    return pending
