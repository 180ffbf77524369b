"""Every generation mode and option per row: img2img and inpainting, per-row settings, several
images per prompt, precision and attention options, the safety checker and watermark, caption
cleaning, prompt deduplication and contact sheets."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.inputs import plan_shards, read_shards, shard_items
from jobs.manifest import SafetyConfig, load_manifest
from jobs.render import run
from tests.conftest import manifest_for
from tests.test_workers import rows, take
from workers.encode import EncodeWorker, check_caption_cleaning
from workers.safety import Safety
from workers.stage1 import Stage1Worker
from workers.stage2 import Stage2Worker


def png(color, size=32, mask=False) -> bytes:
    img = Image.new("L" if mask else "RGB", (size, size), color)
    if mask:  # the right half is repainted
        img.paste(255, (size // 2, 0, size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def read(tmp_path: Path, records: list[dict], num_images: int = 1) -> dict:
    """The reader's rows for JSON records, through the real plan and read-task code."""
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = load_manifest(None, ["output.path=/o", f"input.path={path}"]).input
    batch = {
        k: np.array([s[k] for s in shard_items(plan_shards(cfg))], dtype=object)
        for k in shard_items(plan_shards(cfg))[0]
    }
    return read_shards(batch, job_seed=7, num_images=num_images)


# ---- the reader: per-row settings, images, expansion ---------------------------------------


def test_every_invalid_row_value_becomes_an_error_row_naming_it(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = {
        "stage1_guidance_scale": -1,
        "stage1_num_inference_steps": 0,
        "stage2_num_inference_steps": True,
        "stage1_timesteps": "fast99",
        "stage2_noise_level": 5000,
        "upscale_noise_level": 400,
        "strength": 0,
        "stage2_strength": 1.5,
        "num_images": 0,
        "stage1_guidence_scale": 5,
        "image": "missing.png",
        "image ": None,
    }
    records = [{"id": f"b{i}", "prompt": "p", k: v} for i, (k, v) in enumerate(bad.items())]
    records += [
        {"id": "corrupt", "prompt": "p", "image": "broken.png"},
        {"id": "mask-only", "prompt": "p", "mask_image": "m.png"},
        {"id": "fine", "prompt": "p", "stage1_guidance_scale": "5.5", "upscale_noise_level": 20},
    ]
    (tmp_path / "m.png").write_bytes(png(0, mask=True))
    out = read(tmp_path, records)
    errors = dict(zip(out["id"], out["error"]))
    status = dict(zip(out["id"], out["status"]))
    for i, field in enumerate(bad):
        if field == "image ":
            assert status[f"b{i}"] == "ok"  # not a setting: other columns are the dataset's own
            continue
        assert status[f"b{i}"] == "error", field
        assert errors[f"b{i}"].startswith(field.strip()), (field, errors[f"b{i}"])
    assert "stage1_guidence_scale: unknown per-row setting; expected one of stage1_guidance_scale" in errors["b9"]
    assert "missing.png not found" in errors["b10"]
    assert "is not a readable image" in errors["corrupt"]
    assert errors["mask-only"].startswith("mask_image: given without image")
    assert status["fine"] == "ok"
    fine = list(out["id"]).index("fine")
    assert json.loads(out["params"][fine]) == {"stage1_guidance_scale": 5.5, "upscale_noise_level": 20}


def test_num_images_expands_rows_with_distinct_reproducible_seeds(tmp_path):
    records = [{"id": "fox", "prompt": "a fox", "seed": 11, "num_images": 3}, {"id": "owl", "prompt": "an owl"}]
    out = read(tmp_path, records, num_images=2)
    assert list(out["id"]) == ["fox-0", "fox-1", "fox-2", "owl-0", "owl-1"]
    assert list(out["image_index"]) == [0, 1, 2, 0, 1]
    assert out["seed"][0] == 11 and len(set(out["seed"])) == 5  # image 0 keeps the row's seed
    assert len(set(out["item"])) == 5 and set(out["shard_items"]) == {5}
    again = read(tmp_path, records, num_images=2)
    assert list(again["seed"]) == list(out["seed"])


def read_parquet(path: Path, table: pa.Table) -> dict:
    pq.write_table(table, path)
    items = shard_items(plan_shards(load_manifest(None, ["output.path=/o", f"input.path={path}"]).input))
    return read_shards({k: np.array([s[k] for s in items], dtype=object) for k in items[0]}, job_seed=1)


def test_images_come_from_paths_s3_bytes_and_datasets_columns(tmp_path, s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="inits")
    boto3.client("s3").put_object(Bucket="inits", Key="a.png", Body=png((200, 0, 0)))
    (tmp_path / "b.png").write_bytes(png((0, 200, 0)))
    uris = pa.table({"prompt": ["s3 init", "relative path", "text"], "image": ["s3://inits/a.png", "b.png", None]})
    out = read_parquet(tmp_path / "uris.parquet", uris)
    assert list(out["mode"]) == ["img2img", "img2img", "text2img"], out["error"]
    assert out["image"][0] == png((200, 0, 0)) and out["image"][1] == png((0, 200, 0))
    # Raw bytes, and the {bytes, path} struct of a datasets Image column.
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [{"bytes": png((0, 0, 200)), "path": None}, {"bytes": png((9, 9, 9)), "path": "x.png"}, None]
    out = read_parquet(
        tmp_path / "s.parquet", pa.table({"prompt": ["a", "b", "c"], "image": pa.array(images, image_type)})
    )
    assert list(out["mode"]) == ["img2img", "img2img", "text2img"], out["error"]
    raw = pa.table({"prompt": ["a", "b"], "image": pa.array([png((1, 2, 3)), b"not an image"], pa.binary())})
    out = read_parquet(tmp_path / "raw.parquet", raw)
    assert out["image"][0] == png((1, 2, 3)) and out["status"][1] == "error"
    assert "the row's bytes is not a readable image" in out["error"][1]


# ---- the stage workers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage_workers(tiny_root):
    m = load_manifest(
        None,
        [
            f"encode.model={tiny_root / 'IF-I-tiny'}",
            f"stage1.model={tiny_root / 'IF-I-tiny'}",
            f"stage2.model={tiny_root / 'IF-II-tiny'}",
            "stage1.num_inference_steps=4",
            "stage2.num_inference_steps=4",
            "stage1.micro_batch=2",
            "stage2.micro_batch=2",
        ],
    )
    return EncodeWorker(m.encode), Stage1Worker(m.stage1), Stage2Worker(m.stage2)


def mixed_batch(encode):
    params = ["", json.dumps({"stage1_guidance_scale": 2.0}), "", json.dumps({"strength": 0.5}), ""]
    batch = rows(
        ["a fox", "a fox", "an owl", "an owl", "a cat"],
        image=np.array([png((200, 0, 0)), png((200, 0, 0)), png((0, 0, 200)), png((0, 0, 200)), None], dtype=object),
        mask_image=np.array([None, None, png(0, mask=True), png(0, mask=True), None], dtype=object),
        params=np.array(params, dtype=object),
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


# ---- end to end ----------------------------------------------------------------------------


def test_mixed_dataset_end_to_end_with_retry_and_contact_sheets(ray_local, tiny_root, tmp_path):
    (tmp_path / "fox.png").write_bytes(png((180, 90, 20)))
    (tmp_path / "mask.png").write_bytes(png(0, mask=True))
    records = [
        {"id": "text", "prompt": "a lighthouse", "num_images": 2, "upscale_noise_level": 50},
        {"id": "img2img", "prompt": "a fox", "image": "fox.png", "strength": 0.6},
        {"id": "inpaint", "prompt": "a fox", "image": "fox.png", "mask_image": "mask.png"},
        {"id": "late", "prompt": "an owl", "image": "owl.png"},  # missing until the retry
        {"id": "bad", "prompt": "a cat", "stage2_noise_level": -3},
    ]
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "out"
    manifest = manifest_for(tiny_root, f"input.path={prompts}", "input.shard_size=3", output=str(out))
    summary = run(manifest, progress=False)
    assert (summary.rows, summary.ok, summary.error) == (6, 4, 2)
    assert summary.encode_texts - round(summary.encodes) >= 3  # "" once per actor, "a fox" shared

    def metadata():
        index = json.loads((out / "index.json").read_text())
        found = []
        for shard in index["shards"]:
            found += pq.read_table(out / shard["metadata"]).to_pylist()
        return {r["id"]: r for r in found}

    meta = metadata()
    assert sorted(meta) == ["bad", "img2img", "inpaint", "late", "text-0", "text-1"]
    assert meta["img2img"]["mode"] == "img2img" and meta["inpaint"]["mode"] == "inpaint"
    assert json.loads(meta["img2img"]["stage1_params"])["strength"] == 0.6
    assert json.loads(meta["text-1"]["upscale_params"])["noise_level"] == 50
    assert meta["text-0"]["seed"] != meta["text-1"]["seed"] and meta["text-0"]["sha256"] != meta["text-1"]["sha256"]
    assert meta["inpaint"]["nsfw_detected"] is False and meta["inpaint"]["watermarked"] is True
    assert "owl.png not found" in meta["late"]["error"] and "stage2_noise_level" in meta["bad"]["error"]
    for name in ("000000.jpg", "000001.jpg", "job.jpg"):
        assert Image.open(out / "contact" / name).size[0] >= 128

    # The missing image appears; a retry renders just that row as the shard's next attempt.
    (tmp_path / "owl.png").write_bytes(png((60, 60, 60)))
    summary = run(manifest, retry_errors=True, progress=False)
    assert (summary.rows, summary.ok) == (2, 1)  # "late" now renders; "bad" stays bad
    after = metadata()
    assert after["late"]["status"] == "ok" and after["late"]["mode"] == "img2img"
    assert {k: v["sha256"] for k, v in after.items() if k != "late"} == {
        k: v["sha256"] for k, v in meta.items() if k != "late"
    }


def test_timestep_presets_run_per_row_and_per_job(stage_workers, tiny_root):
    encode, stage1, _ = stage_workers
    batch = encode(
        rows(["a fox", "a fox"], params=np.array([json.dumps({"stage1_timesteps": "fast27"}), ""], dtype=object))
    )
    out = stage1(batch)
    assert list(out["status"]) == ["ok", "ok"], out["error"]
    preset = json.loads(out["stage1_params"][0])
    assert preset["timesteps"] == "fast27" and "num_inference_steps" not in preset
    assert not np.array_equal(out["stage1_image"][0], out["stage1_image"][1])
    m = load_manifest(None, [f"stage1.model={tiny_root / 'IF-I-tiny'}", "stage1.timesteps=smart27"])
    job = Stage1Worker(m.stage1)(batch)
    assert json.loads(job["stage1_params"][1])["timesteps"] == "smart27" and job["status"][1] == "ok"
