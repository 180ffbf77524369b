"""What readers load: a committed shard's attempt in; `data/<shard>.parquet`, its WebDataset tar
and its contact sheet out, each one file per shard replaced whole; and `index.json` and the
dataset card that point at them.

Publishing runs after the commit, in a Ray task (no image passes through the driver), and again
at the end of a run for any shard whose files are missing or stale: a stamp
`stamps/<kind>/<shard>-<attempt>-<tag>` says that the file of that kind was built from that attempt
and has that version tag (S3 ETag, local mtime and size), so a file that a kill left missing, an
older attempt's file, and a file a slow writer overwrote after the stamp are all found from two
listings. A slow writer of an older attempt checks the shard's latest commit before and after it
writes, and publishes the latest when it finds itself superseded, so the files converge on the
committed attempt whatever the interleaving.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.output.commits import Commit, clean, clean_all, latest_commit, list_commits, read_marker, read_table
from jobs.output.contact import write_job_sheet, write_shard_sheet
from jobs.output.formats import image_schema, write_embedded, write_tar
from jobs.output.layout import (
    DATA_GLOB,
    INDEX,
    KINDS,
    SCHEMA,
    STAMP,
    STAMPS,
    Derived,
    data_key,
    marker_key,
    stamp_key,
    stamps_of,
)
from workers.columns import output_schema
from workers.storage import copy_object, delete, join, list_prefix, version, versions, write_bytes

log = logging.getLogger(__name__)


def published(out: str) -> dict[tuple[str, int], int]:
    """{(kind, shard): the attempt its current file was built from}, for files whose stamp matches
    their version now."""
    tags = {}
    for _, folder in set(KINDS.values()):
        tags.update(versions(out, folder))
    found = {}
    for key in list_prefix(out, STAMPS):
        match = STAMP.match(key)
        if match:
            kind, shard, attempt, tag = match[1], int(match[2]), int(match[3]), match[4]
            if kind in KINDS and tags.get(KINDS[kind][0](shard)) == tag:
                found[(kind, shard)] = max(attempt, found.get((kind, shard), -1))
    return found


def stale(out: str, commits: dict[int, Commit], derived: Derived) -> list[int]:
    """Committed shards with a file of a wanted kind missing, built from another attempt, or
    rewritten since its stamp."""
    have = published(out)
    return [s for s, c in sorted(commits.items()) if any(have.get((k, s)) != c.attempt for k in derived.kinds())]


def _build(out: str, kind: str, commit: Commit, table: pa.Table | None) -> None:
    shard = commit.shard
    target = join(out, KINDS[kind][0](shard))
    if kind == "data":
        copy_object(join(out, commit.metadata), target)
    elif kind == "data-images":
        write_embedded(out, table, target)
    elif kind == "webdataset":
        write_tar(out, table.to_pylist(), target)
    else:
        write_shard_sheet(out, table.to_pylist(), target)
    tag = version(target)
    write_bytes(join(out, stamp_key(kind, shard, commit.attempt, tag)), b"")
    # Older stamps go once the new one is in; of the two data kinds only the one built now stays.
    family = ("data", "data-images") if kind.startswith("data") else (kind,)
    older = [k for f in family for k in list_prefix(out, stamps_of(f, shard))]
    delete(out, [k for k in older if k != stamp_key(kind, shard, commit.attempt, tag)])


def publish(out: str, shard: int, derived: Derived, rounds: int = 5) -> int | None:
    """Build a committed shard's files from its latest committed attempt, then remove what older
    attempts and killed runs left of it. Returns the attempt published (None: not committed)."""
    for _ in range(rounds):
        commit = latest_commit(out, shard)
        if commit is None:
            return None
        try:
            table = None
            if derived.kinds() != ("data",):
                table = read_table(out, commit)
            for kind in derived.kinds():
                _build(out, kind, commit, table)
        except FileNotFoundError:
            continue  # a newer attempt's cleanup took this one's files: publish that one
        now = latest_commit(out, shard)
        if now is not None and now.attempt == commit.attempt:
            clean(out, commit)
            return commit.attempt
        # superseded while writing: our files may have replaced the newer ones; go again
    raise RuntimeError(f"{out}: shard {shard} kept being superseded while publishing; run again to finish it")


def write_schema(out: str, kept: pa.Schema, derived: Derived) -> None:
    """data/schema.parquet: the output's columns as its shards are published (the kept input
    columns, and the image column where embedded), with no rows."""
    schema = output_schema(kept)
    if derived.embed_images:
        schema = image_schema(schema)
    buf = pa.BufferOutputStream()
    pq.ParquetWriter(buf, schema).close()  # no row group at all: `datasets` refuses one of 0 rows
    write_bytes(join(out, SCHEMA), buf.getvalue().to_pybytes())


def write_index(out: str, commits: dict[int, Commit], derived: Derived) -> dict[str, Any]:
    """index.json: every published shard, its data file and the counts of the attempt that file
    holds (an older attempt's while a retry's commit is being published). It names only files
    that exist and are whole."""
    kind = derived.kinds()[0]
    have = published(out)
    shards = []
    for shard in sorted(commits):
        attempt = have.get((kind, shard))
        if attempt is None:
            continue
        c = commits[shard]
        if attempt != c.attempt:
            try:
                c = read_marker(join(out, marker_key(shard, attempt)))
            except RuntimeError:
                continue
        shards.append(
            {"shard": shard, "attempt": attempt, "data": data_key(shard), "rows": c.rows, "ok": c.ok, "error": c.error}
        )
    index = {
        "data": DATA_GLOB,
        "shards": shards,
        "rows": sum(s["rows"] for s in shards),
        "ok": sum(s["ok"] for s in shards),
        "error": sum(s["error"] for s in shards),
    }
    write_bytes(join(out, INDEX), json.dumps(index, indent=1).encode())
    return index


def finish_output(out: str, derived: Derived, submit=None) -> dict[str, Any]:
    """After a run: publish the shards whose files a kill left missing or a retry made stale
    (through `submit`, a Ray task launcher, where given), clean every committed shard, build the
    job's contact sheet, and write index.json. Returns the index."""
    commits = list_commits(out)
    todo = stale(out, commits, derived)
    if todo:
        log.info("publishing %d committed shard(s) whose files are missing or stale", len(todo))
        if submit is not None:
            submit(out, todo, derived)
        else:
            for shard in todo:
                publish(out, shard, derived)
        commits = list_commits(out)
    clean_all(out, commits)
    if derived.contact_sheets and commits:
        write_job_sheet(out, commits)
    return write_index(out, commits, derived)
