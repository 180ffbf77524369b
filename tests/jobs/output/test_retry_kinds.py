"""Which failed rows --retry-errors renders again: the messages the real producers write (the row
reader, a stage, the writer, the safety checker), classified by workers.errors.retryable."""

from __future__ import annotations

import json

import numpy as np

from jobs.input.rows import read_shards
from jobs.input.shards import plan_shards, shard_items
from jobs.manifest import load_manifest
from tests.helpers import png
from workers.errors import retryable, row_error


def test_input_problems_are_not_retried_and_model_or_storage_failures_are(tmp_path):
    (tmp_path / "broken.png").write_bytes(png((1, 2, 3))[:40])
    records = [
        {"id": "seed", "prompt": "a", "seed": -1},
        {"id": "none", "prompt": None},
        {"id": "corrupt", "prompt": "a", "image": "broken.png"},
        {"id": "late", "prompt": "a", "image": "later.png"},
        {"id": "size", "prompt": "a", "width": 10**6, "height": 10**6},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    sets = [f"input.path={tmp_path / 'p.jsonl'}", "input.shard_size=8", f"output.path={tmp_path / 'o'}"]
    m = load_manifest(None, sets)
    [shard] = plan_shards(m.input)
    batch = read_shards({k: np.array([v], dtype=object) for k, v in shard_items([shard])[0].items()}, 0, m.input)
    errors = dict(zip(batch["id"], batch["error"]))
    assert all(errors.values()), errors
    verdict = {i: retryable(e) for i, e in errors.items()}
    assert verdict.pop("late") is True, errors["late"]  # not there yet: it may be uploaded
    assert not any(verdict.values()), errors

    assert retryable(row_error("stage2", RuntimeError("CUDA error: an illegal memory access")))
    assert retryable(row_error("write", TimeoutError("read timed out")))
    assert retryable(row_error("encode+stage1", OSError("connection reset")))
    assert not retryable(row_error("upscale", ValueError("1024x1024 is 1048576 pixels, over upscale.max_pixels")))
    assert not retryable("stage1: safety checker: nsfw detected (on_flagged=error)")
    assert not retryable("") and not retryable(None)
