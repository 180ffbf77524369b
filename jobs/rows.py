"""Row reading: one shard in, its validated rows out, in a Ray read task (`read_shards`).

Each row is validated as it is read: a bad prompt, seed, setting or image becomes an error row
that names the problem, never an exception.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from jobs.shards import Shard, records
from workers.keys import derive_seed, item_key
from workers.overrides import OVERRIDE_COLUMNS, STAGE_PREFIXES, parse_overrides, row_mode
from workers.storage import read_bytes, resolve

COLUMNS = ("prompt", "negative_prompt", "seed", "id", "image", "mask_image") + OVERRIDE_COLUMNS
MAX_SEED = 2**63


def _raw_records(shard: Shard) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(source row, record dict or an error message) for each row of a shard."""
    fs, path = resolve(shard.uri)
    if shard.format == "parquet":
        pf = pq.ParquetFile(fs.open_input_file(path))
        columns = [c for c in pf.schema_arrow.names if c in COLUMNS or c.startswith(STAGE_PREFIXES)]
        stop, offset = shard.start + shard.num_rows, 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if offset + n > shard.start and offset < stop:
                table = pf.read_row_group(rg, columns=columns)
                lo, hi = max(shard.start - offset, 0), min(stop - offset, n)
                for i, rec in enumerate(table.slice(lo, hi - lo).to_pylist()):
                    yield offset + lo + i, rec
            offset += n
        return
    with fs.open_input_file(path) as f:
        f.seek(shard.start)
        data = f.read(shard.end - shard.start)
    header = next(csv.reader([shard.header])) if shard.format == "csv" else []
    for _, _, line_no, raw in records(io.BytesIO(data), shard.format):
        line = shard.first_line + line_no - 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield line, f"line {line} of {shard.uri} is not valid UTF-8 ({err}); expected UTF-8 text"
            continue
        if shard.format == "text":
            yield line, {"prompt": text.rstrip("\r\n")}
        elif shard.format == "jsonl":
            try:
                value = json.loads(text)
            except ValueError as err:
                yield line, f"line {line} of {shard.uri} is not valid JSON ({err})"
                continue
            yield (
                line,
                value
                if isinstance(value, dict)
                else f"line {line} of {shard.uri}: expected a JSON object, found {type(value).__name__}",
            )
        else:
            values = next(csv.reader([text]), [])
            yield line, {k: (v if v != "" else None) for k, v in zip(header, values)}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_seed(value: Any) -> int:
    """An integer seed in [0, 2**63); integral floats and integer strings (CSV) are accepted."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        value = int(value.strip())
    elif isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError
        value = int(value)
    elif not isinstance(value, (int, np.integer)):
        raise ValueError
    value = int(value)
    if not 0 <= value < MAX_SEED:
        raise ValueError
    return value


def load_image(field: str, value: Any, source: str) -> tuple[bytes | None, str]:
    """An init image or mask as encoded bytes, from bytes, a datasets Image struct, a local path
    (relative to the input file's directory) or an s3:// URI; (None, problem) when unusable."""
    from PIL import Image, UnidentifiedImageError

    where = "the row's bytes"
    if isinstance(value, dict):  # a datasets Image column: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        uri = value.strip()
        if "://" not in uri and not uri.startswith("/"):
            base = source.rsplit("/", 1)[0] if "/" in source else "."
            uri = f"{base}/{uri}"
        where = uri
        try:
            data = read_bytes(uri)
        except Exception as err:  # noqa: BLE001 - any unreadable location fails the row only
            return None, f"{field}: cannot read {uri} ({type(err).__name__}: {err})"
        if data is None:
            return None, f"{field}: {uri} not found; expected an image file (local path, s3:// URI) or bytes"
    else:
        return None, f"{field}: expected an image path, s3:// URI or bytes, found {_short(value)}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        return None, f"{field}: {where} is not a readable image ({err}); expected PNG, JPEG or WebP"
    return data, ""


def validate_row(record: dict[str, Any] | str, global_row: int, job_seed: int, source: str = "") -> dict[str, Any]:
    """One output row from one input record; problems go into `error`, never raised."""
    errors: list[str] = []
    if isinstance(record, str):
        errors.append(record)
        record = {}
    raw_id = record.get("id")
    row_id = str(raw_id) if raw_id is not None and str(raw_id) != "" else f"{global_row:09d}"

    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        if not errors:
            errors.append(f"prompt: expected non-empty text, found {_short(prompt)}")
    negative = record.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        errors.append(f"negative_prompt: expected text or null, found {_short(negative)}")

    seed = record.get("seed")
    if seed is None:
        seed_value = derive_seed(job_seed, row_id)
    else:
        try:
            seed_value = parse_seed(seed)
        except (ValueError, TypeError, OverflowError):
            errors.append(f"seed: expected an integer in [0, 2**63), found {_short(seed)}")
            seed_value = 0

    overrides, problems = parse_overrides(record)
    errors += problems
    images: dict[str, bytes | None] = {}
    for field in ("image", "mask_image"):
        value = record.get(field)
        images[field] = None
        if value is not None and value != "" and not errors:
            images[field], problem = load_image(field, value, source)
            if problem:
                errors.append(problem)
    if images["mask_image"] is not None and images["image"] is None and not errors:
        errors.append("mask_image: given without image; inpainting needs both (or drop the mask for img2img)")
    return {
        "id": row_id,
        "prompt": prompt if isinstance(prompt, str) else ("" if prompt is None else str(prompt)),
        "negative_prompt": negative if isinstance(negative, str) else "",
        "seed": seed_value,
        "status": "error" if errors else "ok",
        "error": "; ".join(errors),
        "overrides": json.dumps(overrides, sort_keys=True) if overrides else "",
        "image": images["image"],
        "mask_image": images["mask_image"],
        "mode": row_mode(images["image"], images["mask_image"]),
        "num_images": overrides.get("num_images"),
    }


def expand(row: dict[str, Any], num_images: int) -> list[dict[str, Any]]:
    """A row's outputs: num_images copies with ids ID-0, ID-1, ... and distinct seeds. Image 0
    keeps the row's seed, so raising num_images later keeps the first image as it was."""
    k = 1 if row["status"] != "ok" else (row.pop("num_images") or num_images)
    row.pop("num_images", None)
    if k == 1:
        return [row | {"image_index": 0}]
    return [
        row | {"id": f"{row['id']}-{i}", "seed": row["seed"] if i == 0 else derive_seed(row["seed"], f"image:{i}"),
               "image_index": i}
        for i in range(k)
    ]  # fmt: skip


def read_shards(batch: dict[str, np.ndarray], job_seed: int, num_images: int = 1) -> dict[str, np.ndarray]:
    """Ray map_batches UDF: a batch of shard descriptions in, their validated rows out (a row
    with num_images > 1 becomes that many output rows)."""
    rows = []
    for i in range(len(batch["index"])):
        fields = {k: _plain(batch[k][i]) for k in Shard.__dataclass_fields__}
        fields["only_rows"] = tuple(int(r) for r in fields["only_rows"])
        shard = Shard(**fields)
        wanted = set(shard.only_rows)
        first_seen: dict[str, int] = {}
        shard_rows = []
        for n, (source_row, record) in enumerate(_raw_records(shard)):
            global_row = shard.first_row + n
            for row in expand(validate_row(record, global_row, job_seed, shard.uri), num_images):
                # Two rows with one id would share an image: the later one fails, the earlier renders.
                earlier = first_seen.setdefault(row["id"], global_row)
                if earlier != global_row and row["status"] == "ok":
                    row["status"] = "error"
                    row["error"] = f"id: {_short(row['id'])} is also the id of row {earlier}; ids must be unique"
                item = item_key(global_row, row["image_index"])
                if wanted and item not in wanted:
                    continue
                row.update(row=global_row, item=item, shard=shard.index, source_file=shard.uri, source_row=source_row)
                shard_rows.append(row)
        for row in shard_rows:
            row["shard_items"] = len(shard_rows)  # what the driver waits for before committing
        rows += shard_rows
    columns = list(rows[0]) if rows else []
    ints = ("seed", "row", "item", "shard", "source_row", "image_index", "shard_items")
    return {c: np.array([r[c] for r in rows], dtype=np.int64 if c in ints else object) for c in columns}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
