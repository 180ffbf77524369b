"""The job record, OUTPUT/job.json: what makes one output hold one job's images only.

A new output records the manifest and its fingerprint (the fields that decide which rows exist
and how their images look); a resume whose manifest would render differently is refused, with
the changed fields named, unless the user allows it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pyarrow as pa

from jobs.manifest import Manifest, drop_grouped_pool_settings
from jobs.output.layout import JOB
from workers.columns import NO_COLUMNS
from workers.errors import ChangedInputError, ChangedManifestError
from workers.stages import IMAGE_STAGES, MODEL_STAGES
from workers.storage import create_exclusive, join, read_bytes, write_bytes

# Settings that change no pixel and no row: free to differ between a run and its resume.
RUNTIME_FIELDS = (
    "pool_size",
    "batch_size",
    "num_gpus",
    "num_cpus",
    "device",
    "watchdog_s",
    "resources",
    "offload",
    "attention",
    "compile",
)


def fingerprint(manifest: Manifest) -> dict[str, Any]:
    """The manifest fields that decide which rows exist and what their images look like."""
    data = manifest.model_dump(mode="json")
    for stage in MODEL_STAGES:
        for name in RUNTIME_FIELDS:
            data[stage].pop(name, None)  # encode has no offload, attention or compile
    for name in ("name", "groups", "write", "ray", "contact_sheets"):  # the layout changes no pixel
        data.pop(name)
    # embed_images and webdataset are left out on purpose: turned on later, they are published
    # for the committed shards from their stored images (jobs/output/publish.py)
    data["output"] = {k: data["output"][k] for k in ("image_format", "quality")}
    return data


_MISSING = object()


def _default_at(path: str) -> Any:
    """The default of a manifest field by its dotted path (_MISSING where there is none)."""
    model: Any = Manifest
    for name in path.split("."):
        field = getattr(model, "model_fields", {}).get(name)
        if field is None:
            return _MISSING
        model = field.annotation
    return field.default


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(set(old) | set(new))
            for d in _diff(old.get(k, _MISSING), new.get(k, _MISSING), f"{path}.{k}".strip("."))
        ]
    # A field added since the output was made, at its default, renders as the output did.
    if old is _MISSING and new == _default_at(path):
        return []
    return [] if old == new else [f"{path}: {None if old is _MISSING else old!r} -> {new!r}"]


FORMAT = "ifrender-job"  # job.json's `format`, with its `version`: what marks the record as ifrender's
VERSION = 1


def is_job_record(data: bytes | None) -> bool:
    """Whether bytes are a job.json that ifrender wrote: its format and version, and the fields a
    record holds (a fingerprint and a manifest, each with the sections ifrender writes). A record
    from before `format` existed is recognised by those fields alone."""
    try:
        record = json.loads(data) if data is not None else None
    except ValueError:
        return False
    if not isinstance(record, dict):
        return False
    if "format" in record and (record.get("format") != FORMAT or not isinstance(record.get("version"), int)):
        return False
    fingerprint, manifest = record.get("fingerprint"), record.get("manifest")
    # The sections every record has held; a stage added since (score) may be missing from an older one.
    sections = ("input", "output", "encode", *IMAGE_STAGES)
    return (
        isinstance(fingerprint, dict)
        and isinstance(manifest, dict)
        and all(isinstance(manifest.get(s), dict) for s in sections)
        and all(isinstance(fingerprint.get(s), dict) for s in ("input", "output", "encode", "stage1"))
    )


def kept_record(kept: pa.Schema) -> dict[str, Any]:
    """The kept input columns as job.json records them: readable, and the exact Arrow schema."""
    return {"fields": [[f.name, str(f.type)] for f in kept], "arrow": base64.b64encode(kept.serialize()).decode()}


def recorded_kept(record: dict[str, Any]) -> pa.Schema:
    """The kept columns a job.json records; none for a record from before they were kept."""
    found = record.get("kept_columns")
    if not found:
        return pa.schema([])
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(found["arrow"])))


def check_job(out: str, manifest: Manifest, allow_changed: bool, kept: pa.Schema = NO_COLUMNS) -> None:
    """Record the job in a new output; refuse a resume whose manifest would render differently,
    or whose kept input columns differ from the output's (every shard has one schema, so a
    glob over data/ reads them all). A new output's record is created once (create-exclusive):
    of two jobs starting on one output at once, the second compares itself with the first's
    record like any resume."""
    uri = join(out, JOB)
    new = fingerprint(manifest)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": new,
        "manifest": manifest.model_dump(mode="json"),
        "kept_columns": kept_record(kept),
    }
    record = json.dumps(record, indent=1).encode()
    existing = read_bytes(uri)
    if existing is None:
        if create_exclusive(uri, record):
            return
        existing = read_bytes(uri)  # another job created it first
    if existing is not None and compare_job(out, existing, manifest, allow_changed, kept):
        write_bytes(uri, record)  # --allow-changed: the rest renders with the new settings


def compare_job(out: str, existing: bytes, manifest: Manifest, allow_changed: bool, kept: pa.Schema) -> list[str]:
    """An output's job.json against this job: raises where a resume is refused; returns the
    settings that changed (allowed by --allow-changed). Writes nothing."""
    old = recorded_kept(json.loads(existing))
    if not old.equals(kept):
        names = [f"{f.name}: {f.type}" for f in old]
        raise ChangedInputError(
            f"output.path {out}: its shards keep the input columns {names or 'none'}, and this input "
            f"and manifest give {[f'{f.name}: {f.type}' for f in kept] or 'none'}; every shard of one "
            f"output has one schema. Fix: set input.keep_columns: {json.dumps(old.names) if old.names else 'none'} "
            f"to resume it, restore the input's columns, or write to another output.path (--overwrite starts over)."
        )
    changes = _diff(json.loads(existing)["fingerprint"], fingerprint(manifest))
    if changes and not allow_changed:
        raise ChangedManifestError(
            f"output.path {out} holds a job rendered with other settings: "
            + "; ".join(changes[:8])
            + ". Fix: choose another output.path, pass --allow-changed to render the rest with "
            "the new settings, or --overwrite to start over."
        )
    return changes


def recorded_manifest(record: dict[str, Any]) -> Manifest:
    """The manifest a job.json holds. A field this version no longer has (encode.offload,
    encode.attention and encode.compile, never applied to T5) is left out: it rendered nothing."""

    def known(data: Any, model: Any) -> Any:
        fields = getattr(model, "model_fields", None)
        if not isinstance(data, dict) or fields is None:
            return data
        return {k: known(v, fields[k].annotation) for k, v in data.items() if k in fields}

    # The record holds every field, a grouped stage's unused pool defaults too.
    return Manifest.model_validate(drop_grouped_pool_settings(known(record["manifest"], Manifest)))
