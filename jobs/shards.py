"""The shard plan: the input's files in, `Shard`s out (the unit of reading, commit and resume).

The plan pass streams each file once, keeping only shard boundaries (byte offsets for line
formats, row offsets for Parquet), so the input is never held in memory and every row gets a
stable global index however Ray later splits the work. jobs/rows.py reads each shard's rows.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.manifest import InputConfig
from workers.errors import InputError, StorageError
from workers.storage import is_s3, resolve

EXTENSIONS = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".txt": "text",
    ".text": "text",
}


@dataclass(frozen=True)
class Shard:
    index: int
    uri: str  # file, as a local path or s3:// URI
    format: str
    first_row: int  # global index of the shard's first row
    num_rows: int
    start: int  # byte offset (text, jsonl, csv) or row offset in the file (parquet)
    end: int  # byte offset one past the shard (text, jsonl, csv); unused for parquet
    first_line: int  # 1-based line number of the first row (line formats), else row offset
    header: str = ""  # CSV header record
    only_rows: tuple[int, ...] = ()  # global indexes to read (a retry of failed rows); () = all


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


def list_files(cfg: InputConfig) -> list[tuple[str, str]]:
    """[(uri, format)] of the input: the file itself, or a directory's files in name order."""
    fs, path = resolve(cfg.path)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory or (is_s3(cfg.path) and info.type == pafs.FileType.NotFound):
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
            files = sorted(
                i.path for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))
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
            f"Expected a prompt file (.parquet, .jsonl, .csv, .txt) or a directory of them."
        )
    prefix = "s3://" if is_s3(cfg.path) else ""
    if cfg.format == "auto":
        files = [f for f in files if any(f.lower().endswith(e) for e in EXTENSIONS)] or files
    return [(prefix + f, _format_of(prefix + f, cfg.format)) for f in files]


def _lines(stream: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream, each with its line ending, read in chunks."""
    rest = b""
    while True:
        data = stream.read(chunk)
        if not data:
            break
        rest += data
        *lines, rest = rest.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def records(stream: Any, fmt: str) -> Iterator[tuple[int, int, int, bytes]]:
    """(start byte, end byte, line number, raw record) for each non-blank record of a line format.
    A CSV record ends where its double quotes balance, so quoted newlines stay inside."""
    offset, line_no = 0, 0
    pending, pending_start, pending_line, quotes = b"", 0, 0, 0
    for line in _lines(stream):
        start = offset
        offset += len(line)
        line_no += 1
        if fmt == "csv":
            if not pending:
                pending_start, pending_line = start, line_no
            pending += line
            quotes += line.count(b'"')
            if quotes % 2:
                continue
            record, pending, quotes = pending, b"", 0
            if record.strip():
                yield pending_start, offset, pending_line, record
        elif line.strip():
            yield start, offset, line_no, line
    if pending.strip():
        yield pending_start, offset, pending_line, pending


def _check_columns(uri: str, found: list[str]) -> None:
    if "prompt" not in found:
        raise InputError(
            f"{uri}: no 'prompt' column. Expected a column named prompt "
            f"(optional: id, negative_prompt, seed, image, mask_image, num_images and per-row settings "
            f"such as stage1_guidance_scale); found {found[:20]}."
        )


def plan_shards(cfg: InputConfig) -> list[Shard]:
    shards: list[Shard] = []
    total = 0
    for uri, fmt in list_files(cfg):
        fs, path = resolve(uri)
        if fmt == "parquet":
            meta = pq.ParquetFile(fs.open_input_file(path)).metadata
            _check_columns(uri, meta.schema.to_arrow_schema().names)
            for start in range(0, meta.num_rows, cfg.shard_size):
                n = min(cfg.shard_size, meta.num_rows - start)
                shards.append(Shard(len(shards), uri, fmt, total + start, n, start, 0, start))
            total += meta.num_rows
            continue
        header, seen_prompt, sample = "", False, []
        boundary: tuple[int, int] | None = None  # (byte, line) where the open shard starts
        count = 0
        with fs.open_input_stream(path) as stream:
            for start, end, line_no, raw in records(stream, fmt):
                if fmt == "csv" and not header:
                    header = raw.decode("utf-8", errors="replace")
                    _check_columns(uri, next(csv.reader([header])))
                    continue
                if fmt == "jsonl" and not seen_prompt and len(sample) < 100:
                    sample.append(raw)
                    seen_prompt = _has_prompt_key(raw)
                if boundary is None:
                    boundary = (start, line_no)
                count += 1
                if count % cfg.shard_size == 0:
                    shards.append(
                        Shard(
                            len(shards),
                            uri,
                            fmt,
                            total + count - cfg.shard_size,
                            cfg.shard_size,
                            boundary[0],
                            end,
                            boundary[1],
                            header,
                        )
                    )
                    boundary = None
            if boundary is not None:
                n = count % cfg.shard_size
                shards.append(Shard(len(shards), uri, fmt, total + count - n, n, boundary[0], end, boundary[1], header))
        if fmt == "jsonl" and sample and not seen_prompt:
            keys = sorted({k for raw in sample for k in _json_keys(raw)})
            _check_columns(uri, keys)
        total += count
    if total == 0:
        raise InputError(f"input.path {cfg.path}: the dataset has no rows. Expected at least one prompt.")
    return shards


def _json_keys(raw: bytes) -> list[str]:
    try:
        value = json.loads(raw)
    except ValueError:
        return []
    return list(value) if isinstance(value, dict) else []


def _has_prompt_key(raw: bytes) -> bool:
    return "prompt" in _json_keys(raw)


def shard_items(shards: list[Shard]) -> list[dict[str, Any]]:
    """Shards as the rows of the dataset the read tasks start from."""
    return [asdict(s) for s in shards]
