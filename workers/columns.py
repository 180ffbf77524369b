"""Column names shared by the reader, the stage actors, the writer and the driver, and the schema
of the output's metadata Parquet. Torch-free."""

from __future__ import annotations

import pyarrow as pa

from workers.stages import MODEL_STAGES

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
    + [(f"{s}_{k}", t) for s in MODEL_STAGES for k, t in STAGE_RECORD]
    + [("write_seconds", pa.float64())]
)
# Fields of a failed row that describe an image it does not have: left null.
IMAGE_FIELDS = ("image_key", "sha256", "width", "height")
