"""OUTPUT/README.md, the dataset card a hub indexes: YAML front matter (license, task, tags, size,
source, the `configs` that point `load_dataset(OUTPUT)` at data/ only), then the models and
settings, the counts, the score histograms (PNG beside the card), a sample, and how to load
and filter the rows. Also the model licences that apply to a job's images, which the run's
licence notice states too.

Nothing from the manifest or the rows reaches the card as markup: the front matter is dumped by
a YAML library, and names and prompts in the body are escaped."""

from __future__ import annotations

import html
import io
import logging
import re
from pathlib import Path
from typing import Any

import yaml

from jobs.manifest import Manifest
from jobs.output.layout import CARD, CARD_FILES, DATA_GLOB, JOB_SHEET, Derived
from workers.columns import SCORES
from workers.stages import SCORE
from workers.storage import join, read_bytes, resolve, write_bytes

log = logging.getLogger(__name__)

# Ends every card: what tells ifrender a README.md is its own to rewrite. Older cards open with
# OLD_CARD; a README.md with neither is someone else's, and is never replaced.
CARD_MARK = "<!-- written by ifrender: this card is rewritten by every run of the job -->"
OLD_CARD = "Images rendered by ifrender."
HISTOGRAMS = CARD_FILES + "scores.png"  # beside the card, drawn from the committed rows
MAX_SHARDS = 200  # data files read for the histograms at most, spread over the output

# The licences of the checkpoints a job may render with, by model family.
IF_LICENCE = ("DeepFloyd IF License Agreement", "https://huggingface.co/spaces/DeepFloyd/deepfloyd-if-license")
UPSCALER_LICENCE = (
    "CreativeML Open RAIL++-M License",
    "https://huggingface.co/stabilityai/stable-diffusion-x4-upscaler/blob/main/LICENSE-MODEL",
)


def is_own_build(model: str) -> bool:
    """One of ifrender's random-weight models (`tiny:NAME`, or a folder `ifrender tiny-models`
    wrote: its parent holds the TINY_VERSION stamp): no model licence applies to its images."""
    if model.startswith("tiny:"):
        return True
    if "://" in model:
        return False
    return any(Path(model).expanduser().parent.glob("TINY_VERSION*"))


def model_licences(manifest: Manifest) -> list[tuple[str, str, list[str]]]:
    """(licence, link, the stages whose weights carry it) for the weights this job renders with."""
    found = []
    if_stages = [s for s in ("encode", "stage1", "stage2") if not is_own_build(getattr(manifest, s).model)]
    if manifest.last_stage == "stage1":
        if_stages = [s for s in if_stages if s != "stage2"]
    if if_stages:
        found.append((*IF_LICENCE, if_stages))
    if manifest.last_stage == "upscale" and not is_own_build(manifest.upscale.model):
        found.append((*UPSCALER_LICENCE, ["upscale"]))
    return found


def text(value: Any) -> str:
    """A value from the manifest or a row as card text: HTML escaped, Markdown's marks escaped."""
    return re.sub(r"([\\`*_{}\[\]()#+!|~>-])", r"\\\1", html.escape(str(value)))


def size_category(rows: int) -> str:
    """The hub's size_categories bucket for a row count."""
    bounds = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))
    bounds += ((10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
    return next((name for limit, name in bounds if rows < limit), "n>1T" if rows >= 10**12 else "1B<n<10B")


def front_matter(manifest: Manifest, rows: int) -> dict[str, Any]:
    licences = model_licences(manifest)
    source = manifest.input.path
    source = source if "://" in source else Path(source.rstrip("/")).name
    matter: dict[str, Any] = {"license": manifest.output.license}
    if manifest.output.license == "other":
        matter["license_name"] = "model-licences" if licences else "no-model-licence"
        if licences:
            matter["license_link"] = licences[0][1]
    matter |= {
        "pretty_name": manifest.name,
        "task_categories": ["text-to-image"],
        "tags": ["synthetic", "ifrender", "deepfloyd-if", "image-generation"],
        "size_categories": [size_category(rows)],
        "source_datasets": [source],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_GLOB}]}],
    }
    return matter


def card_text(manifest: Manifest, derived: Derived, index: dict[str, Any] | None, folder: str, scores: bool) -> str:
    rows = index["rows"] if index else 0
    fields = front_matter(manifest, rows)
    matter = yaml.safe_dump(fields, sort_keys=False, allow_unicode=True)
    status = (
        f"{index['rows']} rows in {len(index['shards'])} shards: {index['ok']} ok, {index['error']} failed"
        if index
        else "rendering: no shard committed yet"
    )
    licences = model_licences(manifest)
    licence_line = (
        "The images fall under the licences of the weights that made them: "
        + "; ".join(f"[{name}]({link}) ({', '.join(stages)})" for name, link, stages in licences)
        + "."
        if licences
        else "The images were made by random-weight test models built by ifrender: no model licence applies."
    )
    settings = "\n".join(
        f"| {stage} | `{text(getattr(manifest, stage).model)}` | {text(_settings(manifest, stage))} |"
        for stage in manifest.stages()
    )
    embedded = "; the `image` column holds its bytes" if derived.embed_images else ""
    scored, score_filter, best = "", "", "id"
    if SCORE in manifest.stages():
        clip = text(manifest.score.model)
        scored = (
            f"`clip_score` (CLIPScore of image and prompt with `{clip}`, 0-100), `aesthetic_score` (LAION's "
            f"aesthetic predictor v2, about 1-10), "
            + ("`clip_embedding` (the image's unit CLIP embedding, float16), " if manifest.score.embeddings else "")
        )
        score_filter = (
            "\n      AND clip_score >= 20  -- matches its prompt (CLIP ViT-L/14: matching pairs mostly score 25-35)"
            "\n      AND aesthetic_score >= 5  -- LAION's predictor: 5 is its usual cut for pleasing images"
        )
        best = "aesthetic_score DESC, id"  # of near-duplicates, the best rated

    sample = f"\n![contact sheet of the committed shards]({JOB_SHEET})\n" if derived.contact_sheets and index else ""
    histograms = f"\n![histograms of the scores]({HISTOGRAMS})\n" if scores else ""
    return f"""---
{matter}---
# {text(manifest.name)}

Synthetic images rendered by ifrender with the DeepFloyd IF cascade from the
prompts of `{text(fields["source_datasets"][0])}`: {status}. Every image is machine-made; IF's invisible
watermark is in each one where `watermarked` is true. {licence_line}

## Models and settings

| stage | model | settings |
|---|---|---|
{settings}

## Rows

`data/` holds one Parquet file per committed shard, replaced whole when a shard is retried, so any
reader of `data/*.parquet` sees each committed row once. Each row's `image_key` is its image file,
relative to this folder{embedded}; `status` is `ok` or `error` (with the `error` message), and the
row carries its prompt, seed, the settings each stage ran with, {scored}`nsfw_score` and `watermark_score`
(the values IF's safety checker thresholds), `phash` (a 64-bit perceptual hash) and `sha256`.
{sample}{histograms}
## Load

```python
from datasets import load_dataset
ds = load_dataset("{text(folder)}", split="train")  # this folder's path, or its repo id once on the Hub
```

## Filter

```python
import duckdb

keep = duckdb.sql(\"\"\"
    SELECT * FROM read_parquet('data/*.parquet')
    WHERE status = 'ok' AND nsfw_score < 0.5 AND watermark_score < 0.5{score_filter}
    QUALIFY row_number() OVER (PARTITION BY phash ORDER BY {best}) = 1  -- one image per perceptual hash
\"\"\").df()
```

{CARD_MARK}
"""


# The settings a person asks about first, per stage: on the card and in the run report.
SHOWN = ("num_inference_steps", "timesteps", "guidance_scale", "scheduler", "noise_level", "strength", "dtype",
         "variant", "micro_batch", "device", "load_in_8bit", "clean_caption")  # fmt: skip


def settings_text(settings: dict[str, Any]) -> str:
    """A stage's settings (its config, or a row's recorded params) as `name value, ...`, SHOWN only."""
    return ", ".join(f"{k} {settings[k]}" for k in SHOWN if settings.get(k) not in (None, "", [], False))


def _settings(manifest: Manifest, stage: str) -> str:
    return settings_text(getattr(manifest, stage).model_dump())


def write_card(out: str, manifest: Manifest, derived: Derived, index: dict[str, Any] | None = None) -> None:
    """README.md, with the score histograms beside it once rows are committed. A README.md that
    ifrender did not write is left as it is."""
    uri = join(out, CARD)
    existing = read_bytes(uri)
    if existing is not None and CARD_MARK.encode() not in existing and OLD_CARD.encode() not in existing:
        log.warning("%s was not written by ifrender: left as it is, and the dataset card not written", uri)
        return
    scores = bool(index and index["ok"]) and _draw_histograms(out, index)
    # The folder's own name, not its absolute path: the card travels with the folder (a copy, an upload).
    folder = out.rstrip("/").rsplit("/", 1)[-1]
    write_bytes(uri, card_text(manifest, derived, index, folder, scores).encode())


def score_histograms(values: dict[str, list[float]], seen: int | None = None) -> bytes:
    """A PNG with a histogram per score (of `seen` images, where the values are a sample of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(values), figsize=(4.5 * len(values), 2.6))
    for ax, (name, vals) in zip(axes, values.items()):
        ax.hist(vals, bins=30, color="#1f77b4")
        shown = f"{len(vals)} of {seen}" if seen and seen > len(vals) else f"{len(vals)}"
        ax.set(title=f"{name} ({shown} images)", xlabel="score", ylabel="images")
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _draw_histograms(out: str, index: dict[str, Any]) -> bool:
    """card/scores.png: a histogram per score over the ok rows of the published shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values: dict[str, list[float]] = {s: [] for s in SCORES}
    shards = index["shards"]
    step = max(1, len(shards) // MAX_SHARDS)
    for shard in shards[::step]:
        # Only the score columns are read: a shard's file may hold its images too (output.embed_images).
        fs, path = resolve(join(out, shard["data"]))
        try:
            names = pq.read_schema(path, filesystem=fs).names  # a shard from before a score existed lacks it
            table = pq.read_table(path, columns=["status", *(s for s in SCORES if s in names)], filesystem=fs)
        except (OSError, pa.ArrowException) as err:  # replaced by a retry's commit meanwhile: drawn next time
            log.info("card histograms: %s not read (%s)", shard["data"], err)
            continue
        for row in table.to_pylist():
            for s in SCORES:
                if row["status"] == "ok" and row.get(s) is not None and row[s] == row[s]:
                    values[s].append(row[s])
    if not any(values.values()):
        return False
    write_bytes(join(out, HISTOGRAMS), score_histograms(values))
    return True
