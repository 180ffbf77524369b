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
import random

import pyarrow as pa

from jobs.manifest import Manifest
from jobs.output.card import score_histograms, settings_text
from workers.columns import SCORES
from workers.storage import join, read_bytes

SAMPLE = 12  # images shown with their prompts
EXTREMES = 4  # lowest- and highest-scoring images shown per score
RESERVOIR = 20_000  # scores kept for the histograms: a uniform sample of every ok row's
THUMB = 192  # px, the longer side of a sample's thumbnail


class Sample:
    """Up to SAMPLE ok rows of the run, the first seen, and one row's recorded settings per stage."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.params: dict[str, dict] = {}
        self.scores: dict[str, list[float]] = {s: [] for s in SCORES}  # a reservoir per score
        self.seen = 0  # ok rows with scores, for the reservoir
        self.extremes: dict[str, list[dict]] = {s: [] for s in SCORES}  # lowest and highest rows per score
        self.rng = random.Random(0)

    def add(self, rows: pa.Table, stages: tuple[str, ...]) -> None:
        self.add_scores(rows)
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

    def add_scores(self, rows: pa.Table) -> None:
        names = [s for s in SCORES if s in rows.column_names]
        if not names:
            return
        for row in rows.select(["id", "prompt", "image_key", "status", *names]).to_pylist():
            if row["status"] != "ok" or any(row[s] is None for s in names):
                continue
            self.seen += 1
            slot = None if self.seen <= RESERVOIR else self.rng.randrange(self.seen)  # reservoir sampling
            for s in names:
                if slot is None:
                    self.scores[s].append(row[s])
                elif slot < RESERVOIR:
                    self.scores[s][slot] = row[s]
                ranked = sorted(self.extremes[s] + [row], key=lambda r, s=s: r[s])
                self.extremes[s] = ranked[:EXTREMES] + ranked[EXTREMES:][-EXTREMES:]


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
        shown = settings_text(source)
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


def score_section(out: str, sample: Sample) -> str:
    """Histograms of the scores over the ok rows (a uniform sample past RESERVOIR), and the
    lowest- and highest-scoring images of each."""
    if not sample.seen:
        return "<p>No ok row with scores yet.</p>"
    picture = score_histograms(sample.scores, sample.seen)
    page = f'<img id=scores alt="score histograms" src="data:image/png;base64,{base64.b64encode(picture).decode()}">'
    for name, rows in sample.extremes.items():
        low, high = rows[:EXTREMES], rows[EXTREMES:]
        for title, group in ((f"lowest {name}", low), (f"highest {name}", high)):
            if group:
                page += f"<h3>{html.escape(title)}</h3>" + _tiles(out, group, lambda r, n=name: f"{n} {r[n]:.3f}")
    return page


def sample_grid(out: str, sample: Sample) -> str:
    """The sampled images as thumbnails, each captioned with its prompt, seed and id, linked to its file."""
    return _tiles(out, sample.rows, lambda r: f"seed {r['seed']}") or "<p>No image rendered by this run yet.</p>"


def _tiles(out: str, rows: list[dict], detail) -> str:
    """Thumbnails linked to their files, each captioned with its prompt, `detail(row)` and its id."""
    from PIL import Image

    esc = html.escape
    tiles = []
    for row in rows:
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
            f"<figcaption>{esc(str(row['prompt']))}{esc(cut)}<br><small>{esc(detail(row))} · id "
            f"{esc(str(row['id']))}</small></figcaption></figure>"
        )
    return "<div class=sample>" + "".join(tiles) + "</div>" if tiles else ""
