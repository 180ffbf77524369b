"""A shard is whole: its rows in, its committed output out. This module is the one owner of a
shard's commit, and so of the output's exactly-once and resume promises.

A shard is committed when its marker `commits/<shard>-<attempt>.json` exists. The driver writes
the attempt's metadata `attempts/<shard>-<attempt>-<run>.parquet` first, then creates the marker
once (`create_exclusive`): of two writers one wins, and the loser removes its own files. What
readers load, `data/<shard>.parquet` and the other formats, is published from the committed
attempt afterwards (jobs/output/publish.py), one file per shard replaced whole, so a glob over `data/`
sees each committed row once at every moment. A retry of a shard's failed rows commits its next
attempt; the highest attempt counts. Files are named by shard, attempt and run, so a commit's
cleanup removes older attempts and killed runs, and never a newer attempt's files.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.input.shards import Shard
from jobs.output.layout import (
    ATTEMPT_FILE,
    ATTEMPTS,
    COMMITS,
    MARKER,
    STAMPS,
    attempt_files_of,
    attempt_key,
    image_dir,
    marker_key,
    markers_of,
    published_keys,
)
from workers.columns import IMAGE_FIELDS, KEPT, METADATA_SCHEMA, NO_COLUMNS, SCORES, decode_kept
from workers.errors import ChangedInputError, retryable
from workers.keys import IMAGES, item_key
from workers.stages import chain_stages
from workers.storage import create_exclusive, delete, is_s3, join, list_prefix, read_bytes, write_bytes

log = logging.getLogger(__name__)


@dataclass
class Commit:
    shard: int
    attempt: int
    metadata: str  # key of the attempt's metadata file, relative to the output
    rows: int
    ok: int
    error: int
    run_id: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)  # the shard's fingerprint (jobs.input.shards.Shard)

    @property
    def key(self) -> str:
        return marker_key(self.shard, self.attempt)


def read_table(out: str, commit: Commit, columns: list[str] | None = None) -> pa.Table:
    """A committed attempt's metadata (only `columns`, when given). Raises FileNotFoundError
    when a newer attempt's cleanup removed it."""
    data = read_bytes(join(out, commit.metadata))
    if data is None:
        raise FileNotFoundError(
            f"{join(out, commit.metadata)}: shard {commit.shard} attempt {commit.attempt}'s metadata"
        )
    return pq.read_table(pa.BufferReader(data), columns=columns)


def read_metadata(out: str, commit: Commit, columns: list[str] | None = None) -> list[dict]:
    """A committed attempt's metadata rows, as dicts."""
    return read_table(out, commit, columns).to_pylist()


def read_marker(uri: str) -> Commit:
    data = read_bytes(uri)
    if data is None:
        raise RuntimeError(f"{uri}: listed as a commit marker but cannot be read; run again to retry")
    record = json.loads(data)
    record.setdefault("run_id", record.pop("run", ""))  # markers written before run_id was its name
    return Commit(**record)


def latest_commit(out: str, shard: int) -> Commit | None:
    """The committed attempt of one shard, read now."""
    attempts = [(int(m[2]), key) for key in list_prefix(out, markers_of(shard)) if (m := MARKER.match(key))]
    return read_marker(join(out, max(attempts)[1])) if attempts else None


def committed_attempts(out: str) -> dict[int, tuple[int, str]]:
    """{shard: (its highest committed attempt, its marker's URI)}, from one listing of commits/."""
    latest: dict[int, tuple[int, str]] = {}
    for key in list_prefix(out, COMMITS):
        match = MARKER.match(key)
        if match:
            shard, attempt = int(match[1]), int(match[2])
            if attempt >= latest.get(shard, (-1, ""))[0]:
                latest[shard] = (attempt, join(out, key))
    return latest


def list_commits(out: str) -> dict[int, Commit]:
    """The committed attempt of every committed shard (the highest attempt wins)."""
    latest = committed_attempts(out)
    uris = [uri for _, uri in latest.values()]
    if not is_s3(out):
        return dict(zip(latest, map(read_marker, uris)))
    # Markers are small and many: on S3 read them side by side, not one round trip after another.
    with ThreadPoolExecutor(16) as pool:
        return dict(zip(latest, pool.map(read_marker, uris)))


def try_commit(out: str, commit: Commit) -> bool:
    """Create the shard's marker; False when another writer committed this attempt first."""
    return create_exclusive(join(out, commit.key), json.dumps(asdict(commit), indent=1).encode())


# ---- a shard in progress -------------------------------------------------------------------


@dataclass
class Work:
    """One shard to render in this run: all its rows, or on a retry only its failed ones."""

    shard: Shard
    attempt: int
    carried: pa.Table | None = None  # committed ok rows kept by a retry, in the output's schema
    rows: dict[int, dict] = field(default_factory=dict)  # metadata rows so far, by item key; never images

    def table(self, kept: pa.Schema) -> pa.Table:
        """The shard's rows in the output's schema (kept: the input columns kept beside each
        image), carried and new, in row order. Arrow throughout: kept values keep their types."""
        rows = list(self.rows.values())
        table = pa.Table.from_pylist(rows, schema=METADATA_SCHEMA)
        for name, column in zip(kept.names, decode_kept([r.get(KEPT) for r in rows], kept).columns):
            table = table.append_column(kept.field(name), column)
        if self.carried is not None:
            table = pa.concat_tables([self.carried.select(table.schema.names).cast(table.schema), table])
        index = pc.fill_null(table.column("image_index"), 0)
        order = pc.sort_indices(
            pa.table({"row": table.column("row"), "index": index}), [("row", "ascending"), ("index", "ascending")]
        )
        return table.take(order)


def changed_shards(shards: list[Shard], commits: dict[int, Commit]) -> tuple[list[int], list[int]]:
    """(committed shards whose input is not what they were rendered from, committed shards the
    input no longer has). Markers written before fingerprints existed are taken as current."""
    plan = {s.index: s for s in shards}

    def differs(recorded: dict, now: dict) -> bool:
        if now.get("hashed") and not recorded.get("hashed"):  # a Parquet hash of metadata, from before
            return {k: v for k, v in recorded.items() if k != "sha256"} != {
                k: v for k, v in now.items() if k not in ("sha256", "hashed")
            }
        return recorded != now

    changed = [
        i for i, c in sorted(commits.items()) if i in plan and c.input and differs(c.input, plan[i].fingerprint())
    ]
    gone = [i for i in sorted(commits) if i not in plan]
    return changed, gone


def check_input(out: str, shards: list[Shard], commits: dict[int, Commit], allow_changed: bool) -> list[int]:
    """Refuse a resume over an input that changed under committed shards, naming them; with
    allow_changed, retire the commits of shards the input no longer has (their rows are other
    shards' now) and return the changed shards, to render again. Nothing is skipped or doubled."""
    changed, gone = changed_shards(shards, commits)
    if not changed and not gone:
        return []
    if not allow_changed:
        named = [
            f"shard {i} ({commits[i].input.get('file')}, rows from {commits[i].input.get('first_row')})"
            for i in changed
        ]
        named += [f"shard {i} (no longer in the input)" for i in gone]
        raise ChangedInputError(
            f"output.path {out}: the input changed since {len(changed) + len(gone)} committed shard(s) were "
            f"rendered: {'; '.join(named[:5])}. Fix: restore the input, pass --allow-changed to render those "
            f"shards again from the new input, or write to another output.path."
        )
    stamp_keys = list_prefix(out, STAMPS) if gone else []
    for i in gone:  # markers first: a retired shard is never half there
        delete(out, [marker_key(i, a) for a in range(commits[i].attempt + 1)])
        stamps = [k for k in stamp_keys if f"/{i:06d}-" in k]
        files = [k for prefix in attempt_files_of(i) for k in list_prefix(out, prefix)]
        delete(out, published_keys(i) + stamps + files)
        commits.pop(i)
    return changed


def work_left(
    out: str,
    shards: list[Shard],
    commits: dict[int, Commit],
    retry_errors: bool,
    changed: list[int] = (),
    not_retried: list[dict] | None = None,
) -> list[Work]:
    """What a run renders: shards without a commit, changed shards whole, and with retry_errors
    the failed rows that could pass on another try (workers.errors.retryable). The failed rows
    that could not (their input, or a verdict on their image) are added to `not_retried`."""
    work = []
    for shard in shards:
        commit = commits.get(shard.index)
        if commit is None:
            work.append(Work(shard, 0))
        elif shard.index in changed:  # its input changed: all of it again, as its next attempt
            work.append(Work(shard, commit.attempt + 1))
        elif retry_errors and commit.error:
            table = read_table(out, commit)
            rows = table.select(
                ["row", "image_index", "status", "error", "id", "source_file", "source_row"]
            ).to_pylist()
            outputs = Counter(r["row"] for r in rows)
            failed = [r for r in rows if r["status"] != "ok" and retryable(r["error"])]
            if not_retried is not None:
                not_retried += [r for r in rows if r["status"] != "ok" and not retryable(r["error"])]
            if not failed:
                continue
            retried = {(r["row"], r["image_index"]) for r in failed}
            keep = [(r["row"], r["image_index"]) not in retried for r in rows]
            done = table.filter(pa.array(keep))  # the ok rows, and the failures another try would repeat
            # A row that failed before it was expanded into its images (at read time) has one
            # output: its retry renders all its images. Otherwise exactly the failed ones.
            whole = tuple(r["row"] for r in failed if outputs[r["row"]] == 1)
            items = tuple(item_key(r["row"], r["image_index"] or 0) for r in failed if outputs[r["row"]] > 1)
            work.append(Work(replace(shard, only_rows=items, whole_rows=whole), commit.attempt + 1, carried=done))
    return work


def to_metadata(table: pa.Table, last_stage: str) -> pa.Table:
    """A result block as the metadata schema: missing columns null, failed rows without image
    fields; the rows' kept input columns stay as they came (bytes, decoded at the commit)."""
    n = table.num_rows
    ok = pa.array([s == "ok" for s in table.column("status").to_pylist()])
    columns = []
    for f in METADATA_SCHEMA:
        if f.name == "last_stage":
            col = pa.array([last_stage] * n, pa.string())
        elif f.name == "clip_embedding" and f.name in table.column_names:
            col = embeddings(table.column(f.name).to_pylist())
        elif f.name in table.column_names:
            col = table.column(f.name).combine_chunks()
            if f.name == "error":
                col = pa.array([e or None for e in col.to_pylist()], pa.string())
            col = col.cast(f.type)
            if f.name in IMAGE_FIELDS:
                col = pc.if_else(ok, col, pa.nulls(n, f.type))
            if f.name in SCORES:
                col = pc.if_else(pc.is_nan(col), pa.nulls(n, f.type), col)
        else:
            col = pa.nulls(n, f.type)
        columns.append(col)
    found = pa.Table.from_arrays(columns, schema=METADATA_SCHEMA)
    if KEPT in table.column_names:
        found = found.append_column(KEPT, table.column(KEPT).combine_chunks().cast(pa.binary()))
    return found


def embeddings(values: list[bytes | None]) -> pa.Array:
    """The score stage's float16 embeddings, raw bytes per row between the actors, as a list
    column; a row without one (not scored, or scored without embeddings) is null."""
    halves = [np.frombuffer(v, dtype=np.float16) if v else None for v in values]
    return pa.array(halves, type=pa.list_(pa.float16()))


# ---- the commit ----------------------------------------------------------------------------


def commit_shard(out: str, work: Work, run_id: str, kept: pa.Schema = NO_COLUMNS) -> Commit | None:
    """Write the attempt's metadata (in the output's schema: ifrender's columns, then the input's
    `kept` ones), then its marker. Returns the commit when this run made it, None when another
    writer committed this attempt first (this run's copy is then removed)."""
    table = work.table(kept)
    shard, attempt = work.shard.index, work.attempt
    # 1. The metadata file, under a name no other run or attempt uses. Small: no image bytes.
    metadata = attempt_key(shard, attempt, run_id)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    write_bytes(join(out, metadata), buf.getvalue().to_pybytes())
    # 2. The marker, created once: the commit itself.
    seconds: dict[str, float] = {}
    for r in work.rows.values():
        for stage in chain_stages():
            seconds[stage] = seconds.get(stage, 0.0) + (r.get(f"{stage}_seconds") or 0.0)
    n, ok = table.num_rows, pc.sum(pc.equal(table.column("status"), "ok")).as_py() or 0
    commit = Commit(shard, attempt, metadata, n, ok, n - ok, run_id, seconds, work.shard.fingerprint())
    if try_commit(out, commit):
        return commit
    log.warning("shard %d attempt %d was committed by another writer; dropping this run's copy", shard, attempt)
    own = list_prefix(out, image_dir(shard, attempt, run_id) + "/")
    delete(out, [metadata, *own])
    return None


def leftovers(commit: Commit, keys: list[str]) -> tuple[list[str], list[str]]:
    """Of `keys` (attempt files and images of the commit's shard): (those of killed or losing runs
    of this attempt, those of older attempts). A newer attempt's files are in neither."""
    same, older = [], []
    for key in keys:
        match = ATTEMPT_FILE.match(key)
        if not match or int(match[1]) != commit.shard:
            continue
        attempt, run = int(match[2]), match[3]
        if attempt == commit.attempt and run != commit.run_id:
            same.append(key)
        elif attempt < commit.attempt:
            older.append(key)
    return same, older


def clean(out: str, commit: Commit, keys: list[str] | None = None) -> int:
    """Remove what killed runs and older attempts left of a committed shard, keeping the files its
    rows point at (a retry carries rows whose images an older attempt wrote). Call it once the
    shard's published files come from this commit: until then readers may still load older rows.
    Returns the number of files removed."""
    if keys is None:
        keys = [k for prefix in attempt_files_of(commit.shard) for k in list_prefix(out, prefix)]
    same, older = leftovers(commit, keys)
    if older:  # only then do the commit's rows matter
        try:
            kept = {r["image_key"] for r in read_metadata(out, commit, ["image_key"])}
        except FileNotFoundError:
            return 0  # a newer attempt superseded this one and cleans up itself
        older = [k for k in older if k not in kept]
    delete(out, same + older)
    return len(same) + len(older)


def clean_all(out: str, commits: dict[int, Commit]) -> None:
    """`clean` every committed shard, from one listing of attempts/ and images/."""
    by_shard: dict[int, list[str]] = {}
    for key in list_prefix(out, ATTEMPTS) + list_prefix(out, IMAGES):
        match = ATTEMPT_FILE.match(key)
        if match:
            by_shard.setdefault(int(match[1]), []).append(key)
    for shard, keys in by_shard.items():
        if shard in commits:
            clean(out, commits[shard], keys)
