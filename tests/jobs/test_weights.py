"""Staging checkpoints: only the files a manifest loads, to a directory or an S3 mirror, synced
back to a worker's disk and rendered from offline."""

from __future__ import annotations

import json
import os

import boto3
import pytest

from jobs.render import run
from jobs.weights import needed_files, stage_models
from tests.helpers import (
    ifrender,
)
from workers.models import sync_mirror


def test_picks_the_variant_safetensors_and_only_the_components_used():
    listing = [
        "model_index.json",
        "LICENSE",
        "README.md",
        "pipeline.png",
        "text_encoder/config.json",
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/model.fp16-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.fp16.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/pytorch_model.bin",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.bin",
        "unet/flax_diffusion_pytorch_model.msgpack",
        "safety_checker/model.safetensors",
        "safety_checker/config.json",
    ]
    fp16 = needed_files(listing, {"text_encoder": "fp16", "unet": "fp16"})
    assert fp16 == [
        "model_index.json",
        "LICENSE",
        "text_encoder/config.json",
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/model.fp16-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.fp16.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.bin",  # the variant, even as a pickle, over plain weights
    ]
    plain = needed_files(listing, {"unet": None})
    assert plain == ["model_index.json", "LICENSE", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    # A variant the repo lacks falls back to the plain weights, as from_pretrained does.
    assert needed_files(listing, {"unet": "bf16"}) == plain


def test_stage_to_a_directory_takes_only_what_each_stage_loads(tmp_path, tiny_manifest):
    manifest = tiny_manifest(
        "encode.variant=fp16", "encode.load_in_8bit=true", "last_stage=stage2", output=str(tmp_path / "o")
    )
    staged = stage_models(manifest, str(tmp_path / "models"))
    if_i = tmp_path / "models" / "IF-I-tiny"
    assert staged == {
        "encode.model": str(if_i),
        "stage1.model": str(if_i),
        "stage2.model": str(tmp_path / "models" / "IF-II-tiny"),
    }
    files = sorted(str(p.relative_to(if_i)) for p in if_i.rglob("*") if p.is_file())
    # T5 in its fp16 variant (quantised to 8 bit at load), the UNet in plain weights, nothing else.
    assert "text_encoder/model.fp16.safetensors" in files and "text_encoder/model.safetensors" not in files
    assert "unet/diffusion_pytorch_model.safetensors" in files
    assert "unet/diffusion_pytorch_model.fp16.safetensors" not in files
    assert not (tmp_path / "models" / "x4-upscaler-tiny").exists()  # last_stage=stage2 never loads it


@pytest.mark.slow
def test_stage_to_s3_sync_back_and_render_offline(ray_local, s3_server, tiny_root, tmp_path, tiny_manifest):
    boto3.client("s3").create_bucket(Bucket="model-mirror")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    overrides = [f"input.path={prompts}", "last_stage=stage2", "stage1.variant=fp16", "stage1.dtype=fp32"]
    base = tiny_manifest(*overrides, output=str(tmp_path / "o"))
    staged = stage_models(base, "s3://model-mirror/weights")
    assert staged["stage1.model"] == "s3://model-mirror/weights/IF-I-tiny"
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="model-mirror")["Contents"]]
    assert "weights/IF-I-tiny/unet/diffusion_pytorch_model.fp16.safetensors" in keys
    assert "weights/IF-I-tiny/unet/diffusion_pytorch_model.safetensors" not in keys

    # Sync: a first call downloads, a second finds the stamp current and touches nothing.
    local = sync_mirror(staged["stage2.model"], tmp_path / "cache")
    assert (local / "model_index.json").read_bytes() == (tiny_root / "IF-II-tiny" / "model_index.json").read_bytes()
    weights = local / "unet" / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert sync_mirror(staged["stage2.model"], tmp_path / "cache") == local and weights.stat().st_mtime_ns == mtime
    # A corrupted local file (same size, other bytes) is found by its ETag and fetched again.
    (local / ".ifrender-sync.json").unlink()
    weights.write_bytes(b"\0" * weights.stat().st_size)
    sync_mirror(staged["stage2.model"], tmp_path / "cache")
    assert (
        weights.read_bytes() == (tiny_root / "IF-II-tiny" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )

    # Render with every model read from the mirror; workers sync it at start, offline.
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    mirrored = [f"{field}={uri}" for field, uri in staged.items()]
    summary = run(tiny_manifest(*overrides, *mirrored, output=str(tmp_path / "o")), progress=False)
    assert summary.rows == 2 and summary.ok == 2, summary.errors


def test_missing_mirror_fails_before_rendering(s3_server, tmp_path, tiny_manifest):
    boto3.client("s3").create_bucket(Bucket="empty-mirror")
    manifest = tiny_manifest("stage1.model=s3://empty-mirror/IF-I-XL-v1.0", output=str(tmp_path / "o"))
    with pytest.raises(RuntimeError, match=r"no staged checkpoint at s3://empty-mirror/IF-I-XL-v1.0 .*stage-models"):
        run(manifest, progress=False)


def test_stage_models_command_prints_the_settings_to_render_from_the_copy(tmp_path):
    result = ifrender("stage-models", "--set", "last_stage=stage1", "--to", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert f"--set encode.model={tmp_path / 'm' / 'IF-I-tiny'}" in result.stdout
    assert json.loads((tmp_path / "m" / "IF-I-tiny" / "model_index.json").read_text())["_class_name"] == "IFPipeline"
    # local-tiny scores: CLIP's files (a transformers repo's root) and the aesthetic head's one file
    assert f"--set score.model={tmp_path / 'm' / 'clip-tiny'}" in result.stdout
    assert f"--set score.aesthetic_model={tmp_path / 'm' / 'aesthetic-tiny'}" in result.stdout
    clip = sorted(p.name for p in (tmp_path / "m" / "clip-tiny").iterdir())
    assert "config.json" in clip and "model.safetensors" in clip and "tokenizer.json" in clip
    assert sorted(p.name for p in (tmp_path / "m" / "aesthetic-tiny").iterdir()) == ["aesthetic-model.pth"]
    # and validate finds every checkpoint in the copies
    sets = [a for s in result.stdout.splitlines()[-1].split("--set ")[1:] for a in ("--set", s.strip())]
    check = ifrender("validate", "--set", "last_stage=stage1", *sets)
    models = next(line for line in check.stderr.splitlines() if line.startswith("models:"))  # the checks' lines
    assert models.startswith("models: ok") and f"score {tmp_path / 'm' / 'clip-tiny'}" in models, check.stderr


def test_a_mirror_sync_skips_folder_markers_and_refuses_keys_that_escape_the_cache(s3_server, tmp_path):
    import boto3

    from workers.errors import StagingError

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="mirror-keys")
    for key in ("ckpt/model_index.json", "ckpt/unet/", "ckpt/unet/config.json"):
        s3.put_object(Bucket="mirror-keys", Key=key, Body=b"{}" if not key.endswith("/") else b"")
    target = sync_mirror("s3://mirror-keys/ckpt", tmp_path / "cache")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        ".ifrender-sync.json",
        "model_index.json",
        "unet/config.json",
    ]
    s3.put_object(Bucket="mirror-keys", Key="ckpt/../../outside.txt", Body=b"x")
    with pytest.raises(StagingError, match=r"outside .*cache.*Fix: remove it from the mirror"):
        sync_mirror("s3://mirror-keys/ckpt", tmp_path / "cache2")
    assert not (tmp_path / "outside.txt").exists() and not list((tmp_path / "cache2").rglob("*.txt"))
