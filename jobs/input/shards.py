"""The shard plan: the input's files in, `Shard`s out (the unit of reading, commit and resume).

The plan pass streams each file once, keeping only shard boundaries (byte offsets for line
formats, row offsets for Parquet), so the input is never held in memory and every row gets a
stable global index however Ray later splits the work. jobs/input/rows.py reads each shard's rows.
"""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.input.columns import Columns, FileColumns, JsonTypes, check_file, plan_columns
from jobs.input.records import Record, records, tsv_fields
from jobs.input.tables import HASH_ROWS, arrow_batches, arrow_schema, row_digests
from jobs.manifest import InputConfig
from workers.errors import InputError, StorageError
from workers.reach import check_reachable
from workers.storage import is_s3, resolve

EXTENSIONS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".feather": "arrow",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "text",
    ".text": "text",
}
# What a directory input reads by default, per format: data files only. `.json` is left out, as a
# directory's .json files are usually metadata (dataset_info.json); name them with input.pattern.
PATTERNS = {
    "parquet": ("*.parquet",),
    "arrow": ("*.arrow", "*.feather"),
    "jsonl": ("*.jsonl", "*.ndjson"),
    "csv": ("*.csv",),
    "tsv": ("*.tsv",),
    "text": ("*.txt", "*.text"),
}
TABLES = ("parquet", "arrow")  # formats read as Arrow tables, by row offsets; the others by byte ranges
HEADED = ("csv", "tsv")  # formats whose first record names the columns
# Documentation beside the data, never read as prompts unless input.pattern names it.
NOT_DATA = ("readme*", "license*", "changelog*", "notice*")


@dataclass(frozen=True)
class Shard:
    index: int
    uri: str  # file, as a local path or s3:// URI
    format: str
    first_row: int  # global index of the shard's first row
    num_rows: int
    start: int  # byte offset (line formats) or row offset in the file (parquet, arrow)
    end: int  # byte offset one past the shard (line formats); unused for parquet and arrow
    first_line: int  # 1-based line number of the first row (line formats), else row offset
    header: str = ""  # the CSV or TSV header's fields, as JSON
    sha256: str = ""  # of the shard's records (and header), or of its table rows' values (row_digests)
    only_rows: tuple[int, ...] = ()  # item keys to read (a retry of failed outputs); () = all
    whole_rows: tuple[int, ...] = ()  # global rows to read with all their images (a retry of read failures)
    # Arrow: where the record batch holding the shard's first row starts (its index in an IPC
    # file, its byte offset in an IPC stream), and the file row it starts with.
    batch: int = 0
    batch_row: int = 0

    def fingerprint(self) -> dict[str, Any]:
        """What a commit records of the input it covered: file, rows and a hash of them."""
        found = {"file": self.uri, "first_row": self.first_row, "rows": self.num_rows, "sha256": self.sha256}
        # A Parquet shard's sha256 was once of its row groups' metadata: `hashed` tells the two apart.
        return found | ({"hashed": "rows"} if self.format in TABLES else {})

    @property
    def todo(self) -> int:
        """What a run of this shard reads: its rows, or on a retry the outputs and rows retried."""
        retried = len(self.only_rows) + len(self.whole_rows)
        return retried or self.num_rows


def _format_of(uri: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = uri.rsplit("/", 1)[-1].lower()
    for ext, found in EXTENSIONS.items():
        if name.endswith(ext):
            return found
    raise InputError(
        f"input.path {uri}: cannot tell the format from the extension. "
        f"Expected one of {sorted(EXTENSIONS)}, or set input.format."
    )


def _data_files(cfg: InputConfig, root: str, files: list[str]) -> list[str]:
    """A directory's files that hold prompts: those matching input.pattern, else those with the
    chosen format's extensions (any data format's, with auto), documentation files left out."""
    names = {f: f[len(root) :].lstrip("/") for f in files}
    if cfg.pattern:
        return [f for f in files if fnmatch.fnmatch(names[f], cfg.pattern)]
    patterns = PATTERNS[cfg.format] if cfg.format != "auto" else [p for ps in PATTERNS.values() for p in ps]
    found = []
    for f in files:
        base = names[f].rsplit("/", 1)[-1].lower()
        if any(fnmatch.fnmatch(base, p) for p in patterns) and not any(fnmatch.fnmatch(base, n) for n in NOT_DATA):
            found.append(f)
    return found


def list_files(cfg: InputConfig) -> list[tuple[str, str]]:
    """[(uri, format)] of the input: the file itself, or a directory's data files in name order."""
    fs, path = resolve(cfg.path)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory or (is_s3(cfg.path) and info.type == pafs.FileType.NotFound):
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            every = sorted(
                i.path for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))
            )
            files = _data_files(cfg, path, every)
            if every and not files:
                raise InputError(
                    f"input.path {cfg.path}: none of its {len(every)} files is a data file (found e.g. "
                    f"{[f[len(path) :].lstrip('/') for f in every[:5]]}). Expected {', '.join(sorted(EXTENSIONS))} "
                    f"files. Fix: set input.pattern to the data files' names, e.g. '*.json'."
                )
        elif info.type == pafs.FileType.File:
            files = [path]
        else:
            files = []
    except OSError as err:
        raise StorageError(f"input.path {cfg.path}: cannot be read ({err})") from err
    if not files:
        raise InputError(
            f"input.path {cfg.path}: no such file, or a directory with no files. "
            f"Expected a prompt file ({', '.join(sorted(EXTENSIONS))}) or a directory of them."
        )
    prefix = "s3://" if is_s3(cfg.path) else ""
    return [(prefix + f, _format_of(prefix + f, cfg.format)) for f in files]


@dataclass
class InputPlan:
    """The input planned: its shards, and its columns (what is read, kept, and how)."""

    shards: list[Shard]
    columns: Columns


def plan_input(cfg: InputConfig) -> InputPlan:
    """Every file streamed once: shard boundaries and fingerprints, and each file's columns."""
    shards: list[Shard] = []
    files: list[FileColumns] = []
    keep = cfg.keep_columns
    json_types, json_files = JsonTypes(None if keep == "all" else set(keep) if keep != "none" else set()), []
    total = 0
    check_reachable(cfg.path, "input.path")
    for uri, fmt in list_files(cfg):
        fs, path = resolve(uri)
        if fmt in TABLES:
            try:
                total += _plan_table(cfg, uri, fmt, fs.open_input_file(path), total, shards, files)
            except (pa.ArrowException, OSError) as err:
                size = fs.get_file_info(path).size
                raise InputError(
                    f"{uri}: not a readable {'Parquet' if fmt == 'parquet' else 'Arrow IPC'} file ({size} bytes: "
                    f"{str(err).rstrip('.')}). Expected a whole {fmt} file. Fix: write or upload it again (a 0-byte or cut-off "
                    f"file is an interrupted upload), or leave it out with input.pattern."
                ) from err
            continue
        with fs.open_input_stream(path) as stream:
            count, header, keys = _plan_lines(cfg, uri, fmt, stream, total, shards, json_types)
        if fmt in HEADED:
            files.append(FileColumns(uri, fmt, dict.fromkeys(header or [], pa.string())))
        elif fmt == "text":
            files.append(FileColumns(uri, fmt, {"prompt": pa.string()}))
        else:
            json_files.append((uri, list(keys)))
            if count:  # a file of only bad lines is its rows' errors, not the job's
                check_file(cfg, FileColumns(uri, fmt, dict.fromkeys(keys, pa.string())))
        total += count
    if total == 0:
        raise InputError(f"input.path {cfg.path}: the dataset has no rows. Expected at least one prompt.")
    types, text = json_types.types()
    files += [FileColumns(uri, "jsonl", {k: types[k] for k in names}, text & set(names)) for uri, names in json_files]
    return InputPlan(shards, plan_columns(cfg, files))


def plan_shards(cfg: InputConfig) -> list[Shard]:
    return plan_input(cfg).shards


def _plan_lines(
    cfg: InputConfig, uri: str, fmt: str, stream: Any, total: int, shards: list[Shard], json_types: JsonTypes
) -> tuple[int, list[str] | None, list[str]]:
    """Plan one line-format file: its shards (by byte ranges), read once. Returns its rows, its
    header (CSV, TSV) and its JSON keys (JSONL); JSONL records feed `json_types`."""
    header: list[str] | None = None
    keys: dict[str, None] = {}
    boundary: tuple[int, int] | None = None  # (byte, line) where the open shard starts
    count, end = 0, 0
    digest = hashlib.sha256()

    def close(n: int) -> None:
        shards.append(
            Shard(len(shards), uri, fmt, total + count - n, n, boundary[0], end, boundary[1],
                  json.dumps(header) if header is not None else "", digest.hexdigest())
        )  # fmt: skip

    for record in records(stream, fmt, max_bytes=cfg.max_record_bytes):
        end = record.end
        if fmt in HEADED and header is None:
            header = _header(uri, fmt, record)
            check_file(cfg, FileColumns(uri, fmt, dict.fromkeys(header, pa.string())))
            continue
        if fmt == "jsonl" and (value := _json_object(record.value)) is not None:
            keys.update(dict.fromkeys(value))
            json_types.add(value)
        if boundary is None:
            boundary = (record.start, record.line)
            # The header is part of every shard's fingerprint: a renamed column changes them all.
            digest = hashlib.sha256(json.dumps(header).encode() if header is not None else b"")
        digest.update(record.raw)
        count += 1
        if count % cfg.shard_size == 0:
            close(cfg.shard_size)
            boundary = None
    if boundary is not None:
        close(count % cfg.shard_size)
    return count, header, list(keys)


def _plan_table(
    cfg: InputConfig, uri: str, fmt: str, f: Any, total: int, shards: list[Shard], files: list[FileColumns]
) -> int:
    """Plan one Parquet or Arrow file: its shards (by row offsets) and its columns. Returns its rows."""
    where: list[tuple[int, int]] = []  # (Shard.batch, first row) of each record batch
    if fmt == "parquet":
        parquet = pq.ParquetFile(f)
        schema = parquet.schema_arrow
        check_file(cfg, FileColumns(uri, fmt, dict(zip(schema.names, schema.types))))
        digests = row_digests(parquet.iter_batches(batch_size=HASH_ROWS), cfg.shard_size)
        rows = parquet.metadata.num_rows
    else:
        schema = arrow_schema(f)
        check_file(cfg, FileColumns(uri, fmt, dict(zip(schema.names, schema.types))))
        counted = [0]

        def batches() -> Iterator[pa.RecordBatch]:
            for at, first, batch in arrow_batches(f):
                where.append((at, first))
                counted[0] = first + batch.num_rows
                yield batch

        digests = row_digests(batches(), cfg.shard_size)
        rows = counted[0]
    files.append(FileColumns(uri, fmt, dict(zip(schema.names, schema.types))))
    firsts = [r for _, r in where]
    for start, digest in zip(range(0, rows, cfg.shard_size), digests):
        n = min(cfg.shard_size, rows - start)
        i = bisect.bisect_right(firsts, start) - 1  # the last batch starting at or before the shard
        batch, batch_row = where[i] if i >= 0 else (0, 0)
        shards.append(Shard(len(shards), uri, fmt, total + start, n, start, 0, start, sha256=digest,
                            batch=batch, batch_row=batch_row))  # fmt: skip
    return rows


def _header(uri: str, fmt: str, record: Record) -> list[str]:
    if record.problem:
        raise InputError(f"{uri}: the {fmt.upper()} header cannot be read ({record.problem})")
    if fmt == "csv":
        return list(record.value)
    try:
        return tsv_fields(record.value)
    except UnicodeError as err:
        raise InputError(f"{uri}: the TSV header is not UTF-8 ({err}); expected UTF-8 text") from err


def _json_object(raw: bytes) -> dict | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def shard_items(shards: list[Shard]) -> list[dict[str, Any]]:
    """Shards as the rows of the dataset the read tasks start from."""
    return [asdict(s) for s in shards]
