"""Row reading: one shard in, its validated rows out, in a Ray read task (`read_shards`).

Each row is validated as it is read: a bad prompt, seed, setting or image becomes an error row
that names the problem, never an exception.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.input.columns import Columns, fill, renamed, sources
from jobs.input.images import load_image
from jobs.input.records import Record, records, tsv_fields
from jobs.input.shards import HEADED, TABLES, Shard
from jobs.input.tables import arrow_batches
from jobs.manifest import InputConfig, template_fields
from workers.columns import KEPT, encode_kept, is_setting
from workers.keys import derive_seed, item_key
from workers.overrides import parse_overrides, row_mode
from workers.sizes import NATIVE, JobSize, stage1_size
from workers.storage import resolve

MAX_SEED = 2**63
MAX_EXACT_FLOAT = 2**53  # floats above it skip integers: a seed there was rounded before it came


def _raw_records(shard: Shard, cfg: InputConfig, columns: Columns) -> Iterator[tuple[int, dict[str, Any] | str, bytes]]:
    """(source row, record dict or an error message, the row's kept columns as bytes) for each
    row of a shard. Records carry the dataset's column names."""
    fs, path = resolve(shard.uri)
    if shard.format in TABLES:
        yield from _table_records(shard, cfg, columns, fs.open_input_file(path))
        return
    with fs.open_input_file(path) as f:
        f.seek(shard.start)
        data = f.read(shard.end - shard.start)
    header = json.loads(shard.header) if shard.format in HEADED else []
    for record in records(io.BytesIO(data), shard.format, shard.start, shard.first_line, cfg.max_record_bytes):
        parsed = _parse_record(shard, header, record)
        kept = b""
        if isinstance(parsed, dict) and columns.kept:
            try:
                kept = encode_kept(pa.Table.from_pylist([columns.kept_values(parsed)], schema=columns.kept))
            except (pa.ArrowException, ValueError, TypeError, OverflowError) as err:
                parsed = f"line {record.line} of {shard.uri}: its kept columns do not fit {columns.kept} ({err})"
        yield record.line, parsed, kept


def _table_slices(shard: Shard, f: Any, wanted: Callable[[str], bool]) -> Iterator[tuple[int, pa.Table | str, int]]:
    """(file row, the shard's rows there as a table or why they cannot be read, how many) over
    the shard's rows of a Parquet or Arrow file, one row group or record batch at a time, with
    the columns `wanted` says yes to."""
    stop = shard.start + shard.num_rows
    if shard.format == "parquet":
        pf = pq.ParquetFile(f)
        columns = [c for c in pf.schema_arrow.names if wanted(c)]
        offset = 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            if offset + n > shard.start and offset < stop:
                lo, hi = max(shard.start - offset, 0), min(stop - offset, n)
                try:
                    yield offset + lo, pf.read_row_group(rg, columns=columns).slice(lo, hi - lo), hi - lo
                except Exception as err:  # noqa: BLE001 - a corrupt row group fails its rows, not the job
                    yield (
                        offset + lo,
                        f"row group {rg} of {shard.uri} cannot be read ({type(err).__name__}: {err})",
                        hi - lo,
                    )
            offset += n
        return
    left = shard.start  # the first of the shard's rows not yet yielded
    try:
        for _, offset, batch in arrow_batches(f, shard.batch, shard.batch_row):
            n = batch.num_rows
            if offset + n > shard.start and offset < stop:
                lo, hi = max(shard.start - offset, 0), min(stop - offset, n)
                table = pa.Table.from_batches([batch]).select([c for c in batch.schema.names if wanted(c)])
                yield offset + lo, table.slice(lo, hi - lo), hi - lo
                left = offset + hi
            if offset + n >= stop:
                return
    except Exception as err:  # noqa: BLE001 - a corrupt batch fails the shard's rows left, not the job
        yield left, f"{shard.uri} cannot be read from row {left} ({type(err).__name__}: {err})", stop - left
        return
    if left < stop:  # the file ended early: it changed since the plan
        yield (
            left,
            f"{shard.uri} ended at row {left}; expected {stop} rows (did it change since the job started?)",
            stop - left,
        )


def _table_records(
    shard: Shard, cfg: InputConfig, columns: Columns, f: Any
) -> Iterator[tuple[int, dict[str, Any] | str, bytes]]:
    read = set(sources(cfg).values()) | {n for t in templates(cfg) for n in template_fields(t)}
    kept = set(columns.kept.names)
    # The columns read, kept, or naming per-row settings (unknown ones fail their rows).
    for row, found, n in _table_slices(shard, f, lambda c: c in read or c in kept or is_setting(c)):
        if isinstance(found, str):
            for i in range(n):
                yield row + i, found, b""
            continue
        values = found.select([c for c in found.column_names if c not in kept or c in read]).to_pylist()
        kept_rows = columns.conform(found) if kept else None
        for i, record in enumerate(values):
            yield row + i, record, encode_kept(kept_rows.slice(i, 1)) if kept_rows is not None else b""


def templates(cfg: InputConfig) -> list[str]:
    return [t for t in (cfg.prompt_template, cfg.negative_prompt_template) if t]


def _parse_record(shard: Shard, header: list[str], record: Record) -> dict[str, Any] | str:
    """A record's columns, or what is wrong with it (naming the line and the file). CSV and TSV
    fields stay text as they are, empty ones included."""
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
    fields = record.value if shard.format == "csv" else tsv_fields(record.value)
    if len(fields) > len(header):
        fix = (
            "quote fields that hold commas"
            if shard.format == "csv"
            else ("TSV has no quoting, so a field cannot hold a tab: replace tabs inside fields (e.g. by spaces)")
        )
        return (
            f"{where}: {len(fields)} fields, but the header names {len(header)}; expected one value per "
            f"column. Fix: {fix}"
        )
    return dict(zip(header, fields))


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


def validate_row(
    record: dict[str, Any] | str,
    global_row: int,
    job_seed: int,
    source: str,
    cfg: InputConfig,
    size: JobSize = NATIVE,
    problem: str = "",
) -> dict[str, Any]:
    """One output row from one input record (under ifrender's names); problems go into `error`,
    never raised. `problem`: one found before (a template's field missing)."""
    errors: list[str] = [problem] if problem else []
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
    batch: dict[str, np.ndarray],
    job_seed: int,
    cfg: InputConfig,
    num_images: int = 1,
    size: JobSize = NATIVE,
    columns: Columns | None = None,
) -> dict[str, np.ndarray]:
    """Ray map_batches UDF: a batch of shard descriptions in, their validated rows out (a row
    with num_images > 1 becomes that many output rows). Nothing in one record raises: whatever
    goes wrong becomes that row's error."""
    rows = []
    for i in range(len(batch["index"])):
        fields = {k: _plain(batch[k][i]) for k in Shard.__dataclass_fields__}
        for name in ("only_rows", "whole_rows"):
            fields[name] = tuple(int(r) for r in fields[name])
        rows += shard_rows(Shard(**fields), job_seed, cfg, num_images, size, columns or Columns())
    columns = list(rows[0]) if rows else []
    ints = ("seed", "row", "item", "shard", "source_row", "image_index", "shard_items", "stage1_width", "stage1_height")
    return {c: np.array([r[c] for r in rows], dtype=np.int64 if c in ints else object) for c in columns}


def read_fields(record: dict[str, Any], fmt: str, cfg: InputConfig) -> tuple[dict[str, Any], str]:
    """(a record under ifrender's names with its templates filled, problem). An empty CSV or TSV
    field is an absent value there."""
    fields = renamed(record, cfg)
    if fmt in HEADED:
        fields = {k: (None if v == "" else v) for k, v in fields.items()}
    problem = ""
    for name, template in (("prompt", cfg.prompt_template), ("negative_prompt", cfg.negative_prompt_template)):
        if template:
            fields[name], found = fill(template, record)
            problem = problem or found
    return fields, problem


def shard_rows(
    shard: Shard, job_seed: int, cfg: InputConfig, num_images: int, size: JobSize, columns: Columns
) -> list[dict[str, Any]]:
    wanted, whole = set(shard.only_rows), set(shard.whole_rows)
    first_seen: dict[str, int] = {}
    shard_rows = []
    for n, (source_row, record, kept) in enumerate(_raw_records(shard, cfg, columns)):
        global_row = shard.first_row + n
        try:
            fields, problem = read_fields(record, shard.format, cfg) if isinstance(record, dict) else (record, "")
            outputs = expand(validate_row(fields, global_row, job_seed, shard.uri, cfg, size, problem), num_images)
        except Exception as err:  # noqa: BLE001 - a bug or an input nobody foresaw fails its row only
            where = f"row {source_row} of {shard.uri}"
            outputs = [validate_row(f"{where}: {type(err).__name__}: {err}", global_row, job_seed, shard.uri, cfg)]
            outputs[0]["image_index"] = 0
        for row in outputs:
            row[KEPT] = kept
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
