"""Formats users load directly, built from a committed attempt's metadata and its stored image
files: Parquet with a `datasets` Image column, and WebDataset tars. Each streams to a local file
a few images at a time (then one atomic rename, or a multipart upload on S3), so neither the
shard's size nor its images' size decides the memory it takes. Both use their own libraries
(`datasets`, `webdataset`: the `formats` extra), checked before any model work.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from workers.columns import METADATA_SCHEMA, SCORES
from workers.errors import ManifestError
from workers.stages import MODEL_STAGES
from workers.storage import join, local_output, read_bytes

# Per-row fields a WebDataset sample's KEY.json carries.
SAMPLE_FIELDS = (
    ("id", "row", "prompt", "negative_prompt", "seed", "width", "height", "sha256", "phash")
    + SCORES
    + tuple(f"{s}_{k}" for s in MODEL_STAGES for k in ("model", "params"))
)
# Output option -> the package it needs.
PACKAGES = {"embed_images": "datasets", "webdataset": "webdataset"}
CHUNK = 32  # rows whose images are in memory at once; also the embedded Parquet's row group


def check_packages(output) -> None:
    """An output format asked for without its package fails now, not at the first commit."""
    import importlib.util

    for option, package in PACKAGES.items():
        if getattr(output, option) and importlib.util.find_spec(package) is None:
            raise ManifestError(
                f"output.{option}: true needs the {package} package, which is not installed. "
                f"Fix: pip install 'ifrender[formats]', or set output.{option}: false."
            )


def image_schema(schema: pa.Schema) -> pa.Schema:
    """The output's schema plus `image` as a Hugging Face datasets Image feature (struct {bytes,
    path}), declared in the schema's `huggingface` metadata so load_dataset decodes PIL images."""
    import datasets

    features = datasets.Features.from_arrow_schema(schema)
    features["image"] = datasets.Image()
    return features.arrow_schema


def _with_images(out: str, rows: list[dict]) -> Iterator[tuple[list[dict], list[bytes | None]]]:
    """Rows CHUNK at a time with their images' bytes read back from storage (None for failures)."""
    for i in range(0, len(rows), CHUNK):
        chunk = rows[i : i + CHUNK]
        yield chunk, [read_bytes(join(out, r["image_key"])) if r["image_key"] else None for r in chunk]


def write_embedded(out: str, table: pa.Table, uri: str) -> None:
    """The shard's metadata as Parquet with its image bytes in an `image` column, one row group per chunk."""
    schema = image_schema(table.schema.remove_metadata())
    with local_output(uri) as path, pq.ParquetWriter(path, schema) as writer:
        if not table.num_rows:
            writer.write_table(schema.empty_table())
        for start in range(0, table.num_rows, CHUNK):
            chunk = table.slice(start, CHUNK)
            keys = chunk.column("image_key").to_pylist()
            images = [read_bytes(join(out, k)) if k else None for k in keys]
            column = [{"bytes": b, "path": k} if b is not None else None for k, b in zip(keys, images)]
            chunk = chunk.append_column(schema.field("image"), pa.array(column, type=schema.field("image").type))
            writer.write_table(chunk.cast(schema))


def sample(row: dict) -> dict:
    """A WebDataset sample's JSON: SAMPLE_FIELDS, then the row's kept input columns."""
    return {f: row.get(f) for f in SAMPLE_FIELDS} | {k: v for k, v in row.items() if k not in METADATA_SCHEMA.names}


def _json_value(value: Any) -> Any:
    """Kept values JSON has no type for: times as ISO 8601, decimals as text, bytes as base64."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if hasattr(value, "item"):  # numpy scalars (float16)
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_tar(out: str, rows: list[dict], uri: str) -> None:
    """The successful rows as KEY.<ext>, KEY.txt (prompt), KEY.json; KEY is the global row index,
    zero-padded, as WebDataset keys must not hold dots. Failures stay in the Parquet only."""
    import webdataset

    ok = [r for r in rows if r["status"] == "ok"]
    with local_output(uri) as path, open(path, "wb") as f, webdataset.TarWriter(f, mtime=0) as tar:
        for chunk, images in _with_images(out, ok):
            for r, data in zip(chunk, images):
                if data is None:
                    raise FileNotFoundError(f"{join(out, r['image_key'])}: the image of committed row {r['row']}")
                index = r.get("image_index") or 0
                tar.write(
                    {
                        "__key__": f"{r['row']:09d}" + (f"_{index:02d}" if index else ""),
                        r["image_key"].rsplit(".", 1)[-1]: data,
                        "txt": r["prompt"],
                        "json": json.dumps(sample(r), default=_json_value).encode(),
                    }
                )
