"""The part of report.html that says what was rendered: the input, each stage's model and the
settings its rows actually ran with (their recorded `<stage>_params`), and a sample of images,
each with its prompt, seed and id, linked to its file. Every link is relative to the output
folder, so the page works wherever the folder goes (a laptop, S3, an upload)."""

from __future__ import annotations

import base64
import html
import io
import json
import os

import pyarrow as pa

from jobs.manifest import Manifest
from workers.storage import join, read_bytes

SAMPLE = 12  # images shown with their prompts
THUMB = 192  # px, the longer side of a sample's thumbnail
# The settings a person asks about first, per stage, when a row recorded them.
SHOWN = ("num_inference_steps", "timesteps", "guidance_scale", "scheduler", "noise_level", "strength", "dtype",
         "variant", "micro_batch", "device", "load_in_8bit", "clean_caption")  # fmt: skip


class Sample:
    """Up to SAMPLE ok rows of the run, the first seen, and one row's recorded settings per stage."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.params: dict[str, dict] = {}

    def add(self, rows: pa.Table, stages: tuple[str, ...]) -> None:
        if len(self.rows) >= SAMPLE and len(self.params) == len(stages):
            return
        wanted = ["id", "prompt", "seed", "image_key", "status", "prompt_truncated"] + [
            f"{s}_params" for s in stages if f"{s}_params" in rows.column_names
        ]
        for row in rows.select([c for c in wanted if c in rows.column_names]).to_pylist():
            if row["status"] != "ok":
                continue
            if len(self.rows) < SAMPLE:
                self.rows.append(row)
            for stage in stages:
                if stage not in self.params and row.get(f"{stage}_params"):
                    self.params[stage] = json.loads(row[f"{stage}_params"])


def input_facts(manifest: Manifest, columns) -> list[tuple[str, str]]:
    """The input as a person recognises it: its file or folder name (a local path says nothing
    once the folder moves), an s3:// URI whole; the columns read and kept."""
    cfg = manifest.input
    where = cfg.path if "://" in cfg.path else os.path.basename(cfg.path.rstrip("/")) or cfg.path
    facts = [("input", f"{where} (format {cfg.format}, shards of {cfg.shard_size} rows)")]
    if columns is not None:
        read = ", ".join(f"{name} <- {column}" for name, column in columns.mapping) or "under their own names"
        kept = ", ".join(columns.kept.names) or "none"
        facts.append(("columns", f"read {read}; kept beside each image: {kept}"))
    return facts


def settings_table(manifest: Manifest, sample: Sample) -> str:
    """One row per stage: its model (as the manifest names it) and its effective settings."""
    esc = html.escape
    rows = []
    for stage in manifest.stages():
        cfg = getattr(manifest, stage)
        recorded = sample.params.get(stage)
        source = recorded if recorded is not None else cfg.model_dump()
        shown = ", ".join(f"{k} {source[k]}" for k in SHOWN if source.get(k) not in (None, "", [], False))
        origin = "as its rows ran" if recorded is not None else "from the manifest (no row rendered yet)"
        rows.append(
            f"<tr><th>{esc(stage)}</th><td><code>{esc(cfg.model)}</code></td><td>{esc(shown)}</td>"
            f"<td>{origin}</td></tr>"
        )
    return (
        "<table class=settings><tr><th>stage</th><th>model</th><th>settings</th><th></th></tr>"
        + "".join(rows)
        + "</table>"
    )


def sample_grid(out: str, sample: Sample) -> str:
    """The sampled images as thumbnails, each captioned with its prompt, seed and id, linked to its file."""
    from PIL import Image

    esc = html.escape
    tiles = []
    for row in sample.rows:
        data = read_bytes(join(out, row["image_key"]))
        if not data:
            continue
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        cut = " (cut at T5's 77 tokens)" if row.get("prompt_truncated") else ""
        tiles.append(
            f'<figure><a href="{esc(row["image_key"])}"><img alt="{esc(str(row["id"]))}" '
            f'src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}"></a>'
            f"<figcaption>{esc(str(row['prompt']))}{esc(cut)}<br><small>seed {row['seed']} · id "
            f"{esc(str(row['id']))}</small></figcaption></figure>"
        )
    return "<div class=sample>" + "".join(tiles) + "</div>" if tiles else "<p>No image rendered by this run yet.</p>"
