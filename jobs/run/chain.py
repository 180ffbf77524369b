"""The Ray Data chain of one chunk, one line per stage:

    read shards -> encode (T5) -> stage1 (IF-I) -> stage2 (IF-II) -> upscale (x4) -> write

Each model stage is a callable class in its own actor pool (workers/), or fused with its
neighbours in a group's (the layout); embeddings and images travel between them as columns
through Ray's object store. Only small metadata rows come out at the end (never an image).
"""

from __future__ import annotations

from jobs.input.columns import Columns
from jobs.input.rows import read_shards
from jobs.input.shards import shard_items
from jobs.manifest import Manifest
from jobs.output.commits import Work
from jobs.run.pools import map_pool
from workers.group import GroupWorker
from workers.sizes import JobSize
from workers.stages import STAGES, WRITE, drops
from workers.write import WriteWorker


def read_dataset(manifest: Manifest, work: list[Work], columns: Columns | None = None):
    """The chain's start: one read task per shard (its rows, validated), re-cut into blocks of
    the first pools' batch. Returns the dataset and its rows per block."""
    import ray

    rows = manifest.ray.block_rows or min(pool.batch_size for _, pool in manifest.model_pools().values())
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
            "columns": columns,
        },
    )
    # Small blocks give each stage several tasks, so the stages overlap instead of taking turns.
    return ds.repartition(target_num_rows_per_block=rows), rows


def build_dataset(
    manifest: Manifest,
    work: list[Work],
    run_id: str,
    placed: dict[str, dict] | None = None,
    columns: Columns | None = None,
):
    """The chain for `work`; `placed` holds the pools' placement group arguments
    (jobs.run.pools.reserve); `columns` the input's (what the read keeps beside each row)."""
    placed = placed or {}
    dropped = drops(manifest.stages())
    # 1-2. The shards' rows, in blocks.
    ds, rows = read_dataset(manifest, work, columns)

    # 3. The model stages in registry order, each in its pool or fused with its neighbours in a
    # group's (the layout); the last one finishes its images with the safety checker.
    def worker_args(stage: str) -> dict:
        kwargs = {"cfg": manifest.stage_config(stage), "drop": dropped[stage]}
        if stage == manifest.last_stage and manifest.safety.wanted():
            kwargs["safety"] = manifest.safety
        return kwargs

    for name, (members, pool) in manifest.model_pools().items():
        if len(members) == 1:
            fn, kwargs = STAGES[name].worker_class(), worker_args(name)
        else:
            fn, kwargs = GroupWorker, {"stages": [{"stage": s} | worker_args(s) for s in members]}
        ds, rows = map_pool(ds, fn, pool, rows, placed.get(name), manifest.ray.mps, **kwargs)
    # 4. The writer: image files out, their keys and digests on.
    output = manifest.output
    ds, _ = map_pool(
        ds,
        WriteWorker,
        manifest.write,
        rows,
        placed.get(WRITE),
        output=output.path,
        run_id=run_id,
        image_column=STAGES[manifest.last_stage].image_column,
        attempts={w.shard.index: w.attempt for w in work},
        image_format=output.image_format,
        quality=output.quality,
        c2pa=output.c2pa,
    )
    return ds
