"""guidance_interval: outside the interval a UNet step runs the conditional half only and the
pipeline's guidance formula hands back that prediction exactly; inside it nothing changes. Checked
on the tiny checkpoints through the stage workers, for stages I, II and the upscaler."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import rows
from workers.encode import EncodeWorker
from workers.guidance import IntervalUNet, guided_fraction, guided_steps
from workers.overrides import parse_overrides
from workers.stage1 import Stage1Worker
from workers.stage2 import Stage2Worker
from workers.upscale import UpscaleWorker

PROMPTS = ["a red fox in the snow", "a lighthouse in a storm", "a corgi on a skateboard"]
STEPS = 6


@pytest.fixture(scope="module")
def manifest(tiny_manifest):
    return tiny_manifest(*(f"{s}.num_inference_steps={STEPS}" for s in ("stage1", "stage2", "upscale")))


@pytest.fixture(scope="module")
def encoded(manifest):
    return EncodeWorker(manifest.encode)(rows(PROMPTS))


def worker(manifest, stage: str, **settings):
    cls = {"stage1": Stage1Worker, "stage2": Stage2Worker, "upscale": UpscaleWorker}[stage]
    return cls(getattr(manifest, stage).model_copy(update=settings))


def with_overrides(batch: dict, per_row: list[dict]) -> dict:
    """Rows' setting columns as the reader hands them on: checked, parsed, one JSON per row."""
    parsed = [parse_overrides(o)[0] for o in per_row]
    return batch | {"overrides": np.array([json.dumps(p) if p else "" for p in parsed], dtype=object)}


def test_guided_steps_split_the_schedule_at_the_fractions():
    assert guided_steps(10, (0.0, 1.0)) == [True] * 10
    assert guided_steps(10, (0.0, 0.5)) == [True] * 5 + [False] * 5
    assert guided_steps(10, (0.2, 0.6)) == [False] * 2 + [True] * 4 + [False] * 4
    assert guided_fraction(100, (0.0, 0.6)) == 0.6 and guided_fraction(3, (0.0, 0.5)) == pytest.approx(2 / 3)


def test_an_unguided_step_runs_half_the_batch_and_the_formula_gives_the_conditional_prediction():
    calls = []

    def unet(sample, timestep, encoder_hidden_states=None, class_labels=None, return_dict=False):
        calls.append(sample.shape[0])
        return (sample * 2 + encoder_hidden_states.mean() + (0 if class_labels is None else class_labels[:, None]),)

    class Schedule:
        timesteps = torch.tensor([900, 600, 300, 0])

    stand_in = IntervalUNet(unet, Schedule(), (0.0, 0.5))
    sample, words, labels = torch.randn(4, 3), torch.randn(4, 5), torch.tensor([1.0, 1.0, 2.0, 2.0])
    rows_run = []
    for t in Schedule.timesteps:
        before = len(calls)
        (out,) = stand_in(sample, t, encoder_hidden_states=words, class_labels=labels, return_dict=False)
        rows_run.append(calls[before])
        uncond, cond = out.chunk(2)
        guided = uncond + 7.5 * (cond - uncond)  # what the pipelines compute
        if int(t) >= 600:  # steps 0 and 1 of 4: guided, the whole doubled batch
            assert torch.equal(out, unet(sample, t, words, labels)[0])
        else:
            expected = unet(sample[2:], t, words[2:], labels[2:])[0]
            assert torch.equal(cond, expected) and torch.equal(guided, expected)
    assert rows_run == [4, 4, 2, 2]


@pytest.mark.parametrize("stage", ["stage1", "stage2", "upscale"])
def test_an_interval_with_no_guided_step_renders_what_no_guidance_renders(manifest, encoded, stage):
    """[0.99, 1] at 6 steps guides none: each step is the conditional prediction alone, which is
    what guidance_scale 1 computes (the pipeline then runs no unconditional half at all)."""
    batch = dict(encoded)
    if stage != "stage1":
        batch = worker(manifest, "stage1")(batch)
    if stage == "upscale":
        batch = worker(manifest, "stage2")(batch)
    column = f"{stage}_image"
    none = worker(manifest, stage, guidance_scale=1.0)(dict(batch))[column]
    unguided = worker(manifest, stage, guidance_interval=(0.99, 1.0))(dict(batch))[column]
    guided = worker(manifest, stage)(dict(batch))[column]
    assert all(np.array_equal(a, b) for a, b in zip(unguided, none))
    assert not all(np.array_equal(a, b) for a, b in zip(guided, none))  # guidance does change the picture


def test_a_full_interval_is_todays_pipeline_and_a_half_interval_runs_a_quarter_fewer_rows(manifest, encoded):
    """[0, 1] installs nothing (the pipeline as it was, bit for bit); [0, 0.5] runs the UNet on
    1.5 x the rows instead of 2 x: 1.33x fewer UNet rows per image at the same steps."""
    full = worker(manifest, "stage1")
    seen: list[int] = []
    unet = full.pipe.unet
    hook = unet.register_forward_pre_hook(lambda _module, args: seen.append(args[0].shape[0]))
    try:
        default = full(dict(encoded))["stage1_image"]
        rows_full = sum(seen)
        seen.clear()
        explicit = with_overrides(dict(encoded), [{"stage1_guidance_interval": [0, 1]}] * len(PROMPTS))
        assert all(np.array_equal(a, b) for a, b in zip(full(explicit)["stage1_image"], default))
        seen.clear()
        half = with_overrides(dict(encoded), [{"stage1_guidance_interval": [0, 0.5]}] * len(PROMPTS))
        out = full(half)
        rows_half = sum(seen)
    finally:
        hook.remove()
    assert rows_full / rows_half == pytest.approx(2 / 1.5)
    assert json.loads(out["stage1_params"][0])["guidance_interval"] == [0.0, 0.5]
    assert not any(np.array_equal(a, b) for a, b in zip(out["stage1_image"], default))


def test_a_row_renders_the_same_alone_and_beside_rows_of_other_intervals(manifest, encoded):
    stage1 = worker(manifest, "stage1")
    mixed = [{"stage1_guidance_interval": [0, 0.5]}, {}, {"stage1_guidance_interval": "0.2,0.9"}]
    together = stage1(with_overrides(dict(encoded), mixed))
    for i, override in enumerate(mixed):
        alone = {k: v[i : i + 1] for k, v in encoded.items()}
        image = stage1(with_overrides(alone, [override]))["stage1_image"][0]
        assert np.array_equal(image, together["stage1_image"][i]), i
    intervals = [json.loads(p)["guidance_interval"] for p in together["stage1_params"]]
    assert intervals == [[0.0, 0.5], [0.0, 1.0], [0.2, 0.9]]
