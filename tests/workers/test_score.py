"""The score stage: its scores equal the reference implementations' on the same weights (torchmetrics'
CLIPScore, LAION's aesthetic head written out as its formula), do not depend on the batch a row
is in, and rows it does not score pass through as null."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import rows
from workers.config import ScoreConfig
from workers.models import AESTHETIC_FILE
from workers.score import ScoreWorker

PROMPTS = ["a red fox in the snow", "a lighthouse in a storm", "ramen", "a corgi on a skateboard", "x"]


@pytest.fixture(scope="module")
def scorer(tiny_root):
    cfg = ScoreConfig(
        enabled=True,
        model=str(tiny_root / "clip-tiny"),
        aesthetic_model=str(tiny_root / "aesthetic-tiny"),
        embeddings=True,
        micro_batch=4,
    )
    return ScoreWorker(cfg)


def images(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def scored(worker: ScoreWorker, pictures: np.ndarray, prompts: list[str], column: str = "upscale_image") -> dict:
    batch = rows(prompts)
    batch[column] = pictures
    return worker(batch)


def test_scores_match_torchmetrics_clipscore_and_the_aesthetic_formula(scorer, tiny_root):
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    pictures = images(5)
    out = scored(scorer, pictures, PROMPTS)
    model = CLIPModel.from_pretrained(tiny_root / "clip-tiny").eval()
    processor = CLIPProcessor.from_pretrained(tiny_root / "clip-tiny")

    class Features:
        """transformers 5 returns a model output from get_*_features; torchmetrics reads a tensor."""

        def to(self, device):
            return self

        def get_image_features(self, pixel_values):
            return model.get_image_features(pixel_values=pixel_values).pooler_output

        def get_text_features(self, input_ids, attention_mask):
            return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

        config = model.config

    state = torch.load(tiny_root / "aesthetic-tiny" / AESTHETIC_FILE, weights_only=True)
    with torch.no_grad():
        for i, (picture, prompt) in enumerate(zip(pictures, PROMPTS)):
            image = torch.from_numpy(picture).permute(2, 0, 1)  # torchmetrics takes (C, H, W) uint8
            expected = clip_score(image, prompt, lambda: (Features(), processor)).item()
            assert out["clip_score"][i] == pytest.approx(expected, abs=1e-3), prompt
            # LAION's predictor: its linear layers in turn on the L2-normalised image embedding.
            pixel_values = processor(images=[picture], return_tensors="pt")["pixel_values"]
            x = model.get_image_features(pixel_values=pixel_values).pooler_output
            x = x / x.norm(dim=-1, keepdim=True)
            for layer in (0, 2, 4, 6, 7):
                x = x @ state[f"layers.{layer}.weight"].T + state[f"layers.{layer}.bias"]
            assert out["aesthetic_score"][i] == pytest.approx(x.item(), abs=1e-4)
    # Distinct per image, never below torchmetrics' floor of 0 (random-noise pictures can reach it).
    assert len(set(np.round(out["clip_score"], 3))) >= 4 and (out["clip_score"] >= 0).all()
    # The embedding: float16 of the unit image embedding.
    embedding = np.frombuffer(out["clip_embedding"][0], dtype=np.float16)
    assert embedding.shape == (model.config.projection_dim,)
    assert np.linalg.norm(embedding.astype(np.float32)) == pytest.approx(1, abs=1e-2)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(neighbours=st.integers(0, 6), where=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_a_rows_scores_do_not_depend_on_its_batch(scorer, neighbours, where, seed):
    alone = scored(scorer, images(1), PROMPTS[:1])
    others = images(neighbours, seed)
    where = min(where, neighbours)
    batch = np.concatenate([others[:where], images(1), others[where:]])
    prompts = [PROMPTS[(i + seed) % len(PROMPTS)] for i in range(neighbours)]
    prompts.insert(where, PROMPTS[0])
    together = scored(scorer, batch, prompts)
    for name in ("clip_score", "aesthetic_score"):
        assert together[name][where] == pytest.approx(alone[name][0], abs=1e-4), (name, neighbours, where)
    assert together["clip_embedding"][where] == alone["clip_embedding"][0]


def test_failed_rows_pass_unscored_and_a_stage_ii_image_is_scored(scorer):
    batch = rows(PROMPTS[:3])
    batch["status"][1], batch["error"][1] = "error", "stage1: ValueError: too big"
    pixels = images(3, size=16).transpose(0, 3, 1, 2) / 127.5 - 1  # stage II's (3, H, W) in [-1, 1]
    batch["stage2_image"] = pixels.astype(np.float32)
    out = scorer(batch)
    assert np.isnan(out["clip_score"][1]) and np.isnan(out["aesthetic_score"][1]) and out["clip_embedding"][1] == b""
    assert np.isfinite(out["clip_score"][[0, 2]]).all() and list(out["status"]) == ["ok", "error", "ok"]
    long = scored(scorer, images(1), [" ".join(["fox"] * 300)])  # cut at CLIP's 77 tokens, end token kept
    assert np.isfinite(long["clip_score"][0])
