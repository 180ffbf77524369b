"""The IF stages per row: img2img and inpainting on shared weights, per-row settings, prompt
deduplication, caption cleaning, precision and attention options, timestep presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.manifest import load_manifest
from tests.helpers import (
    png,
    rows,
    take,
)
from workers.encode import EncodeWorker, check_caption_cleaning
from workers.stage1 import Stage1Worker
from workers.stage2 import Stage2Worker


@pytest.fixture(scope="module")
def stage_workers(tiny_manifest):
    m = tiny_manifest(
        "stage1.num_inference_steps=4",
        "stage2.num_inference_steps=4",
        "stage1.micro_batch=2",
        "stage2.micro_batch=2",
    )
    return EncodeWorker(m.encode), Stage1Worker(m.stage1), Stage2Worker(m.stage2)


def mixed_batch(encode):
    overrides = ["", json.dumps({"stage1_guidance_scale": 2.0}), "", json.dumps({"strength": 0.5}), ""]
    batch = rows(
        ["a fox", "a fox", "an owl", "an owl", "a cat"],
        image=np.array([png((200, 0, 0)), png((200, 0, 0)), png((0, 0, 200)), png((0, 0, 200)), None], dtype=object),
        mask_image=np.array([None, None, png(0, mask=True), png(0, mask=True), None], dtype=object),
        overrides=np.array(overrides, dtype=object),
    )
    batch["seed"] = np.array([5, 5, 6, 6, 7])
    return encode(batch)


def test_img2img_and_inpainting_share_weights_and_are_batch_independent(stage_workers):
    encode, stage1, stage2 = stage_workers
    assert stage1.pipes["img2img"].unet is stage1.pipe.unet and stage1.pipes["inpaint"].unet is stage1.pipe.unet
    assert stage2.pipes["inpaint"].unet is stage2.pipe.unet
    batch = mixed_batch(encode)
    together = stage2(stage1(batch))
    modes = [json.loads(p)["mode"] for p in together["stage1_params"]]
    assert modes == ["img2img", "img2img", "inpaint", "inpaint", "text2img"]
    for i in range(5):  # each row alone gives the same pixels as in the mixed batch
        alone = stage2(stage1(take(batch, [i])))
        np.testing.assert_array_equal(alone["stage1_image"][0], together["stage1_image"][i])
        np.testing.assert_array_equal(alone["stage2_image"][0], together["stage2_image"][i])
    assert (together["status"] == "ok").all()


def test_per_row_settings_reach_the_pipelines(stage_workers):
    encode, stage1, stage2 = stage_workers
    out = stage2(stage1(mixed_batch(encode)))
    p1 = [json.loads(p) for p in out["stage1_params"]]
    assert p1[0]["guidance_scale"] == 7.0 and p1[1]["guidance_scale"] == 2.0  # the override, recorded
    assert p1[0]["strength"] == 0.7 and p1[2]["strength"] == 1.0  # diffusers' defaults, recorded
    assert p1[3]["strength"] == 0.5 and json.loads(out["stage2_params"][3])["strength"] == 0.5
    # Same prompt, seed and image: only the override differs, and so do the pixels.
    assert not np.array_equal(out["stage1_image"][0], out["stage1_image"][1])
    assert not np.array_equal(out["stage2_image"][2], out["stage2_image"][3])


def test_identical_prompts_are_encoded_once_per_batch(stage_workers):
    encode, _, _ = stage_workers
    batch = rows(
        ["a fox", "a fox", "an owl", "a fox"], negative_prompt=np.array(["blurry", "", "blurry", ""], dtype=object)
    )
    out = encode(batch)
    assert out["encode_encoded"].sum() == pytest.approx(3)  # "a fox", "an owl", "blurry"
    assert out["encode_texts"].sum() == 8
    alone = encode(take(batch, [2]))
    np.testing.assert_array_equal(alone["prompt_embeds"][0], out["prompt_embeds"][2])
    np.testing.assert_array_equal(out["negative_prompt_embeds"][1], encode.empty)


def test_caption_cleaning_is_real(stage_workers):
    check_caption_cleaning()  # bs4 and ftfy are installed: no silent fallback
    encode, _, _ = stage_workers
    cleaned = encode.pipe._text_preprocessing("A <b>Fox</b> http://example.com/x.png &amp; owl", clean_caption=True)
    assert cleaned == ["a fox & owl"] or ("http" not in cleaned[0] and "<b>" not in cleaned[0])


def test_precision_attention_compile_and_offload_options(tiny_root, stage_workers):
    base = [f"stage1.model={tiny_root / 'IF-I-tiny'}", "stage1.num_inference_steps=2", "stage1.micro_batch=2"]
    encode, stage1, _ = stage_workers
    batch = encode(rows(["a fox", "an owl"]))
    eager = Stage1Worker(load_manifest(None, base + ["stage1.attention=eager"]).stage1)
    sdpa = Stage1Worker(load_manifest(None, base).stage1)
    a, b = eager(batch)["stage1_image"], sdpa(batch)["stage1_image"]
    np.testing.assert_allclose(a, b, atol=1e-3)  # other kernels, the same images
    bf16 = Stage1Worker(load_manifest(None, base + ["stage1.dtype=bf16"]).stage1)
    assert bf16.pipe.unet.dtype == torch.bfloat16
    np.testing.assert_allclose(bf16(batch)["stage1_image"], b, atol=0.2)
    compiled = Stage1Worker(load_manifest(None, base + ["stage1.compile=true"]).stage1)
    assert isinstance(compiled.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    with pytest.raises(ValueError, match="stage1.offload=model .* runs on cpu. Fix"):
        Stage1Worker(load_manifest(None, base + ["stage1.offload=model"]).stage1)


def test_timestep_presets_run_per_row_and_per_job(stage_workers, tiny_root):
    encode, stage1, _ = stage_workers
    batch = encode(
        rows(["a fox", "a fox"], overrides=np.array([json.dumps({"stage1_timesteps": "fast27"}), ""], dtype=object))
    )
    out = stage1(batch)
    assert list(out["status"]) == ["ok", "ok"], out["error"]
    preset = json.loads(out["stage1_params"][0])
    assert preset["timesteps"] == "fast27" and "num_inference_steps" not in preset
    assert not np.array_equal(out["stage1_image"][0], out["stage1_image"][1])
    m = load_manifest(None, [f"stage1.model={tiny_root / 'IF-I-tiny'}", "stage1.timesteps=smart27"])
    job = Stage1Worker(m.stage1)(batch)
    assert json.loads(job["stage1_params"][1])["timesteps"] == "smart27" and job["status"][1] == "ok"
