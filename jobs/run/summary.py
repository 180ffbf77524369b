"""The run summary: result blocks in, counts, rates, busy seconds and top errors out
(printed, and written to OUTPUT/summary.json)."""

from __future__ import annotations

import json
import logging
import resource
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from jobs.output.layout import JOB_SHEET, REPORT, SUMMARY
from jobs.run.events import Observer
from workers.storage import join, write_bytes

log = logging.getLogger(__name__)


# The parts of an actor's start-up, in order, as the summary names when each ended.
STARTUP_PARTS = {
    "process": "process up",
    "loading": "imports done",
    "loaded": "models loaded",
    "first_call": "first batch in",
    "first_done": "first batch out",
}


def startup_parts(records: list[dict], at) -> dict[str, dict[str, float]]:
    """Per stage, the median over its actors of when each start-up part ended (`at` turns a wall
    time into seconds into the run); a part an actor never reached is left out."""
    from statistics import median

    out: dict[str, dict[str, float]] = {}
    for stage in dict.fromkeys(r["stage"] for r in records):
        mine = [r for r in records if r["stage"] == stage]
        out[stage] = {
            part: round(at(median(r[part] for r in mine if r.get(part))), 1)
            for part in STARTUP_PARTS
            if any(r.get(part) for r in mine)
        }
    return out


@dataclass
class Summary(Observer):
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
    driver_peak_rss_mb: float = 0.0  # the driver process's peak resident memory
    output_rows: int = 0  # rows in the output's committed shards, all runs together
    output_ok: int = 0
    pool_sizes: list[dict] = field(default_factory=list)  # per chunk: when it started, its pools' actors, the cluster
    first_work_at: dict[str, float] = field(default_factory=dict)  # node id -> wall time its first batch finished
    first_batch_s: float | None = None  # seconds into the run when any stage first finished a batch
    first_commit_s: float | None = None  # seconds into the run when this run first committed a shard
    node_names: dict[str, str] = field(default_factory=dict)  # node id -> address:node manager port
    rows_by_node: dict[str, dict[str, int]] = field(default_factory=dict)  # node id -> stage -> rows it finished
    actor_starts: list[dict] = field(default_factory=list)  # per stage actor: when it started, on which node
    # per stage, the median over its actors of when each start-up part ended, in seconds into the run:
    # process (started), imports (the worker's code running), loaded (models), first_call, first_done
    startup: dict[str, dict[str, float]] = field(default_factory=dict)
    chunks_lost: int = 0  # chunks whose blocks Ray lost (a node left); their shards ran again
    shards_by_others: int = 0  # shards another driver of the job on this output committed or held
    held_by: list[str] = field(default_factory=list)  # the drivers that held shards this run left them
    stalled: str = ""  # why the no-progress check ended the run
    stopped: str = ""  # why the run stopped early with work left (--stop-after)
    truncated: int = 0  # rows whose prompt was longer than T5's window (prompt_truncated)
    tflop: float = 0.0  # the ok rows' compute at the full-size models, as each ran (jobs/plan/costs.py)
    tflop_per_image: float = 0.0
    not_retryable: int = 0  # with --retry-errors: failed rows another try would fail the same way
    not_retryable_examples: list[str] = field(default_factory=list)  # a few of them: id, source, error

    # ---- as the run's observer (jobs/run/state.py) ----------------------------------------

    def on_chunk(self, run, chunk) -> None:
        self.pool_sizes.append(chunk.record)

    def on_block(self, run, block: pa.Table, rows: pa.Table) -> None:
        self.add(rows)
        self.add_stage_counters(block, run.manifest.stages())

    def on_commit(self, run, commit) -> None:
        self.committed_shards += 1
        if self.first_commit_s is None:
            self.first_commit_s = round(run.clock.elapsed(), 1)

    def on_end(self, run) -> None:
        """The counts of the whole output, the rates, then summary.json."""
        self.uncommitted_shards = len(run.left)
        self.driver_peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        self.finish(run.clock.elapsed())
        self.output_rows, self.output_ok = run.index["rows"], run.index["ok"]
        # Written inside the output: no path to it, which would break when the folder moves.
        record = {k: v for k, v in asdict(self).items() if k != "output"}
        write_bytes(join(run.out, SUMMARY), json.dumps(record, indent=2).encode())

    # ---- the counts ------------------------------------------------------------------------

    def not_retried(self, rows: list[dict]) -> None:
        """--retry-errors left these failed rows as they are: their input (or a verdict on their
        image) makes them fail the same way again."""
        self.not_retryable = len(rows)
        self.not_retryable_examples = [
            f"row id {r['id']!r} (row {r['source_row']} of {shown(r['source_file'] or '?')}): {(r['error'] or '')[:160]}"
            for r in rows[:3]
        ]
        if rows:
            log.info(
                "--retry-errors: %d failed row(s) need their input fixed, not another try (e.g. %s); fix them in "
                "the input and run again with --allow-changed",
                len(rows),
                self.not_retryable_examples[0],
            )

    def add(self, table: pa.Table) -> None:
        status = table.column("status").to_pylist()
        self.rows += len(status)
        self.ok += status.count("ok")
        self.error += len(status) - status.count("ok")
        for col in (c for c in table.column_names if c.endswith("_seconds")):
            if table.column(col).null_count < len(table):  # a stage that ran
                stage = col[: -len("_seconds")]
                self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + pc.sum(table.column(col)).as_py()
        if "prompt_truncated" in table.column_names:
            self.truncated += sum(bool(t) for t in table.column("prompt_truncated").to_pylist())
        # Only the columns the cost reads: a block holds every row's metadata and kept columns.
        self.tflop += spent(
            table.select([c for c in table.column_names if c == "status" or c.endswith("_params")]).to_pylist()
        )
        for e in table.column("error").to_pylist():
            if e:
                key = e[:160]
                self.errors[key] = self.errors.get(key, 0) + 1

    def discard(self, rows: list[dict]) -> None:
        """Rows of a lost chunk, rendered again in a later one: counted once."""
        self.rows -= len(rows)
        ok = sum(r["status"] == "ok" for r in rows)
        self.ok -= ok
        self.truncated -= sum(bool(r.get("prompt_truncated")) for r in rows)
        self.tflop -= spent(rows)
        self.error -= len(rows) - ok

    def add_stage_counters(self, block: pa.Table, stages: tuple[str, ...]) -> None:
        """What the stages count beside the metadata: peak GPU memory, T5 encodes."""
        names = block.column_names
        for stage in stages:
            if f"{stage}_peak_gpu_bytes" in names:
                peak = max(block.column(f"{stage}_peak_gpu_bytes").to_pylist(), default=0)
                self.peak_gpu_gb[stage] = max(self.peak_gpu_gb.get(stage, 0.0), round(peak / 2**30, 3))
        if "encode_encoded" in names:
            self.encodes += sum(block.column("encode_encoded").to_pylist())
            self.encode_texts += sum(block.column("encode_texts").to_pylist())

    def finish(self, elapsed: float) -> None:
        self.seconds = round(elapsed, 3)
        self.images_per_second = round(self.ok / elapsed, 4) if elapsed else 0.0
        self.stage_seconds = {k: round(v, 3) for k, v in self.stage_seconds.items()}
        self.stage_seconds_per_image = {k: round(v / self.ok, 4) for k, v in self.stage_seconds.items() if self.ok}
        self.tflop = round(self.tflop, 1)
        self.tflop_per_image = round(self.tflop / self.ok, 1) if self.ok else 0.0
        self.errors = dict(sorted(self.errors.items(), key=lambda kv: -kv[1])[:10])

    def text(self) -> str:
        """What the run did (its details first), then last what a person reads next: the counts,
        and where the report, the data and the contact sheet are, with a command that reads it."""
        lines = [
            f"ifrender: {self.name}: details",
            f"  this run: rows {self.rows}: ok {self.ok}, error {self.error}; {self.images_per_second:.3f} images/s; "
            f"shards committed {self.committed_shards}, skipped (done before) {self.skipped_shards}, "
            f"left incomplete {self.uncommitted_shards}; at most {self.max_uncommitted_rows} rendered rows "
            "awaited their shard's commit (what a kill would have lost)",
            f"  output: {self.output_rows} rows committed, {self.output_ok} ok; driver peak memory "
            f"{self.driver_peak_rss_mb:.0f} MB",
            f"  T5: {self.encode_texts} texts, {self.encodes:.0f} encoded, "
            f"{self.encode_texts - round(self.encodes)} saved by deduplication",
            "  busy seconds per image by stage: "
            + ", ".join(f"{k} {v:.3f}" for k, v in self.stage_seconds_per_image.items()),
            f"  compute per image: {self.tflop_per_image:,.1f} TFLOP at the full-size models' FLOP counts, as the "
            "rows ran (their steps, strength, guidance and interval)",
        ]
        if any(self.peak_gpu_gb.values()):
            lines.append(
                "  peak GPU memory per call by stage: "
                + ", ".join(f"{k} {v:.2f} GiB" for k, v in self.peak_gpu_gb.items())
            )
        if self.pool_sizes:
            lines.append(
                "  pools over time: "
                + "; ".join(
                    f"{p['at_s']:.0f} s: {', '.join(f'{k} {v}' for k, v in p['pools'].items())} "
                    f"({p['nodes']} nodes, {p['gpus']:g} GPUs, {p['shards']} shards)"
                    for p in self.pool_sizes
                )
            )
        if self.pool_sizes and self.first_commit_s is not None:
            started = max((a["at_s"] for a in self.actor_starts), default=None)
            lines.append(
                f"  start-up: pools sized at {self.pool_sizes[0]['at_s']:.0f} s (Ray ready)"
                + (f", actors started by {started:.0f} s" if started is not None else "")
                + (f", first batch finished at {self.first_batch_s:.0f} s" if self.first_batch_s is not None else "")
                + f", first shard committed at {self.first_commit_s:.0f} s"
            )
        if self.startup:
            lines.append(
                f"  start-up by stage, s into the run (median of its actors): {' / '.join(STARTUP_PARTS.values())}: "
                + "; ".join(
                    f"{stage} " + " / ".join(f"{parts[k]:.1f}" if k in parts else "-" for k in STARTUP_PARTS)
                    for stage, parts in self.startup.items()
                )
            )
        if self.actor_starts:
            per: dict[str, list[float]] = {}
            for start in self.actor_starts:
                per.setdefault(start["stage"], []).append(start["at_s"])
            lines.append(
                "  actors started per stage: "
                + ", ".join(f"{k} {len(v)} (last at {max(v):.0f} s)" for k, v in per.items())
            )
        if len(self.rows_by_node) > 1:
            lines.append(
                "  rows finished per node (busiest stage): "
                + ", ".join(
                    f"{self.node_names.get(node, node[:8])} {max(stages.values())}"
                    for node, stages in self.rows_by_node.items()
                )
            )
        if self.truncated:
            lines.append(
                f"  prompts cut at T5's 77 tokens: {self.truncated} row(s) (prompt_truncated; the model saw "
                f"only the first 77 tokens, prompt_tokens says how many there were)"
            )
        if self.chunks_lost:
            lines.append(f"  chunks lost on the cluster and run again: {self.chunks_lost}")
        if self.shards_by_others:
            held = f"; left to {', '.join(self.held_by)}, which held them" if self.held_by else ""
            lines.append(f"  shards rendered by another driver on this output: {self.shards_by_others}{held}")
        for reason in (self.stalled, self.stopped):
            if reason:
                lines.append(f"  stopped early: {reason}")
        for message, count in self.errors.items():
            lines.append(f"  error x{count}: {message}")
        if self.not_retryable:
            lines.append(
                f"  not retried: {self.not_retryable} failed row(s) need their input fixed (then run again with "
                f"--allow-changed): " + "; ".join(self.not_retryable_examples)
            )
        return "\n".join(lines + self.where())

    def where(self) -> list[str]:
        out = shown(self.output)
        data = join(out, "data")
        scores = ", 'clip_score', 'aesthetic_score'" if "score" in self.stage_seconds else ""  # the score stage ran
        read = (
            f'python -c "import pyarrow.dataset as ds; '
            f"print(ds.dataset('{data}').to_table(columns=['id', 'prompt', 'status'{scores}, 'image_key'])"
            f'.to_pandas().to_string(max_rows=20))"'
        )
        stopped = " (stopped early: run the same command again for the rest)" if self.uncommitted_shards else ""
        return [
            f"ifrender: {self.name} done in {self.seconds:.1f} s{stopped}: {self.rows} rows rendered, {self.ok} "
            f"images ok, {self.error} errors ({self.images_per_second:.2f} images/s); the output holds "
            f"{self.output_rows} rows, {self.output_ok} ok",
            f"  report:        {join(out, REPORT)}",
            f"  data:          {data}/ (Parquet, one file per shard)",
            f"  images:        {join(out, 'images')}/",
            f"  contact sheet: {join(out, JOB_SHEET)}",
            f"  read it:       {read}",
        ]


def spent(rows: list[dict]) -> float:
    """The ok rows' TFLOP at the full-size models, from the settings each stage recorded."""
    from jobs.plan.costs import recorded_tflop
    from workers.stages import MODEL_STAGES

    return sum(
        recorded_tflop(stage, row[f"{stage}_params"])
        for row in rows
        if row.get("status") == "ok"
        for stage in MODEL_STAGES
        if row.get(f"{stage}_params")
    )


def shown(path: str) -> str:
    """A local output as the terminal reaches it from here (relative where it is below the
    working directory); an s3:// URI as it is."""
    import os

    if "://" in path:
        return path
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path
