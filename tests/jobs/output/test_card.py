"""OUTPUT/README.md as a hub reads it: front matter that huggingface_hub's DatasetCard parses with
the fields a hub indexes, the model licences, the scores' histograms beside it, and nothing from
the manifest or the rows as markup."""

from __future__ import annotations

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
    rows = [r for r in read_output(str(local_run.out))[0] if r["status"] == "ok"]
    assert rows and all(len(r["phash"]) == 16 and int(r["phash"], 16) >= 0 for r in rows)
    assert all(r["nsfw_score"] is not None and r["watermark_score"] is not None for r in rows)


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
