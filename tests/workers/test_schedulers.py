"""Schedulers per stage and per row, and the guides' memory options, on the tiny checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import rows, take
from workers.config import SCHEDULERS
from workers.encode import EncodeWorker
from workers.errors import ManifestError
from workers.stage1 import Stage1Worker
from workers.upscale import UpscaleWorker


@pytest.fixture(scope="module")
def manifest(tiny_manifest):
    def build(*overrides: str):
        steps = ("stage1.num_inference_steps=4", "upscale.num_inference_steps=3")
        return tiny_manifest(*steps, "stage1.micro_batch=2", "upscale.micro_batch=2", *overrides)

    return build


@pytest.fixture(scope="module")
def embedded(manifest):
    return EncodeWorker(manifest().encode)(rows(["a fox", "an owl"]))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_scheduler_renders_each_stage_and_is_recorded(manifest, embedded, name):
    out = Stage1Worker(manifest(f"stage1.scheduler={name}").stage1)(embedded)
    assert list(out["status"]) == ["ok", "ok"], out["error"]
    assert np.isfinite(out["stage1_image"]).all() and out["stage1_image"].shape == (2, 3, 16, 16)
    assert json.loads(out["stage1_params"][0])["scheduler"] == name
    low_res = {"stage2_image": np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)}
    up = UpscaleWorker(manifest(f"upscale.scheduler={name}").upscale)(rows(["a fox", "an owl"], **low_res))
    assert list(up["status"]) == ["ok", "ok"], up["error"]
    assert up["upscale_image"].shape == (2, 64, 64, 3) and json.loads(up["upscale_params"][1])["scheduler"] == name


def test_another_scheduler_changes_the_pixels_and_a_row_can_choose_its_own(manifest, embedded):
    default = Stage1Worker(manifest().stage1)
    dpm = Stage1Worker(manifest("stage1.scheduler=dpmsolver_multistep").stage1)
    assert not np.allclose(default(embedded)["stage1_image"], dpm(embedded)["stage1_image"], atol=1e-3)
    # Row 1 asks for DPM-Solver itself: it renders as the DPM-Solver job would, row 0 as the default.
    mixed = dict(embedded, overrides=np.array(["", json.dumps({"stage1_scheduler": "dpmsolver_multistep"})]))
    out = default(mixed)
    assert [json.loads(p)["scheduler"] for p in out["stage1_params"]] == ["default", "dpmsolver_multistep"]
    np.testing.assert_array_equal(out["stage1_image"][0], default(embedded)["stage1_image"][0])
    np.testing.assert_array_equal(out["stage1_image"][1], dpm(take(embedded, [1]))["stage1_image"][0])
    again = default(mixed)  # schedulers are reused across calls without carrying state
    np.testing.assert_array_equal(again["stage1_image"], out["stage1_image"])


def test_a_preset_needs_a_scheduler_that_takes_custom_timesteps(manifest):
    with pytest.raises(ManifestError, match="stage1: .*smart27 is a custom schedule, which scheduler unipc cannot"):
        manifest("stage1.timesteps=smart27", "stage1.scheduler=unipc")
    assert manifest("stage1.timesteps=smart27", "stage1.scheduler=dpmsolver_multistep").stage1.scheduler


def test_memory_options_keep_the_images_and_are_refused_where_there_is_no_vae(manifest, embedded):
    plain = Stage1Worker(manifest().stage1)(embedded)["stage1_image"]
    sliced = Stage1Worker(manifest("stage1.attention_slicing=true").stage1)(embedded)
    np.testing.assert_allclose(sliced["stage1_image"], plain, atol=1e-3)
    assert json.loads(sliced["stage1_params"][0])["attention_slicing"] is True
    low_res = {"stage2_image": np.random.default_rng(1).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)}
    batch = rows(["a fox", "an owl"], **low_res)
    base = UpscaleWorker(manifest().upscale)(batch)["upscale_image"].astype(int)
    for option in ("upscale.vae_slicing=true", "upscale.vae_tiling=true"):
        out = UpscaleWorker(manifest(option).upscale)(batch)
        assert np.abs(out["upscale_image"].astype(int) - base).max() <= 2, option
        assert json.loads(out["upscale_params"][0])[option.split(".")[1].split("=")[0]] is True
    for stage in ("stage1", "encode"):
        with pytest.raises(ManifestError, match=f"{stage}.vae_tiling: unknown field"):
            manifest(f"{stage}.vae_tiling=true")
