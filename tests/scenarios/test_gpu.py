"""On a CUDA machine: local-tiny with a GPU share per stage and fp16, every stage on CUDA.

Runs through the CLI in its own process (its own local Ray sized for the real GPUs).
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from tests.helpers import (
    ifrender,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_local_tiny_runs_every_stage_on_cuda_in_fp16(tiny_root, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(32)))
    out = tmp_path / "out"
    sets = ["groups=[]", f"input.path={prompts}", f"output.path={out}", "input.shard_size=8"]
    for stage, repo, share in (
        ("encode", "IF-I-tiny", 0.1),
        ("stage1", "IF-I-tiny", 0.3),
        ("stage2", "IF-II-tiny", 0.3),
        ("upscale", "x4-upscaler-tiny", 0.3),
    ):
        sets += [
            f"{stage}.model={tiny_root / repo}",
            f"{stage}.num_gpus={share}",
            f"{stage}.dtype=fp16",
            f"{stage}.device=cuda",
            f"{stage}.batch_size=8",
            f"{stage}.micro_batch=8",
        ]
    result = ifrender("run", *[a for s in sets for a in ("--set", s)], "--quiet")
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = pq.read_table(out / "data").to_pylist()
    assert len(rows) == 32 and all(r["status"] == "ok" for r in rows)
    for stage in ("encode", "stage1", "stage2", "upscale"):
        params = json.loads(rows[0][f"{stage}_params"])
        assert params["device"].startswith("cuda") and params["dtype"] == "fp16" and params["gpus"], (stage, params)


def test_every_mode_in_fp16_with_8bit_t5_records_peak_memory(tiny_root, tmp_path):
    """modes-tiny (text, img2img, inpainting, per-row settings) on CUDA, fp16 weights, 8-bit T5;
    the summary's peak GPU memory per stage is the number to record for the GPU check."""
    from jobs.manifest import MANIFESTS_DIR

    out = tmp_path / "out"
    sets = [f"output.path={out}", "encode.load_in_8bit=true"]
    for stage, share in (("encode", 0.1), ("stage1", 0.3), ("stage2", 0.3), ("upscale", 0.3)):
        sets += [f"{stage}.num_gpus={share}", f"{stage}.device=cuda", f"{stage}.dtype=fp16", f"{stage}.variant=fp16"]
    result = ifrender(
        "run", str(MANIFESTS_DIR / "modes-tiny.yaml"), *[a for s in sets for a in ("--set", s)], "--quiet"
    )
    print(result.stdout)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peak GPU memory per call by stage: encode" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["peak_gpu_gb"]) == {"encode", "stage1", "stage2", "upscale"}
    rows = pq.read_table(out / "data").to_pylist()
    assert {r["mode"] for r in rows if r["status"] == "ok"} == {"text2img", "img2img", "inpaint"}
