"""The Ray Data chain: the registry's stages in order, then the writer."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("last_stage", "models"),
    [
        ("stage1", ["EncodeWorker", "Stage1Worker"]),
        ("upscale", ["EncodeWorker", "Stage1Worker", "Stage2Worker", "UpscaleWorker"]),
    ],
)
def test_the_chain_runs_the_registry_stages_in_order(ray_local, prompts, tmp_path, tiny_manifest, last_stage, models):
    from jobs.input.shards import plan_shards
    from jobs.output.commits import Work
    from jobs.run.chain import build_dataset

    m = tiny_manifest(f"input.path={prompts}", f"last_stage={last_stage}", output=str(tmp_path / "o"))
    op = build_dataset(m, [Work(s, 0) for s in plan_shards(m.input)], "r1")._logical_plan.dag
    chain = []
    while op is not None:
        chain.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    maps = [name[len("MapBatches(") : -1] for name in reversed(chain) if name.startswith("MapBatches(")]
    assert maps == ["read_shards", *models, "WriteWorker"]
