"""The shard plan: the input's files in, `Shard`s out (the unit of reading, commit and resume).

The plan pass streams each file once, keeping only shard boundaries (byte offsets for line
formats, row offsets for Parquet), so the input is never held in memory and every row gets a
stable global index however Ray later splits the work. jobs/input/rows.py reads each shard's rows.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
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
# What a directory input reads by default, per format: data files only. `.json` is left out, as a
# directory's .json files are usually metadata (dataset_info.json); name them with input.pattern.
PATTERNS = {"parquet": ("*.parquet",), "jsonl": ("*.jsonl", "*.ndjson"), "csv": ("*.csv",), "text": ("*.txt", "*.text")}
# Documentation beside the data, never read as prompts unless input.pattern names it.
NOT_DATA = ("readme*", "license*", "changelog*", "notice*")
BOM = b"\xef\xbb\xbf"


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
    header: str = ""  # the CSV header's fields, as JSON
    sha256: str = ""  # of the shard's records (and CSV header), or of its Parquet rows' values (row_digests)
    only_rows: tuple[int, ...] = ()  # item keys to read (a retry of failed outputs); () = all
    whole_rows: tuple[int, ...] = ()  # global rows to read with all their images (a retry of read failures)

    def fingerprint(self) -> dict[str, Any]:
        """What a commit records of the input it covered: file, rows and a hash of them."""
        found = {"file": self.uri, "first_row": self.first_row, "rows": self.num_rows, "sha256": self.sha256}
        # A Parquet shard's sha256 was once of its row groups' metadata: `hashed` tells the two apart.
        return found | ({"hashed": "rows"} if self.format == "parquet" else {})

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
            f"Expected a prompt file (.parquet, .jsonl, .csv, .txt) or a directory of them."
        )
    prefix = "s3://" if is_s3(cfg.path) else ""
    return [(prefix + f, _format_of(prefix + f, cfg.format)) for f in files]


_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)")


def lines(stream: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream, each with its ending (LF, CRLF or a lone CR), read in chunks."""
    rest = b""
    while True:
        data = stream.read(chunk)
        if not data:
            break
        rest += data
        # A CR at the end of the buffer may be the first half of a CRLF: keep it for the next chunk.
        end, pos = len(rest) - rest.endswith(b"\r"), 0
        for match in _LINE.finditer(rest, 0, end):
            yield match.group()
            pos = match.end()
        rest = rest[pos:]
    if rest:
        yield rest


@dataclass(frozen=True)
class Record:
    start: int  # byte offset of the record in its file
    end: int  # byte offset one past it
    line: int  # 1-based line number where it starts
    value: bytes | list[str]  # a text or JSONL line; a CSV record's fields
    problem: str = ""  # a CSV record the csv module could not parse
    raw: bytes = b""  # the record's bytes, for the shard's fingerprint


def records(stream: Any, fmt: str, offset: int = 0, first_line: int = 1, max_bytes: int = 1 << 20) -> Iterator[Record]:
    """Each non-blank record of a line format, with where it lies. CSV goes through the csv
    module (quotes inside unquoted fields, quoted newlines, any line ending); a UTF-8 BOM at the
    start of the file is skipped; a record over `max_bytes` is a problem, not a value."""
    state = {"offset": offset, "line": first_line - 1}
    consumed: list[bytes] = []  # the lines read since the last record
    too_big = f"longer than input.max_record_bytes={max_bytes}; expected shorter records, or raise the cap"

    def counted() -> Iterator[bytes]:
        for line in lines(stream):
            if state["offset"] == 0 and line.startswith(BOM):
                state["offset"] += len(BOM)
                line = line[len(BOM) :]
            state["offset"] += len(line)
            state["line"] += 1
            consumed.append(line)
            yield line

    if fmt != "csv":
        for line in counted():
            consumed.clear()
            if len(line) > max_bytes:
                yield Record(
                    state["offset"] - len(line), state["offset"], state["line"], b"", f"a line {too_big}", line
                )
            elif line.strip():
                yield Record(state["offset"] - len(line), state["offset"], state["line"], line, raw=line)
        return
    csv.field_size_limit(max_bytes)  # one field may hold the whole record
    # The csv module reads text: bytes that are not UTF-8 pass through as surrogates, so byte
    # offsets stay exact and the read task can name the row.
    reader = csv.reader(line.decode("utf-8", "surrogateescape") for line in counted())
    while True:
        start, line = state["offset"], state["line"] + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            yield Record(start, state["offset"], line, [], f"line {line}: not a CSV record ({err})", b"".join(consumed))
            continue
        finally:
            raw = b"".join(consumed)
            consumed.clear()
        if state["offset"] - start > max_bytes:
            yield Record(start, state["offset"], line, [], f"a CSV record {too_big}", raw)
        elif any(f.strip() for f in fields):
            yield Record(start, state["offset"], line, fields, raw=raw)


def _check_columns(uri: str, found: list[str]) -> None:
    if "prompt" not in found:
        raise InputError(
            f"{uri}: no 'prompt' column. Expected a column named prompt "
            f"(optional: id, negative_prompt, seed, image, mask_image, num_images and per-row settings "
            f"such as stage1_guidance_scale); found {found[:20]}."
        )


HASH_ROWS = 256  # rows hashed at a time: the memory a Parquet fingerprint takes, whatever the row groups


def row_digests(parquet: pq.ParquetFile, shard_size: int) -> list[str]:
    """A SHA-256 per shard of a Parquet file: of its rows' decoded values, every column, in
    pieces of HASH_ROWS rows counted from the shard's start. The same rows give the same digest
    however the file's row groups, pages and compression fall; an edit of one value anywhere, or
    rows in another order, change it. One streaming pass over the file."""
    digests, digest = [], hashlib.sha256()
    piece: list[pa.RecordBatch] = []
    in_piece = in_shard = 0

    def hash_piece() -> None:
        nonlocal piece, in_piece
        if in_piece:
            table = pa.Table.from_batches(piece)
            # Copied into fresh buffers (take): a slice's serialised padding can hold its neighbours' bytes.
            table = table.take(pa.array(range(in_piece))).combine_chunks()
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            digest.update(sink.getvalue())
        piece, in_piece = [], 0

    for batch in parquet.iter_batches(batch_size=HASH_ROWS):
        start = 0
        while start < batch.num_rows:
            part = batch.slice(start, min(HASH_ROWS - in_piece, shard_size - in_shard))
            piece.append(part)
            start, in_piece, in_shard = start + part.num_rows, in_piece + part.num_rows, in_shard + part.num_rows
            if in_piece == HASH_ROWS or in_shard == shard_size:
                hash_piece()
            if in_shard == shard_size:
                digests.append(digest.hexdigest())
                digest, in_shard = hashlib.sha256(), 0
    hash_piece()
    if in_shard:
        digests.append(digest.hexdigest())
    return digests


def plan_shards(cfg: InputConfig) -> list[Shard]:
    shards: list[Shard] = []
    total = 0
    for uri, fmt in list_files(cfg):
        fs, path = resolve(uri)
        if fmt == "parquet":
            parquet = pq.ParquetFile(fs.open_input_file(path))
            meta = parquet.metadata
            _check_columns(uri, meta.schema.to_arrow_schema().names)
            digests = row_digests(parquet, cfg.shard_size)
            for start, digest in zip(range(0, meta.num_rows, cfg.shard_size), digests):
                n = min(cfg.shard_size, meta.num_rows - start)
                shards.append(Shard(len(shards), uri, fmt, total + start, n, start, 0, start, sha256=digest))
            total += meta.num_rows
            continue
        header, seen_prompt, sample = "", False, []
        boundary: tuple[int, int] | None = None  # (byte, line) where the open shard starts
        count, end = 0, 0
        digest = hashlib.sha256()
        with fs.open_input_stream(path) as stream:
            for record in records(stream, fmt, max_bytes=cfg.max_record_bytes):
                end = record.end
                if fmt == "csv" and not header:
                    if record.problem:
                        raise InputError(f"{uri}: the CSV header cannot be read ({record.problem})")
                    header = json.dumps(record.value)
                    _check_columns(uri, record.value)
                    continue
                if fmt == "jsonl" and not seen_prompt and len(sample) < 100:
                    sample.append(record.value)
                    seen_prompt = _has_prompt_key(record.value)
                if boundary is None:
                    boundary = (record.start, record.line)
                    digest = hashlib.sha256(header.encode())
                digest.update(record.raw)
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
                            digest.hexdigest(),
                        )
                    )
                    boundary = None
            if boundary is not None:
                n = count % cfg.shard_size
                shards.append(
                    Shard(
                        len(shards),
                        uri,
                        fmt,
                        total + count - n,
                        n,
                        boundary[0],
                        end,
                        boundary[1],
                        header,
                        digest.hexdigest(),
                    )
                )
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
