"""Table formats in: Parquet and Arrow IPC (file or stream, the layout `datasets` saves) read by
record batch, and the row digests that fingerprint a table file's shards."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

HASH_ROWS = 256  # rows hashed at a time: the memory a table's fingerprint takes, whatever its row groups


def row_digests(batches: Iterable[pa.RecordBatch], shard_size: int) -> list[str]:
    """A SHA-256 per shard of a table file (Parquet, Arrow): of its rows' decoded values, every
    column, in pieces of HASH_ROWS rows counted from the shard's start. The same rows give the
    same digest however the file's row groups, batches, pages and compression fall; an edit of
    one value anywhere, or rows in another order, change it. One streaming pass over the file."""
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

    for batch in batches:
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


ARROW_MAGIC = b"ARROW1"  # opens an Arrow IPC file (Feather v2); an IPC stream starts without it


def arrow_batches(f: Any, batch: int = 0, batch_row: int = 0) -> Iterator[tuple[int, int, pa.RecordBatch]]:
    """(where, first row, batch) for each record batch of an Arrow IPC file or stream, from the
    batch at `batch` (its index in a file, its byte offset in a stream: Shard.batch), whose first
    row is `batch_row`. A stream with dictionary-encoded columns is read from its start, as its
    dictionaries come first."""
    f.seek(0)
    if f.read(len(ARROW_MAGIC)) == ARROW_MAGIC:
        reader = pa.ipc.open_file(f)
        for i in range(batch, reader.num_record_batches):
            found = reader.get_batch(i)
            yield i, batch_row, found
            batch_row += found.num_rows
        return
    f.seek(0)
    reader = pa.ipc.open_stream(f)
    if batch and not any(pa.types.is_dictionary(t) for t in reader.schema.types):
        f.seek(batch)
        while True:
            try:
                message = pa.ipc.read_message(f)
            except EOFError:
                return
            if message.type == "record batch":
                found = pa.ipc.read_record_batch(message, reader.schema)
                yield batch, batch_row, found
                batch_row += found.num_rows
            batch = f.tell()
    batch_row = 0
    while True:
        where = f.tell()
        try:
            found = reader.read_next_batch()
        except StopIteration:
            return
        yield where, batch_row, found
        batch_row += found.num_rows


def arrow_schema(f: Any) -> pa.Schema:
    f.seek(0)
    if f.read(len(ARROW_MAGIC)) == ARROW_MAGIC:
        return pa.ipc.open_file(f).schema
    f.seek(0)
    return pa.ipc.open_stream(f).schema
