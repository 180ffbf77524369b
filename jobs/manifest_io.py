"""The manifest's input and output sections: where the prompts come from and how they are read
(formats, column mapping, kept columns, templates), and where the dataset goes."""

from __future__ import annotations

import string
from typing import Literal

from pydantic import Field, field_validator

from workers.columns import INPUT_COLUMNS
from workers.config import C2paConfig, Strict


class InputConfig(Strict):
    path: str = Field(
        description="Prompt dataset: a file, a directory of files, or an s3:// URI. "
        "A relative local path is relative to the manifest's directory."
    )
    format: Literal["auto", "parquet", "arrow", "jsonl", "csv", "tsv", "text"] = Field(
        "auto",
        description="File format; auto picks it from the file extension (.parquet, .arrow/.feather, "
        ".jsonl/.ndjson/.json, .csv, .tsv, .txt).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="ifrender's input names mapped to the dataset's columns, e.g. {prompt: TEXT, id: key}. "
        "A name not mapped is read under its own name.",
    )
    keep_columns: Literal["all", "none"] | list[str] = Field(
        "all",
        description="Input columns ifrender does not read that travel with each row into the output "
        "(data/ Parquet, the WebDataset JSON): all, none, or a list of names.",
    )
    prompt_template: str | None = Field(
        None,
        description="Builds each row's prompt from its columns, e.g. 'a {style} photo of a {label}'. "
        "A row with a field missing or empty is an error row.",
    )
    negative_prompt_template: str | None = Field(
        None, description="Builds each row's negative prompt from its columns, like prompt_template."
    )
    shard_size: int = Field(
        256, ge=1, description="Rows per read shard: the unit in which the input is read and streamed."
    )
    pattern: str | None = Field(
        None,
        description="For a directory input: which files hold prompts, as a glob on their path inside "
        "it (e.g. '*.json', 'part-*.parquet'). Default: the format's extensions (.json left out), "
        "README/LICENSE files never.",
    )
    max_record_bytes: int = Field(
        1 << 20,
        ge=1,
        description="Longest text line, JSONL line or CSV record (and CSV field) read; a longer one is an error row.",
    )
    image_roots: list[str] | None = Field(
        None,
        description="Where init images and masks may be read from: local directories or s3:// "
        "prefixes. Relative paths resolve against the input file's directory; a path outside "
        "every root is refused. Default: the input's own directory (or its S3 bucket).",
    )
    max_image_bytes: int = Field(
        64 << 20, ge=1, description="Largest init image or mask file, checked before it is read."
    )
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="Most pixels of an init image or mask, checked before it is decoded."
    )

    @field_validator("columns")
    @classmethod
    def _maps_known_names(cls, columns: dict[str, str]) -> dict[str, str]:
        unknown = [name for name in columns if name not in INPUT_COLUMNS]
        if unknown:
            raise ValueError(
                f"maps {unknown}, which ifrender does not read; expected keys among "
                f"{', '.join(INPUT_COLUMNS[:6])} or a per-row setting. Fix: write it as "
                "{ifrender_name: dataset_column}, e.g. {prompt: TEXT}"
            )
        empty = [name for name, column in columns.items() if not column]
        if empty:
            raise ValueError(f"maps {empty} to an empty column name; expected the dataset's column names")
        twice = sorted({c for c in columns.values() if list(columns.values()).count(c) > 1})
        if twice:
            raise ValueError(f"maps several names to the column(s) {twice}; expected one name per column")
        return columns

    @field_validator("prompt_template", "negative_prompt_template")
    @classmethod
    def _template_fields(cls, template: str | None) -> str | None:
        if template is not None:
            template_fields(template)
        return template


def template_fields(template: str) -> list[str]:
    """The column names a template's {fields} name, in order; raises ValueError for anything but
    plain {name} fields ({{ and }} are literal braces)."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(f"{template!r} is not a template ({err}); expected text with {{column}} fields") from err
    fields = []
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if not name or spec or conversion or any(c in name for c in ".[]"):
            raise ValueError(
                f"{template!r}: the field {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} "
                "is not a plain column name; expected {column} fields only (write {{ and }} for braces)"
            )
        fields.append(name)
    if not fields:
        raise ValueError(f"{template!r} names no column; expected at least one {{column}} field")
    return fields


class OutputConfig(Strict):
    path: str = Field(
        description="Output directory or s3://bucket/prefix. A relative local path is relative "
        "to the working directory."
    )
    image_format: Literal["png", "jpeg", "webp"] = Field("png", description="Image file format.")
    license: str = Field(
        "other",
        pattern=r"^[a-z0-9][a-z0-9.+-]*$",
        description="The dataset card's license, a Hugging Face license id (e.g. cc-by-4.0). other: "
        "the card names the licences of the model weights the images fall under instead.",
    )
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality (ignored for PNG).")
    embed_images: bool = Field(
        False,
        description="Also store each image's bytes in the shard's Parquet as a Hugging Face "
        "datasets Image column, so datasets.load_dataset('parquet', ...) yields PIL images.",
    )
    lease_s: float = Field(
        120,
        gt=0,
        description="How long a driver's claim on the shards it renders lasts unless renewed (every "
        "lease_s / 4 while it runs). Another driver of the job on the same output skips claimed shards "
        "and takes over those whose claim expired (a driver that died elsewhere; one that died on the same "
        "machine frees its shards at once). Keep it well above the clock skew between the drivers' machines.",
    )
    webdataset: bool = Field(
        False,
        description="Also write each committed shard as a WebDataset tar (webdataset/NNNNNN.tar: "
        "KEY.png, KEY.txt, KEY.json for its successful rows).",
    )
    c2pa: C2paConfig | None = Field(
        None,
        description="Sign Content Credentials (C2PA) into every image file: machine-made, by ifrender, with "
        "which models, run and row. None: off.",
    )
