"""Column names shared by the reader, the stage actors, the writer and the driver, and the schema
of the output's metadata Parquet. Torch-free."""

from __future__ import annotations

import pyarrow as pa

from workers.overrides import OVERRIDE_COLUMNS, STAGE_PREFIXES
from workers.stages import MODEL_STAGES

# The input columns ifrender reads (under these names, or those input.columns maps them to);
# any column named with a stage's prefix is a per-row setting too. Every other input column is
# kept beside its image (input.keep_columns).
INPUT_COLUMNS = ("prompt", "negative_prompt", "seed", "id", "image", "mask_image") + OVERRIDE_COLUMNS

# A row's status: "ok" or "error" in every committed file. UNWRITTEN lives only between the writer
# and the driver: the row's image could not be stored for a reason of the storage's (a full disk,
# a permission), so its shard is not committed and the run stops (jobs/run/assemble.py).
UNWRITTEN = "unwritten"

# Columns every row carries from the reader to the writer.
ROW_COLUMNS = ("id", "prompt", "negative_prompt", "seed", "status", "error")

# What each stage records per row: <stage>_model, <stage>_params (its effective settings as
# JSON), busy seconds, and the wall-clock start and end of the call that rendered the row.
STAGE_RECORD = (
    ("model", pa.string()),
    ("params", pa.string()),
    ("seconds", pa.float64()),
    ("started", pa.float64()),
    ("finished", pa.float64()),
)

METADATA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("prompt_tokens", pa.int32()),  # T5 tokens of the prompt (after IF's caption cleaning, if on)
        ("prompt_truncated", pa.bool_()),  # over T5's window: the model saw only its first tokens
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
        ("nsfw_score", pa.float32()),  # IF's safety checker's NSFW head, the value its threshold applies to
        ("watermark_score", pa.float32()),  # its watermark head, likewise
        ("clip_score", pa.float32()),  # the score stage: torchmetrics' CLIPScore of image and prompt, 0-100
        ("aesthetic_score", pa.float32()),  # the score stage: LAION's aesthetic predictor v2, about 1-10
        ("clip_embedding", pa.list_(pa.float16())),  # the score stage with score.embeddings: L2-normalised
        ("watermarked", pa.bool_()),
        ("phash", pa.string()),  # 64-bit perceptual hash of the image file, 16 hex digits (imagehash)
        ("c2pa", pa.string()),  # the label of the C2PA manifest signed into the file (output.c2pa), or null
        ("shard", pa.int64()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
    ]
    + [(f"{s}_{k}", t) for s in MODEL_STAGES for k, t in STAGE_RECORD]
    + [("write_seconds", pa.float64())]
)
# The row's kept input columns between the reader and the commit: one Arrow IPC stream per row,
# so every Arrow type (float16, timestamps, structs) arrives as it was read.
KEPT = "kept"
NO_COLUMNS = pa.schema([])  # an input with nothing kept


def is_setting(name: str) -> bool:
    """Whether an input column is one ifrender reads as a per-row setting."""
    return name in OVERRIDE_COLUMNS or name.startswith(STAGE_PREFIXES)


def output_schema(kept: pa.Schema) -> pa.Schema:
    """The output's metadata schema: ifrender's columns, then the input's kept columns."""
    return pa.schema(list(METADATA_SCHEMA) + list(kept))


def encode_kept(row: pa.Table) -> bytes:
    """One row of kept columns as bytes; b"" for no columns."""
    if not row.num_columns:
        return b""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, row.schema) as writer:
        writer.write_table(row.combine_chunks())
    return sink.getvalue().to_pybytes()


def decode_kept(values: list[bytes | None], kept: pa.Schema) -> pa.Table:
    """Rows of kept columns from their bytes; a row without any (an unreadable record) is nulls."""
    nulls = pa.table({f.name: pa.nulls(1, f.type) for f in kept}, schema=kept)
    tables = [pa.ipc.open_stream(v).read_all() if v else nulls for v in values]
    if not tables:
        return kept.empty_table()
    return pa.concat_tables([t.cast(kept) for t in tables]).combine_chunks()


# Fields of a failed row that describe an image it does not have: left null.
IMAGE_FIELDS = ("image_key", "sha256", "width", "height", "phash", "c2pa")
# Per image; null where the scorer did not run (NaN in a batch).
SCORES = ("clip_score", "aesthetic_score", "nsfw_score", "watermark_score")
