"""OUTPUT/README.md as a hub reads it: front matter that huggingface_hub's DatasetCard parses with
the fields a hub indexes, the model licences, the scores' histograms beside it, and nothing from
the manifest or the rows as markup."""

from __future__ import annotations

import math
from contextlib import chdir

import pytest
from huggingface_hub import DatasetCard
from PIL import Image

from jobs.manifest import DEFAULT_MANIFEST, load_manifest
from jobs.output.card import HISTOGRAMS, IF_LICENCE, UPSCALER_LICENCE, write_card
from jobs.output.layout import CARD, Derived
from tests.helpers import read_output


@pytest.mark.slow
def test_the_shared_renders_card_parses_and_shows_its_scores(local_run):
    card = DatasetCard.load(local_run.out / CARD)
    data = card.data.to_dict()
    assert data["license"] == "other" and data["license_name"] == "no-model-licence"  # random test weights
    assert data["task_categories"] == ["text-to-image"] and "synthetic" in data["tags"]
    assert data["size_categories"] == ["n<1K"] and data["source_datasets"] == ["prompts.jsonl"]
    assert data["configs"][0]["data_files"][0]["path"] == "data/*.parquet"
    assert f"![histograms of the scores]({HISTOGRAMS})" in card.text
    with Image.open(local_run.out / HISTOGRAMS) as picture:
        assert picture.format == "PNG" and picture.width > 300
    assert "nsfw_score < 0.5" in card.text and "PARTITION BY phash" in card.text
    assert str(local_run.out) not in card.content  # no absolute path: the card travels with the folder
    # What the card's filter recipe reads is in every ok row.
    every = read_output(str(local_run.out))[0]
    rows = [r for r in every if r["status"] == "ok"]
    assert rows and all(len(r["phash"]) == 16 and int(r["phash"], 16) >= 0 for r in rows)
    scores = ("clip_score", "aesthetic_score", "nsfw_score", "watermark_score")
    assert all(math.isfinite(r[s]) for r in rows for s in scores)
    assert all(len(r["clip_embedding"]) == 16 for r in rows)  # score.embeddings: the tiny CLIP's 16 dimensions
    assert all(r[s] is None for r in every if r["status"] != "ok" for s in (*scores, "clip_embedding"))
    assert "`clip_score` (CLIPScore" in card.text and "`clip_embedding`" in card.text


@pytest.mark.slow
def test_the_cards_filter_recipe_keeps_what_it_says(local_run, tmp_path):
    """The card's DuckDB recipe, run as a reader would in an output folder, keeps exactly the ok
    rows above the score cuts it names and below the checker's thresholds, the best rated per
    phash: on rows made to sit on each side of each cut, and on the shared render's own rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    card = DatasetCard.load(local_run.out / CARD).text
    recipe = card.split("## Filter")[1].split("```python")[1].split("```")[0]

    def keep(folder) -> list[str]:
        found: dict = {}
        with chdir(folder):
            exec(recipe, found)  # noqa: S102 - the card's own code, as a reader runs it
        return sorted(found["keep"]["id"])

    def expected(rows) -> list[str]:
        passing = [
            r
            for r in rows
            if r["status"] == "ok"
            and r["clip_score"] >= 20
            and r["aesthetic_score"] >= 5
            and r["nsfw_score"] < 0.5
            and r["watermark_score"] < 0.5
        ]
        best: dict = {}
        for r in sorted(passing, key=lambda r: (-r["aesthetic_score"], r["id"])):
            best.setdefault(r["phash"], r["id"])
        return sorted(best.values())

    base = {"status": "ok", "clip_score": 30.0, "aesthetic_score": 6.0, "nsfw_score": -9.0, "watermark_score": -9.0}
    made = [
        base | {"id": "keep", "phash": "a"},
        base | {"id": "twin-worse", "phash": "b", "aesthetic_score": 5.5},
        base | {"id": "twin-better", "phash": "b", "aesthetic_score": 7.0},
        base | {"id": "off-prompt", "phash": "c", "clip_score": 19.9},
        base | {"id": "plain", "phash": "d", "aesthetic_score": 4.9},
        base | {"id": "nsfw", "phash": "e", "nsfw_score": 0.6},
        base | {"id": "marked", "phash": "f", "watermark_score": 0.7},
        base | {"id": "failed", "phash": "g", "status": "error"},
    ]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(made), tmp_path / "data" / "000000.parquet")
    assert keep(tmp_path) == expected(made) == ["keep", "twin-better"]
    rendered = read_output(str(local_run.out))[0]
    assert keep(local_run.out) == expected(rendered)


def test_names_are_escaped_and_real_weights_name_their_licences(tmp_path):
    hostile = '<script>alert("x")</script> **bold** [link](http://x) `code`'
    manifest = load_manifest(
        DEFAULT_MANIFEST,
        [
            f"name={hostile}",
            "stage1.model=DeepFloyd/IF-I-XL-v1.0",
            "upscale.model=stabilityai/stable-diffusion-x4-upscaler",
            f"output.path={tmp_path / 'out'}",
        ],
    )
    out = manifest.output.path
    write_card(out, manifest, Derived.of(manifest))
    card = DatasetCard.load(tmp_path / "out" / CARD)
    assert card.data.to_dict()["pretty_name"] == hostile  # YAML keeps the value, as data
    assert "<script>" not in card.text and "&lt;script&gt;" in card.text
    assert "**bold**" not in card.text and "[link](http://x)" not in card.text
    assert card.data.license_link == IF_LICENCE[1]
    assert f"[{IF_LICENCE[0]}]({IF_LICENCE[1]}) (stage1)" in card.text
    assert f"[{UPSCALER_LICENCE[0]}]({UPSCALER_LICENCE[1]}) (upscale)" in card.text


def test_a_license_id_is_checked_and_used(tmp_path):
    manifest = load_manifest(DEFAULT_MANIFEST, ["output.license=cc-by-4.0", f"output.path={tmp_path / 'o'}"])
    write_card(manifest.output.path, manifest, Derived.of(manifest))
    data = DatasetCard.load(tmp_path / "o" / CARD).data.to_dict()
    assert data["license"] == "cc-by-4.0" and "license_name" not in data
    with pytest.raises(ValueError, match="output.license"):
        load_manifest(DEFAULT_MANIFEST, ["output.license=CC BY 4.0 <b>"])
