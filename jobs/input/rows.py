"""Row reading: one shard in, its validated rows out, in a Ray read task (`read_shards`).

Each row is validated as it is read: a bad prompt, seed, setting or image becomes an error row
that names the problem, never an exception.
"""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from jobs.input.shards import Record, Shard, records
from jobs.manifest import InputConfig
from workers.keys import derive_seed, item_key
from workers.overrides import OVERRIDE_COLUMNS, STAGE_PREFIXES, parse_overrides, row_mode
from workers.sizes import NATIVE, JobSize, stage1_size
from workers.storage import bucket_key, is_s3, object_size, read_bytes, resolve

COLUMNS = ("prompt", "negative_prompt", "seed", "id", "image", "mask_image") + OVERRIDE_COLUMNS
MAX_SEED = 2**63
MAX_EXACT_FLOAT = 2**53  # floats above it skip integers: a seed there was rounded before it came


def _raw_records(shard: Shard, cfg: InputConfig) -> Iterator[tuple[int, dict[str, Any] | str]]:
    """(source row, record dict or an error message) for each row of a shard."""
    fs, path = resolve(shard.uri)
    if shard.format == "parquet":
        pf = pq.ParquetFile(fs.open_input_file(path))
        columns = [c for c in pf.schema_arrow.names if c in COLUMNS or c.startswith(STAGE_PREFIXES)]
        stop, offset = shard.start + shard.num_rows, 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if offset + n > shard.start and offset < stop:
                lo, hi = max(shard.start - offset, 0), min(stop - offset, n)
                try:
                    found = pf.read_row_group(rg, columns=columns).slice(lo, hi - lo).to_pylist()
                except Exception as err:  # noqa: BLE001 - a corrupt row group fails its rows, not the job
                    found = [f"row group {rg} of {shard.uri} cannot be read ({type(err).__name__}: {err})"] * (hi - lo)
                for i, rec in enumerate(found):
                    yield offset + lo + i, rec
            offset += n
        return
    with fs.open_input_file(path) as f:
        f.seek(shard.start)
        data = f.read(shard.end - shard.start)
    header = json.loads(shard.header) if shard.format == "csv" else []
    for record in records(io.BytesIO(data), shard.format, shard.start, shard.first_line, cfg.max_record_bytes):
        yield record.line, _parse_record(shard, header, record)


def _parse_record(shard: Shard, header: list[str], record: Record) -> dict[str, Any] | str:
    """A record's columns, or what is wrong with it (naming the line and the file)."""
    where = f"line {record.line} of {shard.uri}"
    if record.problem:
        return f"{where}: {record.problem}"
    if shard.format == "csv":
        raw = "".join(record.value)
    else:
        raw = record.value
    try:
        # CSV fields carry undecodable bytes as surrogates: re-encoding finds them.
        text = raw.encode("utf-8") if isinstance(raw, str) else raw
        text = text.decode("utf-8")
    except UnicodeError as err:
        return f"{where} is not valid UTF-8 ({err}); expected UTF-8 text"
    if shard.format == "text":
        return {"prompt": text.rstrip("\r\n")}
    if shard.format == "jsonl":
        try:
            value = json.loads(text)
        except ValueError as err:
            return f"{where} is not valid JSON ({err})"
        if not isinstance(value, dict):
            return f"{where}: expected a JSON object, found {type(value).__name__}"
        return value
    if len(record.value) > len(header):
        return (
            f"{where}: {len(record.value)} fields, but the header names {len(header)}; expected one value per "
            f"column. Fix: quote fields that hold commas"
        )
    return {k: (v if v != "" else None) for k, v in zip(header, record.value)}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_seed(value: Any) -> int:
    """An integer seed in [0, 2**63); integer strings (CSV) are accepted, and floats that hold an
    exact integer (up to 2**53, beyond which a float has already rounded the seed it was given)."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        value = int(value.strip())
    elif isinstance(value, (float, np.floating)):
        if not math.isfinite(value) or not float(value).is_integer() or abs(value) > MAX_EXACT_FLOAT:
            raise ValueError
        value = int(value)
    elif not isinstance(value, (int, np.integer)):
        raise ValueError
    value = int(value)
    if not 0 <= value < MAX_SEED:
        raise ValueError
    return value


def image_roots(cfg: InputConfig) -> list[str]:
    """Where a job's init images may come from: input.image_roots, else the input's directory
    (or its S3 bucket)."""
    if cfg.image_roots is not None:
        return [r.rstrip("/") for r in cfg.image_roots]
    if is_s3(cfg.path):
        return ["s3://" + bucket_key(cfg.path)[0]]
    path = Path(cfg.path)
    return [str(path if path.is_dir() else path.parent)]


def image_location(field: str, value: str, source: str, roots: list[str]) -> tuple[str, str]:
    """(uri, problem) of an image path: relative paths resolve against the input file's
    directory; the result must lie under one of `roots`. Decided on the path's text alone (and
    the links on its way), so a refused path gets the same answer whether or not it exists."""
    if "://" in value and not is_s3(value):
        return "", f"{field}: {_short(value)} has an unsupported scheme; expected a path or an s3:// URI"
    if is_s3(value):
        uri = value
    elif value.startswith("/"):
        uri = os.path.realpath(value)
    elif is_s3(source):
        uri = posixpath.normpath(posixpath.join(source.rsplit("/", 1)[0][len("s3://") :], value))
        uri = "s3://" + uri
    else:
        uri = os.path.realpath(os.path.join(os.path.dirname(source), value))
    for root in roots:
        if is_s3(root) == is_s3(uri) and (uri == root or uri.startswith(root + "/")) and "/../" not in uri + "/":
            return uri, ""
    return "", (
        f"{field}: {_short(value)} lies outside the image roots {roots}; expected a path inside them. "
        f"Fix: move the image there, or list its directory or s3:// prefix in input.image_roots"
    )


def load_image(field: str, value: Any, source: str, cfg: InputConfig) -> tuple[bytes | None, str]:
    """An init image or mask as encoded bytes, from bytes, a datasets Image struct, a path or an
    s3:// URI under the image roots; (None, problem) when unusable. Sizes are checked before
    anything is read, and pixels before anything is decoded."""
    from PIL import Image

    where = "the row's bytes"
    if isinstance(value, dict):  # a datasets Image column: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        where, problem = image_location(field, value.strip(), source, image_roots(cfg))
        if problem:
            return None, problem
        try:
            size = object_size(where)
            if size is None:
                return None, f"{field}: {where} not found; expected an image file (local path, s3:// URI) or bytes"
            if size > cfg.max_image_bytes:
                return None, f"{field}: {where} is {size} bytes, over input.max_image_bytes={cfg.max_image_bytes}"
            data = read_bytes(where)
        except Exception as err:  # noqa: BLE001 - any unreadable location fails the row only
            return None, f"{field}: cannot read {where} ({type(err).__name__}: {err})"
        if data is None:
            return None, f"{field}: {where} not found; expected an image file (local path, s3:// URI) or bytes"
    else:
        return None, f"{field}: expected an image path, s3:// URI or bytes, found {_short(value)}"
    if len(data) > cfg.max_image_bytes:
        return None, f"{field}: {where} is {len(data)} bytes, over input.max_image_bytes={cfg.max_image_bytes}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # from the header: nothing decoded yet
            if width * height > cfg.max_image_pixels:
                return None, (
                    f"{field}: {where} is {width}x{height} pixels, over input.max_image_pixels="
                    f"{cfg.max_image_pixels}; expected a smaller image (it is resized to the stage's size anyway)"
                )
            img.load()
    except Exception as err:  # noqa: BLE001 - bombs, truncation, garbage: the row fails, not the job
        return (
            None,
            f"{field}: {where} is not a readable image ({type(err).__name__}: {err}); expected PNG, JPEG or WebP",
        )
    return data, ""


def validate_row(
    record: dict[str, Any] | str,
    global_row: int,
    job_seed: int,
    source: str,
    cfg: InputConfig,
    size: JobSize = NATIVE,
) -> dict[str, Any]:
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

    seed_value = _seed(record.get("seed"), row_id, job_seed, errors)
    overrides, problems = parse_overrides(record)
    errors += problems
    images = _init_images(record, source, cfg, errors)
    mode = row_mode(images["image"], images["mask_image"])
    width, height, problem = _stage1_target(overrides, mode, size)
    if problem and not errors:
        errors.append(problem)
    return {
        "id": row_id,
        "prompt": prompt if isinstance(prompt, str) else ("" if prompt is None else str(prompt)),
        "negative_prompt": negative if isinstance(negative, str) else "",
        "seed": seed_value,
        "status": "error" if errors else "ok",
        "error": "; ".join(errors),
        "overrides": json.dumps(overrides, sort_keys=True) if overrides else "",
        # Empty bytes, not None, for a row without one: the column keeps one type in every block.
        "image": images["image"] or b"",
        "mask_image": images["mask_image"] or b"",
        "mode": mode,
        "num_images": overrides.get("num_images"),
        "stage1_width": width,
        "stage1_height": height,
    }


def _seed(seed: Any, row_id: str, job_seed: int, errors: list[str]) -> int:
    """The row's seed, or one derived from the job seed and the row id when it has none."""
    if seed is None:
        return derive_seed(job_seed, row_id)
    try:
        return parse_seed(seed)
    except (ValueError, TypeError, OverflowError):
        errors.append(
            f"seed: expected an integer in [0, 2**63) (as a float, an exact one up to 2**53), found {_short(seed)}"
        )
        return 0


def _init_images(record: dict[str, Any], source: str, cfg: InputConfig, errors: list[str]) -> dict[str, Any]:
    """The row's init image and mask as bytes (None where absent); read only for rows still valid."""
    images: dict[str, bytes | None] = {}
    for field in ("image", "mask_image"):
        value = record.get(field)
        images[field] = None
        if value is not None and value != "" and not errors:
            images[field], problem = load_image(field, value, source, cfg)
            if problem:
                errors.append(problem)
    if images["mask_image"] is not None and images["image"] is None and not errors:
        errors.append("mask_image: given without image; inpainting needs both (or drop the mask for img2img)")
    return images


def _stage1_target(overrides: dict[str, Any], mode: str, size: JobSize) -> tuple[int, int, str]:
    """(stage I width, height, problem) a row renders at; 0 x 0: the checkpoint's own size (and
    img2img and inpainting rows, whose init image decides)."""
    given = {k: overrides[k] for k in ("width", "height") if k in overrides}
    if given and mode != "text2img":
        return (
            0,
            0,
            (
                f"width/height: set on an {mode} row, whose size follows its init image's aspect ratio; expected "
                "them on text-to-image rows only. Fix: drop them, or resize the init image"
            ),
        )
    if len(given) == 1:
        return 0, 0, "width/height: expected both or neither; found only one. Fix: set the other too"
    width, height = given.get("width", size.width), given.get("height", size.height)
    if mode != "text2img" or width is None:
        return 0, 0, ""
    return stage1_size(width, height, size.last_stage)


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


def read_shards(
    batch: dict[str, np.ndarray], job_seed: int, cfg: InputConfig, num_images: int = 1, size: JobSize = NATIVE
) -> dict[str, np.ndarray]:
    """Ray map_batches UDF: a batch of shard descriptions in, their validated rows out (a row
    with num_images > 1 becomes that many output rows). Nothing in one record raises: whatever
    goes wrong becomes that row's error."""
    rows = []
    for i in range(len(batch["index"])):
        fields = {k: _plain(batch[k][i]) for k in Shard.__dataclass_fields__}
        for name in ("only_rows", "whole_rows"):
            fields[name] = tuple(int(r) for r in fields[name])
        rows += _shard_rows(Shard(**fields), job_seed, cfg, num_images, size)
    columns = list(rows[0]) if rows else []
    ints = ("seed", "row", "item", "shard", "source_row", "image_index", "shard_items", "stage1_width", "stage1_height")
    return {c: np.array([r[c] for r in rows], dtype=np.int64 if c in ints else object) for c in columns}


def _shard_rows(shard: Shard, job_seed: int, cfg: InputConfig, num_images: int, size: JobSize) -> list[dict[str, Any]]:
    wanted, whole = set(shard.only_rows), set(shard.whole_rows)
    first_seen: dict[str, int] = {}
    shard_rows = []
    for n, (source_row, record) in enumerate(_raw_records(shard, cfg)):
        global_row = shard.first_row + n
        try:
            outputs = expand(validate_row(record, global_row, job_seed, shard.uri, cfg, size), num_images)
        except Exception as err:  # noqa: BLE001 - a bug or an input nobody foresaw fails its row only
            where = f"row {source_row} of {shard.uri}"
            outputs = [validate_row(f"{where}: {type(err).__name__}: {err}", global_row, job_seed, shard.uri, cfg)]
            outputs[0]["image_index"] = 0
        for row in outputs:
            # Two rows with one id would share an image: the later one fails, the earlier renders.
            earlier = first_seen.setdefault(row["id"], global_row)
            if earlier != global_row and row["status"] == "ok":
                row["status"] = "error"
                row["error"] = f"id: {_short(row['id'])} is also the id of row {earlier}; ids must be unique"
            item = item_key(global_row, row["image_index"])
            if (wanted or whole) and item not in wanted and global_row not in whole:
                continue
            row.update(row=global_row, item=item, shard=shard.index, source_file=shard.uri, source_row=source_row)
            shard_rows.append(row)
    for row in shard_rows:
        row["shard_items"] = len(shard_rows)  # what the driver waits for before committing
    return shard_rows


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
