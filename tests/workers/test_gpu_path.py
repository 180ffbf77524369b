"""The GPU path's savings keep their promises on CPU: the upscaler's own decode on the device is
the pipeline's bit for bit; fp16 stage images hand over what the next stage would have computed
on; the half-precision decode falls back to fp32 where it overflows; the opt-in settings that
change pixels change them at rounding level only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import rows
from workers.base import row_generators
from workers.encode import EncodeWorker
from workers.stage1 import Stage1Worker
from workers.stage2 import Stage2Worker
from workers.upscale import UpscaleWorker

PROMPTS = ["a red fox in the snow", "a lighthouse in a storm", "a corgi on a skateboard"]


@pytest.fixture(scope="module")
def manifest(tiny_manifest):
    return tiny_manifest(
        "stage1.num_inference_steps=3", "stage2.num_inference_steps=3", "upscale.num_inference_steps=3"
    )


@pytest.fixture(scope="module")
def stage2_batch(manifest):
    batch = EncodeWorker(manifest.encode)(rows(PROMPTS))
    batch = Stage1Worker(manifest.stage1)(batch)
    return Stage2Worker(manifest.stage2)(batch)


def test_the_upscalers_decode_on_the_device_is_the_pipelines_own_bit_for_bit(manifest, stage2_batch):
    worker = UpscaleWorker(manifest.upscale)
    ours = worker(stage2_batch)["upscale_image"]
    # The pipeline's own decode and post-processing (output_type="np"), on the same inputs.
    low_res = torch.from_numpy(np.stack(list(stage2_batch["stage2_image"]))).float()
    cfg = manifest.upscale
    theirs = []
    for i in range(0, len(PROMPTS), cfg.micro_batch):  # the worker's micro-batches, padded alike
        chunk = list(range(i, min(i + cfg.micro_batch, len(PROMPTS))))
        padded = chunk + [chunk[-1]] * (cfg.micro_batch - len(chunk))
        images = worker.pipe(
            prompt=[PROMPTS[j] for j in padded],
            negative_prompt=[""] * len(padded),
            image=(low_res[padded] / 2 + 0.5).clamp(0, 1),
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            noise_level=cfg.noise_level,
            generator=row_generators(stage2_batch["seed"][padded], "upscale"),
            output_type="np",
        ).images[: len(chunk)]
        theirs.append(np.round(np.clip(images, 0, 1) * 255).astype(np.uint8))
    assert np.array_equal(np.stack(list(ours)), np.concatenate(theirs))


def test_fp16_stage_images_hand_over_in_fp16_and_the_next_stage_sees_the_same_values(manifest):
    batch = EncodeWorker(manifest.encode)(rows(PROMPTS))
    half = Stage1Worker(manifest.stage1.model_copy(update={"dtype": "fp16"}))(batch)
    assert half["stage1_image"].dtype == np.float16  # half the bytes of the fp32 it was
    stage2 = Stage2Worker(manifest.stage2)
    as_fp32 = dict(half, stage1_image=half["stage1_image"].astype(np.float32))
    assert np.array_equal(stage2(half)["stage2_image"], stage2(as_fp32)["stage2_image"])


def test_a_half_precision_decode_that_overflows_is_decoded_again_in_fp32(manifest, stage2_batch):
    worker = UpscaleWorker(manifest.upscale.model_copy(update={"dtype": "fp16", "vae_decode": "stage"}))
    assert worker.pipe.vae.dtype == torch.float16 and worker.vae32 is None
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).half()
    latents[1] *= 3e4  # overflows fp16 inside the decoder
    with torch.inference_mode():
        images = worker.decode(latents)
        assert worker.vae32 is not None and worker.vae32.dtype == torch.float32  # made on first need
        reference = UpscaleWorker._decode(worker.vae32, latents[1:].float())
    expected = ((reference / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(images[1:], expected)
    # the image that did not overflow stayed in fp16, close to its fp32 decode
    with torch.inference_mode():
        full = UpscaleWorker._decode(worker.vae32, latents[:1].float())
    exact = ((full / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(images[:1].astype(int) - exact.astype(int)).max() <= 3


@pytest.mark.parametrize("stage", ["stage2", "upscale"])
def test_channels_last_changes_pixels_at_rounding_level_only(manifest, stage2_batch, stage):
    cls, column = (Stage2Worker, "stage2_image") if stage == "stage2" else (UpscaleWorker, "upscale_image")
    cfg = getattr(manifest, stage)
    default = cls(cfg)(stage2_batch)[column]
    fast = cls(cfg.model_copy(update={"channels_last": True}))(stage2_batch)[column]
    a, b = (np.stack(list(x)).astype(np.float32) for x in (default, fast))
    scale = 255 if stage == "upscale" else 127.5  # stage images are in [-1, 1]
    assert np.abs(a - b).max() * (1 if stage == "upscale" else scale) <= 2
