"""Line formats' bytes in, records out: text and JSONL lines, CSV records (the csv module) and
TSV records (the TSV media type: a tab between fields, no quoting), each with where it lies, so
the plan can cut shards at record boundaries and a read task can name a bad row's line."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

BOM = b"\xef\xbb\xbf"


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


def tsv_fields(line: bytes) -> list[str]:
    """A TSV record's fields, as the TSV media type defines them: a tab between fields, no quoting
    (a quote is text wherever it stands), the line ending not part of the last field."""
    return line.decode("utf-8").rstrip("\r\n").split("\t")
