"""ifrender's job, top to bottom: manifest in -> one Ray Data streaming chain -> images + Parquet out.

    read shards -> encode (T5) -> stage1 (IF-I) -> stage2 (IF-II) -> upscale (x4) -> write

Each model stage is a callable class in its own fixed-size actor pool; embeddings and images
travel between them as columns through Ray's object store. The driver streams the small
metadata rows back and commits each shard once all its rows are in (jobs/commits.py), so a
re-run of the same command renders only what is missing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.commits import Commit, check_job, list_commits, try_commit, write_index
from jobs.contact import write_job_sheet, write_shard_sheet
from jobs.formats import stale_tars, with_image_column, write_tar
from jobs.inputs import Shard, item_key, plan_shards, read_shards, shard_items
from jobs.manifest import MODEL_STAGES, Manifest
from jobs.plan import packs
from jobs.pools import map_pool, release, reserve
from jobs.storage import check_output_writable, delete, join, list_prefix, read_bytes, resolve, write_bytes
from workers.models import ModelLoadError, check_model_available
from workers.write import image_dir

log = logging.getLogger("ifrender")

METADATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("image_key", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("last_stage", pa.string()),
        ("row", pa.int64()),
        ("image_index", pa.int32()),
        ("mode", pa.string()),
        ("nsfw_detected", pa.bool_()),
        ("watermark_detected", pa.bool_()),
        ("watermarked", pa.bool_()),
        ("shard", pa.int64()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
    ]
    + [
        (f"{s}_{k}", t)
        for s in MODEL_STAGES
        for k, t in (
            ("model", pa.string()),
            ("params", pa.string()),
            ("seconds", pa.float64()),
            ("started", pa.float64()),
            ("finished", pa.float64()),
        )
    ]
    + [("write_seconds", pa.float64())]
)


# ---- 1. checks that fail before any model work ---------------------------------------------


def tiny_models_dir() -> Path:
    return Path(os.environ.get("IFRENDER_CACHE", Path.home() / ".cache" / "ifrender")) / "tiny-models"


def resolve_tiny(manifest: Manifest) -> Manifest:
    """Turn `tiny:NAME` references into built local directories."""
    from workers.tiny import ALL_REPOS, build_tiny_models

    updates = {}
    for stage in manifest.stages():
        cfg = getattr(manifest, stage)
        if cfg.model.startswith("tiny:"):
            name = cfg.model[len("tiny:") :]
            if name not in ALL_REPOS:
                raise ValueError(f"{stage}.model: unknown tiny model '{name}'; expected one of {sorted(ALL_REPOS)}")
            build_tiny_models(tiny_models_dir(), preset=ALL_REPOS[name])
            updates[stage] = cfg.model_copy(update={"model": str(tiny_models_dir() / name)})
    return manifest.model_copy(update=updates)


def safety_wanted(cfg) -> bool:
    return cfg.checker is not False or cfg.watermark is not False


def resolve_safety(manifest: Manifest) -> Manifest:
    """safety.model defaults to stage1's checkpoint (IF-I carries the checker and watermarker);
    where the driver can see that checkpoint, `auto` becomes on or off here, and a required
    component that is missing fails the job before any model work."""
    cfg = manifest.safety
    model = cfg.model or manifest.stage1.model
    if model.startswith("tiny:"):
        model = str(tiny_models_dir() / model[len("tiny:") :])
    updates: dict = {"model": model}
    path = Path(model).expanduser()
    if path.is_dir():
        for field, folder in (("checker", "safety_checker"), ("watermark", "watermarker")):
            have = (path / folder / "config.json").is_file()
            value = getattr(cfg, field)
            if value is True and not have:
                raise ModelLoadError(
                    f"safety.{field}: true, but {model} has no {folder}/. Fix: point safety.model at the IF-I "
                    f"checkpoint, stage it with its {folder}/ (ifrender stage-models), or set safety.{field}: false."
                )
            if value == "auto":
                updates[field] = have
    return manifest.model_copy(update={"safety": cfg.model_copy(update=updates)})


def resolve_models(manifest: Manifest) -> Manifest:
    """Build tiny models where named; check every model is on disk or on its S3 mirror."""
    manifest = resolve_safety(resolve_tiny(manifest))
    for stage in manifest.stages():
        model = getattr(manifest, stage).model
        # On a cluster the workers, not the driver, hold weights; a mirror is checked from anywhere.
        if not cluster_address(manifest) or model.startswith("s3://"):
            check_model_available(stage, model)
    return manifest


def prepare_output(manifest: Manifest, overwrite: bool) -> None:
    out = manifest.output.path
    check_output_writable(out)
    if overwrite:
        delete(list_prefix(join(out, "")))


@dataclass
class Work:
    """One shard to render in this run: all its rows, or on a retry only its failed ones."""

    shard: Shard
    attempt: int
    carried: list[dict] = field(default_factory=list)  # committed ok rows kept by a retry
    rows: dict[int, dict] = field(default_factory=dict)  # results so far, by global row
    images: dict[int, bytes] = field(default_factory=dict)  # encoded images, when an output format needs them
    thumbs: dict[int, bytes] = field(default_factory=dict)  # thumbnails for the contact sheet


def work_left(out: str, shards: list[Shard], commits: dict[int, Commit], retry_errors: bool) -> list[Work]:
    work = []
    for shard in shards:
        commit = commits.get(shard.index)
        if commit is None:
            work.append(Work(shard, 0))
        elif retry_errors and commit.error:
            rows = pq.read_table(pa.BufferReader(read_bytes(join(out, commit.metadata)))).to_pylist()
            done = [r for r in rows if r["status"] == "ok"]
            failed = tuple(item_key(r["row"], r["image_index"] or 0) for r in rows if r["status"] != "ok")
            work.append(Work(replace(shard, only_rows=failed), commit.attempt + 1, carried=done))
    return work


# ---- 2. Ray --------------------------------------------------------------------------------


def cluster_address(manifest: Manifest) -> str | None:
    return manifest.ray.address or os.environ.get("RAY_ADDRESS")


def pools(manifest: Manifest) -> dict:
    return {s: getattr(manifest, s) for s in manifest.stages()} | {"write": manifest.write}


def init_ray(manifest: Manifest) -> None:
    import ray

    # Workers inherit the environment of a local Ray; a cluster gets it through the runtime env.
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing reaches a hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if ray.is_initialized():
        return
    address = cluster_address(manifest)
    if address:
        ray.init(address=address, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}}, log_to_driver=True)
        return
    import torch

    # Logical CPUs: enough for every pool plus read tasks, else the read task can starve behind
    # the actors and Ray waits 30 minutes before failing.
    needed = sum(c.pool_size * c.num_cpus for c in pools(manifest).values()) + 1
    num_cpus = manifest.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(needed))
    num_gpus = torch.cuda.device_count() if manifest.ray.num_gpus is None else manifest.ray.num_gpus
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=True)


def check_resources(manifest: Manifest) -> None:
    """Pools asking for more GPUs than Ray has would wait forever: fail now instead."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    for stage, cfg in pools(manifest).items():
        if cfg.num_gpus > 0 and cfg.num_gpus > gpus and not cluster_address(manifest):
            raise RuntimeError(
                f"{stage}: asks for {cfg.num_gpus:g} GPU(s) per actor but this local Ray has {gpus:g}. "
                f"Fix: --set {stage}.num_gpus=0 for a CPU run, or set ray.address to a GPU cluster."
            )
    if not cluster_address(manifest):  # an autoscaling cluster adds nodes with them on demand
        have = ray.cluster_resources()
        for stage, cfg in pools(manifest).items():
            missing = {k: v for k, v in cfg.resources.items() if have.get(k, 0) < v}
            if missing:
                raise RuntimeError(
                    f"{stage}.resources: asks for {missing} per actor but this local Ray has "
                    f"{ {k: have.get(k, 0) for k in missing} }. Fix: remove {stage}.resources for a local run "
                    f"(they steer pools to worker groups on a cluster), or set ray.address to that cluster."
                )
    wanted = sum(cfg.pool_size * cfg.num_gpus for cfg in pools(manifest).values())
    if wanted > gpus and not cluster_address(manifest):
        raise RuntimeError(
            f"the stage pools ask for {wanted:g} GPUs in all but this local Ray has {gpus:g}. "
            f"Fix: lower pool_size or num_gpus per stage."
        )
    shares = [cfg.num_gpus for cfg in pools(manifest).values() if cfg.num_gpus > 0 for _ in range(cfg.pool_size)]
    if not cluster_address(manifest) and not packs(shares, int(gpus)):
        asked = ", ".join(f"{s} {c.pool_size} x {c.num_gpus:g}" for s, c in pools(manifest).items() if c.num_gpus > 0)
        raise RuntimeError(
            f"the stage pools' GPU shares ({asked}) add up to {wanted:g} but do not pack onto this local "
            f"Ray's {gpus:g} GPUs: an actor's share cannot span two GPUs. Fix: shares that fill whole GPUs "
            f"together (`ifrender plan MANIFEST --gpus {gpus:g}` finds some), or fewer actors."
        )


# ---- 3. the chain --------------------------------------------------------------------------


def build_dataset(manifest: Manifest, work: list[Work], run_id: str, placed: dict[str, dict] | None = None):
    """The Ray Data chain; `placed` holds the pools' placement groups (jobs.pools.reserve)."""
    import ray

    from workers.encode import EncodeWorker
    from workers.stage1 import Stage1Worker
    from workers.stage2 import Stage2Worker
    from workers.upscale import UpscaleWorker
    from workers.write import WriteWorker

    embeds = ("prompt_embeds", "negative_prompt_embeds")
    last = manifest.last_stage
    placed = placed or {}
    # Each stage drops the tensors no later stage reads, so they leave the object store early.
    inits = ("image", "mask_image")  # init images and masks: read by stages I and II only
    plan = {
        "encode": (EncodeWorker, ()),
        "stage1": (Stage1Worker, embeds + inits if last == "stage1" else ()),
        "stage2": (Stage2Worker, embeds + inits + ("stage1_image",)),
        "upscale": (UpscaleWorker, ("stage2_image",)),
    }
    stages = manifest.stages()
    rows = manifest.ray.block_rows or min(getattr(manifest, s).batch_size for s in stages)

    ds = ray.data.from_items(shard_items([w.shard for w in work]), override_num_blocks=len(work))
    ds = ds.map_batches(
        read_shards,
        batch_size=1,
        num_cpus=0.25,
        fn_kwargs={"job_seed": manifest.seed, "num_images": manifest.num_images},
    )
    # Small blocks give each stage several tasks, so the stages overlap instead of taking turns.
    ds = ds.repartition(target_num_rows_per_block=rows)
    for stage in stages:
        worker, drop = plan[stage]
        cfg = getattr(manifest, stage)
        # The last stage finishes its images with the safety checker and watermark.
        safety = manifest.safety if stage == last and safety_wanted(manifest.safety) else None
        ds, rows = map_pool(ds, worker, cfg, rows, placed.get(stage), cfg=cfg, drop=drop, safety=safety)
    out = manifest.output
    ds, _ = map_pool(
        ds,
        WriteWorker,
        manifest.write,
        rows,
        placed.get("write"),
        output=out.path,
        run=run_id,
        image_column=f"{last}_image",
        image_format=out.image_format,
        quality=out.quality,
        keep_bytes=out.embed_images or out.webdataset,
        thumbnails=manifest.contact_sheets,
    )
    return ds


# ---- 4. results ----------------------------------------------------------------------------


@dataclass
class Summary:
    name: str
    output: str
    rows: int = 0
    ok: int = 0
    error: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # busy seconds, all actors
    stage_seconds_per_image: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)  # most frequent error messages
    skipped_shards: int = 0  # committed by an earlier run
    committed_shards: int = 0  # committed by this run
    uncommitted_shards: int = 0  # left incomplete by this run (rerun to finish them)
    peak_gpu_gb: dict[str, float] = field(default_factory=dict)  # per stage, over its calls (CUDA only)
    encodes: float = 0.0  # T5 encoder inputs actually encoded (distinct texts, per batch)
    encode_texts: int = 0  # texts the rows asked to encode (prompt + negative per row)
    max_uncommitted_rows: int = 0  # most rendered rows waiting for their shard: what a kill loses
    output_rows: int = 0  # rows in the output's committed shards, all runs together
    output_ok: int = 0

    def add(self, table: pa.Table) -> None:
        status = table.column("status").to_pylist()
        self.rows += len(status)
        self.ok += status.count("ok")
        self.error += len(status) - status.count("ok")
        for col in (c for c in table.column_names if c.endswith("_seconds")):
            if table.column(col).null_count < len(table):  # a stage that ran
                stage = col[: -len("_seconds")]
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + pc.sum(table.column(col)).as_py()
        for e in table.column("error").to_pylist():
            if e:
                key = e[:160]
                self.errors[key] = self.errors.get(key, 0) + 1

    def finish(self, elapsed: float) -> None:
        self.seconds = round(elapsed, 3)
        self.images_per_second = round(self.ok / elapsed, 4) if elapsed else 0.0
        self.stage_seconds = {k: round(v, 3) for k, v in self.stage_seconds.items()}
        self.stage_seconds_per_image = {k: round(v / self.ok, 4) for k, v in self.stage_seconds.items() if self.ok}
        self.errors = dict(sorted(self.errors.items(), key=lambda kv: -kv[1])[:10])

    def text(self) -> str:
        lines = [
            f"ifrender: {self.name} done in {self.seconds:.1f} s -> {self.output}",
            f"  this run: rows {self.rows}: ok {self.ok}, error {self.error}; {self.images_per_second:.3f} images/s; "
            f"shards committed {self.committed_shards}, skipped (done before) {self.skipped_shards}, "
            f"left incomplete {self.uncommitted_shards}; at most {self.max_uncommitted_rows} rendered rows "
            "awaited their shard's commit (what a kill would have lost)",
            f"  output: {self.output_rows} rows committed, {self.output_ok} ok",
            f"  T5: {self.encode_texts} texts, {self.encodes:.0f} encoded, "
            f"{self.encode_texts - round(self.encodes)} saved by deduplication",
            "  busy seconds per image by stage: "
            + ", ".join(f"{k} {v:.3f}" for k, v in self.stage_seconds_per_image.items()),
        ]
        if any(self.peak_gpu_gb.values()):
            lines.append(
                "  peak GPU memory per call by stage: "
                + ", ".join(f"{k} {v:.2f} GiB" for k, v in self.peak_gpu_gb.items())
            )
        for message, count in self.errors.items():
            lines.append(f"  error x{count}: {message}")
        return "\n".join(lines)


def to_metadata(table: pa.Table, last_stage: str) -> pa.Table:
    """A result block as the metadata schema: missing columns null, failed rows without image fields."""
    n = table.num_rows
    ok = pa.array([s == "ok" for s in table.column("status").to_pylist()])
    columns = []
    for f in METADATA_SCHEMA:
        if f.name == "last_stage":
            col = pa.array([last_stage] * n, pa.string())
        elif f.name in table.column_names:
            col = table.column(f.name).combine_chunks()
            if f.name == "error":
                col = pa.array([e or None for e in col.to_pylist()], pa.string())
            col = col.cast(f.type)
            if f.name in ("image_key", "sha256", "width", "height"):
                col = pc.if_else(ok, col, pa.nulls(n, f.type))
        else:
            col = pa.nulls(n, f.type)
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=METADATA_SCHEMA)


def commit_shard(out: str, work: Work, run_id: str, embed_images: bool = False, webdataset: bool = False) -> bool:
    """Write the shard's metadata, then its marker. The winner removes what killed runs left of
    this shard and derives its tar; a loser removes its own files. Returns whether this run
    committed it."""
    rows = sorted(work.carried + list(work.rows.values()), key=lambda r: (r["row"], r["image_index"] or 0))
    shard, attempt = work.shard.index, work.attempt
    metadata = f"shards/{shard:06d}-{attempt:03d}-{run_id}.parquet"
    table = pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)
    if embed_images:
        images = [
            work.images.get(item_key(r["row"], r["image_index"] or 0))
            or (r["image_key"] and read_bytes(join(out, r["image_key"])))
            or None
            for r in rows
        ]
        table = with_image_column(table, images)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    write_bytes(join(out, metadata), buf.getvalue().to_pybytes())
    seconds: dict[str, float] = {}
    for r in work.rows.values():
        for stage in (*MODEL_STAGES, "write"):
            seconds[stage] = seconds.get(stage, 0.0) + (r.get(f"{stage}_seconds") or 0.0)
    ok = sum(r["status"] == "ok" for r in rows)
    commit = Commit(shard, attempt, metadata, len(rows), ok, len(rows) - ok, run_id, seconds)
    won = try_commit(out, commit)
    if won:
        keep = {metadata} | {r["image_key"] for r in rows if r["image_key"]}
        stale = list_prefix(join(out, f"images/{shard:06d}-")) + list_prefix(join(out, f"shards/{shard:06d}-"))
        base = out.rstrip("/") if out.startswith("s3://") else resolve(out)[1]  # the form list_prefix returns
        delete([u for u in stale if u[len(base) + 1 :] not in keep])
        if webdataset:
            write_tar(out, shard, attempt, rows, work.images)
    else:
        log.warning("shard %d attempt %d was committed by another writer; dropping this run's copy", shard, attempt)
        delete([join(out, metadata)] + list_prefix(join(out, image_dir(shard, run_id) + "/")))
    return won


def run(
    manifest: Manifest,
    overwrite: bool = False,
    retry_errors: bool = False,
    allow_changed: bool = False,
    progress: bool = True,
) -> Summary:
    started = time.perf_counter()
    out = manifest.output.path
    # 1. Everything that can fail without a model: output, input, the job record, weights.
    prepare_output(manifest, overwrite)
    shards = plan_shards(manifest.input)
    check_job(out, manifest, allow_changed)
    commits = list_commits(out)
    work = work_left(out, shards, commits, retry_errors)
    todo = sum(len(w.shard.only_rows) or w.shard.num_rows for w in work)
    summary = Summary(manifest.name, out, skipped_shards=len(shards) - len(work))
    log.info(
        "%s: %d rows in %d shards; %d shards committed before, %d rows to render",
        manifest.name,
        sum(s.num_rows for s in shards),
        len(shards),
        len(commits),
        todo,
    )
    if work:
        manifest = resolve_models(manifest)
        # 2. Ray, local or joined.
        init_ray(manifest)
        check_resources(manifest)
        placed, groups = reserve(pools(manifest), manifest.ray.reserve_timeout_s)
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = progress
        # 3. The chain, then 4. stream its rows back and commit each shard when it is whole.
        run_id = uuid.uuid4().hex[:8]
        o = manifest.output
        pending = {w.shard.index: w for w in work}
        open_rows = 0  # rendered rows whose shard is not committed yet
        last_report = time.perf_counter()
        try:
            for block in build_dataset(manifest, work, run_id, placed).iter_batches(
                batch_size=None, batch_format="pyarrow"
            ):
                table = to_metadata(block, manifest.last_stage)
                summary.add(table)
                encoded = block.column("image_bytes").to_pylist() if "image_bytes" in block.column_names else None
                thumbs = block.column("thumbnail").to_pylist() if "thumbnail" in block.column_names else None
                expected = block.column("shard_items").to_pylist()
                for stage in manifest.stages():
                    if f"{stage}_peak_gpu_bytes" in block.column_names:
                        peak = max(block.column(f"{stage}_peak_gpu_bytes").to_pylist(), default=0)
                        summary.peak_gpu_gb[stage] = max(summary.peak_gpu_gb.get(stage, 0.0), round(peak / 2**30, 3))
                if "encode_encoded" in block.column_names:
                    summary.encodes += sum(block.column("encode_encoded").to_pylist())
                    summary.encode_texts += sum(block.column("encode_texts").to_pylist())
                for i, row in enumerate(table.to_pylist()):
                    w = pending.get(row["shard"])
                    if w is None:
                        continue  # a retried task's repeat of a shard already committed
                    item = item_key(row["row"], row["image_index"])
                    open_rows += item not in w.rows
                    w.rows[item] = row  # keyed by output: a repeated row counts once
                    if encoded and encoded[i] is not None:
                        w.images[item] = encoded[i]
                    if thumbs and thumbs[i] is not None:
                        w.thumbs[item] = thumbs[i]
                    if len(w.rows) == expected[i]:
                        won = commit_shard(out, pending.pop(row["shard"]), run_id, o.embed_images, o.webdataset)
                        if won and manifest.contact_sheets:
                            write_shard_sheet(out, w)
                        summary.committed_shards += won
                        open_rows -= len(w.rows)
                    summary.max_uncommitted_rows = max(summary.max_uncommitted_rows, open_rows)
                if time.perf_counter() - last_report > 5 or not pending:
                    last_report = time.perf_counter()
                    elapsed = last_report - started
                    log.info(
                        "progress: %d outputs of %d input rows (ok %d, error %d), %d/%d shards committed, %.2f images/s, %.0f s elapsed",
                        summary.rows,
                        todo,
                        summary.ok,
                        summary.error,
                        summary.committed_shards,
                        len(work),
                        summary.ok / elapsed,
                        elapsed,
                    )
        finally:
            release(groups)  # a cluster keeps no reservation of an ended job
        summary.uncommitted_shards = len(pending)
    commits = list_commits(out)
    if manifest.output.webdataset:  # tars a kill left missing or a retry made stale
        for shard in stale_tars(out, commits):
            done = pq.read_table(pa.BufferReader(read_bytes(join(out, commits[shard].metadata)))).to_pylist()
            write_tar(out, shard, commits[shard].attempt, done, {})
    if manifest.contact_sheets and commits:
        write_job_sheet(out, commits)
    summary.finish(time.perf_counter() - started)
    index = write_index(out, commits)
    summary.output_rows, summary.output_ok = index["rows"], index["ok"]
    write_bytes(join(out, "summary.json"), json.dumps(asdict(summary), indent=2).encode())
    return summary
