"""The last stage's finish: IF's safety checker records, blanks or fails, and the watermark."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.config import SafetyConfig
from workers.safety import Safety


def test_safety_checker_records_verdicts_blanks_or_fails_and_watermarks(tiny_root):
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64))
    images = {"stage2_image": (pixels / 255 * 2 - 1).astype(np.float32)}  # on the uint8 grid
    model = str(tiny_root / "IF-I-tiny")
    clean = Safety.load(SafetyConfig(model=model), torch.device("cpu")).finish(images, "stage2_image")
    assert list(clean["nsfw_detected"]) == [False, False] and list(clean["watermarked"]) == [True, True]
    changed = np.abs(clean["stage2_image"] - images["stage2_image"]) > 1e-3
    assert changed.any() and not changed[:, :, :32, :32].any()  # the mark sits in the bottom-right corner
    strict = SafetyConfig(model=model, nsfw_threshold=-1e9, watermark=False)
    flagged = Safety.load(strict, torch.device("cpu")).finish(images, "stage2_image")
    assert list(flagged["nsfw_detected"]) == [True, True] and (flagged["stage2_image"] == -1).all()  # black
    failing = Safety.load(strict.model_copy(update={"on_flagged": "error"}), torch.device("cpu"))
    assert "NSFW detected" in failing.finish(images, "stage2_image")["flagged"][0]
    small = {"stage1_image": images["stage2_image"][:, :, :16, :16]}  # too small for a visible mark
    assert list(
        Safety.load(SafetyConfig(model=model), torch.device("cpu")).finish(small, "stage1_image")["watermarked"]
    ) == [False, False]
    none = Safety.load(SafetyConfig(model=str(tiny_root / "IF-II-tiny")), torch.device("cpu"))
    assert none.checker is None and none.watermarker is None  # auto: IF-II provides neither
    with pytest.raises(RuntimeError, match="safety.safety_checker: .* has no usable safety_checker"):
        Safety.load(SafetyConfig(model=str(tiny_root / "IF-II-tiny"), checker=True), torch.device("cpu"))


def test_the_checkers_scores_are_the_values_its_thresholds_apply_to(tiny_root):
    """nsfw_score and watermark_score are the heads' outputs IFSafetyChecker compares with its
    thresholds: the same verdicts as diffusers' own checker at any threshold."""
    pixels = np.random.default_rng(1).integers(0, 256, (3, 3, 64, 64))
    images = {"stage2_image": (pixels / 255 * 2 - 1).astype(np.float32)}
    safety = Safety.load(SafetyConfig(model=str(tiny_root / "IF-I-tiny"), watermark=False), torch.device("cpu"))
    out = safety.finish(images, "stage2_image")
    scores, marks = out["nsfw_score"], out["watermark_score"]
    assert np.isfinite(scores).all() and np.isfinite(marks).all() and len(set(scores.tolist())) == 3
    from PIL import Image

    from workers.batch import to_uint8_hwc

    clip = safety.processor([Image.fromarray(p) for p in to_uint8_hwc(images["stage2_image"])], return_tensors="pt")
    for threshold in (float(np.median(scores)), float(scores.min()) - 1):
        _, nsfw, _ = safety.checker(clip.pixel_values, np.zeros((3, 8, 8, 3)), p_threshold=threshold)
        assert nsfw == (scores > threshold).tolist()
