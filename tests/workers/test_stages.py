"""Each worker's batch contract, on the tiny checkpoints loaded through the production loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.manifest import load_manifest
from tests.helpers import (
    rows,
    take,
)
from workers.encode import EncodeWorker
from workers.errors import MissingColumnsError
from workers.stage1 import Stage1Worker
from workers.stage2 import Stage2Worker
from workers.upscale import UpscaleWorker

PROMPTS = ["a red fox in the snow", "a lighthouse in a storm", "a red fox in the snow", "a corgi on a skateboard"]


@pytest.fixture(scope="module")
def workers(tiny_manifest):
    m = tiny_manifest("stage1.num_inference_steps=3", "stage2.num_inference_steps=3", "upscale.num_inference_steps=3")
    return {
        "encode": EncodeWorker(m.encode),
        "stage1": Stage1Worker(m.stage1),
        "stage2": Stage2Worker(m.stage2, drop=("prompt_embeds", "negative_prompt_embeds", "stage1_image")),
        "upscale": UpscaleWorker(m.upscale, drop=("stage2_image",)),
    }


@pytest.fixture(scope="module")
def cascade(workers):
    """PROMPTS through every stage, keeping every intermediate batch."""
    out = {"input": rows(PROMPTS, keep_me=np.arange(len(PROMPTS)))}
    batch = out["input"]
    for stage in ("encode", "stage1", "stage2", "upscale"):
        batch = workers[stage](batch)
        out[stage] = batch
    return out


NEW_COLUMNS = {
    "encode": {"prompt_embeds": (77, 32), "negative_prompt_embeds": (77, 32)},
    "stage1": {"stage1_image": (3, 16, 16)},
    "stage2": {"stage2_image": (3, 64, 64)},
    "upscale": {"upscale_image": (256, 256, 3)},
}


@pytest.mark.parametrize("stage", list(NEW_COLUMNS))
def test_stage_adds_its_columns_and_keeps_the_others(workers, cascade, stage):
    batch = cascade[stage]
    for column, shape in NEW_COLUMNS[stage].items():
        assert batch[column].shape == (len(PROMPTS), *shape)
        assert np.isfinite(batch[column].astype(np.float32)).all()
    np.testing.assert_array_equal(batch["keep_me"], np.arange(len(PROMPTS)))
    assert list(batch["status"]) == ["ok"] * len(PROMPTS)
    assert (batch[f"{stage}_seconds"] > 0).all()
    assert batch[f"{stage}_model"][0].endswith(("IF-I-tiny", "IF-II-tiny", "x4-upscaler-tiny"))
    params = json.loads(batch[f"{stage}_params"][0])
    assert (
        params["device"] == "cpu" and params["micro_batch"] == workers[stage].micro_batch and params["dtype"] == "fp32"
    )


def test_stages_drop_tensors_no_later_stage_reads(cascade):
    assert "stage1_image" not in cascade["stage2"] and "prompt_embeds" not in cascade["stage2"]
    assert "stage2_image" not in cascade["upscale"]


@pytest.mark.parametrize("stage", list(NEW_COLUMNS))
def test_missing_column_fails_with_the_stage_name(workers, cascade, stage):
    previous = {"encode": "input", "stage1": "encode", "stage2": "stage1", "upscale": "stage2"}[stage]
    batch = dict(cascade[previous])
    needed = workers[stage].needs[-1]
    del batch[needed]
    with pytest.raises(MissingColumnsError, match=f"{stage}: the batch lacks column\\(s\\) \\['{needed}'\\]"):
        workers[stage](batch)


def test_images_are_in_range_and_differ_by_prompt_and_seed(cascade):
    img = cascade["stage1"]["stage1_image"]
    assert img.min() >= -1.01 and img.max() <= 1.01
    # rows 0 and 2 share a prompt but not a seed: same embedding, different images
    np.testing.assert_array_equal(cascade["encode"]["prompt_embeds"][0], cascade["encode"]["prompt_embeds"][2])
    assert not np.array_equal(img[0], img[2])


def test_error_rows_pass_through_untouched(workers, cascade):
    batch = rows(PROMPTS[:3])
    batch["status"][1], batch["error"][1] = "error", "prompt: expected non-empty text"
    for stage in ("encode", "stage1", "stage2", "upscale"):
        batch = workers[stage](batch)
    assert list(batch["status"]) == ["ok", "error", "ok"]
    assert batch["error"][1] == "prompt: expected non-empty text"
    assert batch["upscale_seconds"][1] == 0 and not batch["upscale_image"][1].any()
    assert batch["upscale_image"][0].any()


def test_a_row_renders_the_same_whatever_its_neighbours(workers, cascade):
    """Bit-identical through stage II; within 1/255 after the upscaler's VAE decode."""
    full = cascade
    alone = take(full["input"], [3])
    mixed = rows(["an unrelated prompt", PROMPTS[3], "another one"], seeds=[1, full["input"]["seed"][3], 2])
    for name, batch in (("alone", alone), ("mixed", mixed)):
        row = 0 if name == "alone" else 1
        for stage in ("encode", "stage1", "stage2", "upscale"):
            batch = workers[stage](batch)
            column = next(iter(NEW_COLUMNS[stage]))
            got, want = batch[column][row], full[stage][column][3]
            if stage == "upscale":
                assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, name
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{stage} {name}")


def test_fp16_variant_loads_the_fp16_files(tiny_root):
    assert (tiny_root / "IF-I-tiny" / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    m = load_manifest(None, [f"stage1.model={tiny_root / 'IF-I-tiny'}", "stage1.dtype=fp16", "stage1.variant=fp16"])
    worker = Stage1Worker(m.stage1.model_copy(update={"num_inference_steps": 2}))
    assert worker.pipe.unet.dtype == torch.float16
    embeds = np.random.default_rng(0).standard_normal((2, 77, 32)).astype(np.float32)
    out = worker(rows(["a", "b"], prompt_embeds=embeds, negative_prompt_embeds=embeds))
    assert list(out["status"]) == ["ok", "ok"] and np.isfinite(out["stage1_image"]).all()
    assert json.loads(out["stage1_params"][0])["variant"] == "fp16"


def test_8bit_t5_loads_and_encodes_on_this_machine(tiny_root, workers):
    from bitsandbytes.nn import Linear8bitLt

    m = load_manifest(None, [f"encode.model={tiny_root / 'IF-I-tiny'}", "encode.load_in_8bit=true"])
    worker = EncodeWorker(m.encode)
    assert any(isinstance(mod, Linear8bitLt) for mod in worker.pipe.text_encoder.modules())
    out = worker(rows(PROMPTS))
    full = workers["encode"](rows(PROMPTS))["prompt_embeds"]
    assert out["prompt_embeds"].shape == full.shape and np.isfinite(out["prompt_embeds"]).all()
    # 8-bit weights change the numbers, not the meaning: close to the full-precision embedding
    cos = (out["prompt_embeds"] * full).sum(-1) / (
        np.linalg.norm(out["prompt_embeds"], axis=-1) * np.linalg.norm(full, axis=-1)
    )
    assert cos.mean() > 0.9


def test_encode_records_prompt_tokens_and_truncation_as_t5_sees_them(workers):
    from workers.encode import T5_TOKENS

    encode = workers["encode"]
    long = " ".join(f"word{i}" for i in range(200))  # far past T5's window
    batch = encode(rows(["a fox", long, "a fox"]))
    tokens, truncated = batch["prompt_tokens"].tolist(), batch["prompt_truncated"].tolist()
    # As IF's encode_prompt tokenizes: the same tokenizer without truncation, end token included.
    untruncated = [len(encode.pipe.tokenizer(p)["input_ids"]) for p in ("a fox", long, "a fox")]
    assert tokens == untruncated and tokens[0] == tokens[2]
    assert truncated == [False, True, False] and tokens[1] > T5_TOKENS >= tokens[0]
