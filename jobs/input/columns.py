"""The input's columns: which ones ifrender reads and under which of its names (input.columns),
which travel with each row into the output (input.keep_columns) and with what Arrow type, and
the prompt templates. Decided once, from the whole input, when the job starts: every shard of one
output then has one schema, whatever file or row it came from.
"""

from __future__ import annotations

import functools
import json
import string
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from jobs.manifest import InputConfig, template_fields
from workers.columns import INPUT_COLUMNS, KEPT, METADATA_SCHEMA, is_setting
from workers.errors import InputError

# Output columns a kept input column may not be named after: ifrender's own, and the embedded image.
OUTPUT_NAMES = frozenset(METADATA_SCHEMA.names) | {"image", KEPT}
PROMPT_LIKE = ("prompt", "prompts", "caption", "captions", "text")  # names a hint suggests mapping
TEMPLATES = {"prompt": "prompt_template", "negative_prompt": "negative_prompt_template"}


def sources(cfg: InputConfig) -> dict[str, str]:
    """ifrender input name -> the dataset column it is read from."""
    return _sources(tuple(cfg.columns.items()))


@functools.lru_cache(maxsize=16)
def _sources(mapped: tuple[tuple[str, str], ...]) -> dict[str, str]:
    # Cached: the read task asks once per row. Callers only read the dict.
    columns = dict(mapped)
    return {name: columns.get(name, name) for name in INPUT_COLUMNS}


def renamed(record: dict[str, Any], cfg: InputConfig) -> dict[str, Any]:
    """A record under ifrender's names: its mapped columns, and any per-row setting it names."""
    found = {name: record[column] for name, column in sources(cfg).items() if column in record}
    found.update({k: v for k, v in record.items() if is_setting(k) and k not in found})
    return found


def fill(template: str, record: dict[str, Any]) -> tuple[str, str]:
    """(the template filled from the record's columns, problem): a field whose value is missing
    or empty is a problem naming it."""
    values = {}
    for name in template_fields(template):
        value = record.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            return "", f"{name}: the template {template!r} needs it, found {value!r}; expected a non-empty value"
        values[name] = value
    return string.Formatter().vformat(template, (), values), ""


@dataclass
class FileColumns:
    """What one file holds: its columns in order and their Arrow types (strings for CSV and TSV,
    inferred from every record for JSONL)."""

    uri: str
    format: str
    types: dict[str, pa.DataType]
    json_text: frozenset[str] = frozenset()  # JSONL columns whose values are of more than one JSON type


@dataclass(frozen=True)
class Columns:
    """The job's input columns: the kept ones with their output types (`kept`), and those of them
    written as JSON text (a JSONL column of mixed types)."""

    kept: pa.Schema = field(default_factory=lambda: pa.schema([]))
    json_text: tuple[str, ...] = ()
    mapping: tuple[tuple[str, str], ...] = ()  # (ifrender name, dataset column) read under another name

    def kept_values(self, record: dict[str, Any]) -> dict[str, Any]:
        """A line-format record's kept values, JSON text where the column is of mixed types."""
        found = {}
        for name in self.kept.names:
            value = record.get(name)
            found[name] = json.dumps(value) if name in self.json_text and value is not None else value
        return found

    def conform(self, table: pa.Table) -> pa.Table:
        """A Parquet or Arrow slice's kept columns, cast to the job's types (null where a file lacks one)."""
        n = table.num_rows
        arrays = [
            table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(n, f.type)
            for f in self.kept
        ]
        return pa.Table.from_arrays(arrays, schema=self.kept)

    def describe(self) -> list[str]:
        """What `ifrender validate` prints of the columns."""
        lines = [f"  {name} <- {column}" for name, column in self.mapping] or ["  (every name read as it is)"]
        kept = [f"  {f.name}: {f.type}" + (" (JSON text)" if f.name in self.json_text else "") for f in self.kept]
        return [
            "input columns read under ifrender's names:",
            *lines,
            "kept beside each image:",
            *(kept or ["  (none)"]),
        ]


class JsonTypes:
    """Infers each JSONL column's type from every record: one JSON type across the input keeps
    its type (strings, booleans, integers within int64, numbers as float64, lists and objects
    as Arrow lists and structs); more than one is written as JSON text. Values are gathered per
    column and typed by Arrow CHUNK records at a time (its inference is C++, and refuses a mix
    of types); the chunks' types are unified at the end. `only`: the columns whose type matters
    (those kept), None for all; the others are only named."""

    CHUNK = 4096

    def __init__(self, only: set[str] | None = None) -> None:
        self.only = only
        self.names: dict[str, None] = {}  # in order of first appearance
        self.pending: dict[str, list[Any]] = {}
        self.seen: dict[str, set[pa.DataType]] = {}
        self.text: set[str] = set()  # of more than one JSON type: JSON text
        self.count = 0

    def add(self, record: dict[str, Any]) -> None:
        pending = self.pending
        for name, value in record.items():
            values = pending.get(name)
            if values is None:
                self.names[name] = None
                values = pending[name] = []
                self.seen[name] = set()
            values.append(value)
        self.count += 1
        if self.count % self.CHUNK == 0:
            self.flush()

    def flush(self) -> None:
        for name, values in self.pending.items():
            if values and name not in self.text and (self.only is None or name in self.only):
                try:
                    self.seen[name].add(pa.array(values).type)
                except (pa.ArrowException, TypeError, ValueError, OverflowError):
                    self.text.add(name)  # a mix of types, or an integer past int64
            values.clear()

    def types(self) -> tuple[dict[str, pa.DataType], frozenset[str]]:
        self.flush()
        types, text = {}, set(self.text)
        for name in self.names:
            seen = {t for t in self.seen[name] if t != pa.null()}
            unified = _unify(seen) if seen and name not in text else None
            if unified is None and seen and name not in text:
                text.add(name)  # one type per chunk, but not the same one
            types[name] = pa.string() if name in text or unified is None else unified
        return types, frozenset(text)


def _unify(types: set[pa.DataType]) -> pa.DataType | None:
    try:
        return pa.unify_schemas([pa.schema([("x", t)]) for t in types], promote_options="permissive").field("x").type
    except (pa.ArrowException, ValueError, TypeError):
        return None


def _hint(cfg: InputConfig, names: list[str]) -> str:
    """The input.columns line that maps a prompt-like column, where one is there."""
    close = [n for n in names if n.strip().lower() in PROMPT_LIKE]
    if not close:
        return ""
    exact = [n for n in close if n.strip().lower() == "prompt"]
    pick = (exact or close)[0]
    return f" Fix: input.columns: {{prompt: {json.dumps(pick)}}}"


def check_file(cfg: InputConfig, found: FileColumns) -> None:
    """The columns the manifest reads are in the file: every mapped one, the prompt (unless a
    template builds it) and every template field."""
    names = list(found.types)
    wanted = [
        column for name, column in cfg.columns.items() if not (name in TEMPLATES and getattr(cfg, TEMPLATES[name]))
    ]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise InputError(
            f"{found.uri}: no column {missing[0]!r} (input.columns maps "
            f"{[n for n, c in cfg.columns.items() if c == missing[0]][0]} to it); the file's columns are "
            f"{names[:30]}. Fix: map it to one of them in input.columns."
            + (_hint(cfg, names) if missing[0] == cfg.columns.get("prompt") else "")
        )
    if cfg.prompt_template is None and "prompt" not in cfg.columns and "prompt" not in names:
        raise InputError(
            f"{found.uri}: no 'prompt' column. Expected a column named prompt, one mapped to it in "
            f"input.columns, or input.prompt_template (optional: id, negative_prompt, seed, image, "
            f"mask_image, num_images and per-row settings such as stage1_guidance_scale); found {names[:30]}."
            + _hint(cfg, names)
        )


def plan_columns(cfg: InputConfig, files: list[FileColumns]) -> Columns:
    """The job's columns from every file's: templates' fields present, mapping not contradicted
    by a template, kept columns chosen, named apart from ifrender's, and of one type each."""
    for name, option in TEMPLATES.items():
        if getattr(cfg, option) is not None and name in cfg.columns:
            raise InputError(
                f"input.columns maps {name} to {cfg.columns[name]!r} and input.{option} builds it too; "
                f"expected one of the two. Fix: drop one"
            )
    every: dict[str, None] = {}
    for f in files:
        every.update(dict.fromkeys(f.types))
    names = list(every)
    for option in TEMPLATES.values():
        template = getattr(cfg, option)
        missing = [n for n in template_fields(template) if n not in every] if template else []
        if missing:
            raise InputError(
                f"input.{option}: {template!r} names {missing}, which no input column is; the input's "
                f"columns are {names[:30]}. Fix: name columns the input has"
            )
    read = {column for column in sources(cfg).values()} | {n for n in names if is_setting(n)}
    if cfg.keep_columns == "none":
        kept = []
    elif cfg.keep_columns == "all":
        kept = [n for n in names if n not in read]
    else:
        unknown = [n for n in cfg.keep_columns if n not in every]
        if unknown:
            raise InputError(
                f"input.keep_columns names {unknown}, which no input file has; the input's columns are "
                f"{names[:30]}. Fix: name columns the input has"
            )
        used = [n for n in cfg.keep_columns if n in read]
        if used:
            raise InputError(
                f"input.keep_columns names {used}, which ifrender reads (prompt, id, seed, images, per-row "
                f"settings, or a column input.columns maps); expected columns it does not read. Fix: drop them"
            )
        kept = list(dict.fromkeys(cfg.keep_columns))
    clash = [n for n in kept if n in OUTPUT_NAMES]
    if clash:
        rest = [n for n in kept if n not in clash]
        why = "; ".join(
            f"the input's {n!r} would stand beside ifrender's own {n!r} column"
            + (f" (input.columns maps {n} to {cfg.columns[n]!r})" if n in cfg.columns else "")
            for n in clash
        )
        raise InputError(
            f"input.keep_columns: {why}. Expected kept columns named apart from the output's. Fix: set "
            f"input.keep_columns: {json.dumps(rest)} (or rename the column in the data)"
        )
    fields, text = [], set()
    for name in kept:
        having = [f for f in files if name in f.types]
        if any(name in f.json_text for f in having):
            text.add(name)
            unified = pa.string()
        else:
            unified = _unify({f.types[name] for f in having})
        if unified is None:
            seen = {f"{f.uri}: {f.types[name]}" for f in having}
            raise InputError(
                f"input column {name!r} has types that do not unify across the files ({sorted(seen)[:4]}); "
                f"expected one type. Fix: convert the files, or leave it out of input.keep_columns"
            )
        fields.append(pa.field(name, unified))
    mapping = tuple((n, c) for n, c in cfg.columns.items()) + tuple(
        (name, f"the template {getattr(cfg, option)!r}") for name, option in TEMPLATES.items() if getattr(cfg, option)
    )
    return Columns(pa.schema(fields), tuple(sorted(text)), mapping)
