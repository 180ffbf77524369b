"""The planner: FLOP profile, plans that fit and come close to the ideal, packing, saved plans."""

from __future__ import annotations

import json

import pytest

from jobs.manifest import MANIFESTS_DIR, load_manifest
from jobs.perf.plan import Profile, StageProfile, flops_profile, naive, plan
from jobs.pools import packs
from tests.helpers import (
    ifrender,
)
from workers.errors import PlanError


@pytest.fixture(scope="module")
def production():
    return flops_profile(load_manifest(MANIFESTS_DIR / "production.yaml"))


def test_flop_profile_matches_the_published_counts(production):
    # ~1,584 TFLOP per 1024 px image at default steps with guidance: stage I 36%, II 20%, x4 43%.
    tflop = {s: p.seconds_per_image * 800 * 0.4 for s, p in production.stages.items()}
    assert sum(tflop.values()) == pytest.approx(1584, rel=0.01)
    assert tflop["stage1"] / sum(tflop.values()) == pytest.approx(0.36, abs=0.01)
    assert tflop["upscale"] / sum(tflop.values()) == pytest.approx(0.44, abs=0.01)
    fast = flops_profile(load_manifest(None, ["stage1.timesteps=smart27", "stage1.batch_size=8"]))
    assert fast.stages["stage1"].seconds_per_image == pytest.approx(
        production.stages["stage1"].seconds_per_image * 27 / 100
    )


@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 8, 16])
def test_plans_fit_the_gpus_and_come_close_to_the_ideal(production, gpus):
    chosen = plan(production, gpus, 80)
    shares = [a.num_gpus for a in chosen.stages.values() for _ in range(a.pool_size)]
    assert packs(shares, gpus) and sum(shares) <= gpus + 1e-9
    for stage, a in chosen.stages.items():
        assert production.stages[stage].memory_gb <= a.num_gpus * 80 + 1e-6  # any packing fits memory
    ideal = gpus / sum(p.seconds_per_image for p in production.stages.values())
    # Within 20% of the ideal (whole actors, packing and T5's memory floor take the rest).
    assert ideal * 0.8 <= chosen.images_per_second <= ideal * (1 + 1e-9)
    assert chosen.images_per_second > 1.15 * naive(production, gpus, 80).images_per_second
    rates = {s: a.gpus / production.stages[s].seconds_per_image for s, a in chosen.stages.items()}
    assert chosen.bottleneck == min(rates, key=rates.get)
    assert chosen.gpu_hours(1_000_000) == pytest.approx(1_000_000 / chosen.images_per_hour * gpus)


def test_packing_and_memory_limits():
    assert packs([0.7, 0.3, 0.5, 0.5], 2) and not packs([0.7, 0.7, 0.7], 2)
    # Largest first, as the reservations go: 0.3s land beside the 0.7s, not together.
    assert packs([0.3, 0.3, 0.7, 0.7], 2)
    # Whole GPUs are not shared: two of them leave no GPU for a 0.5.
    assert packs([2, 0.5, 0.5], 3) and not packs([2, 0.5], 2) and not packs([1, 1, 0.1], 2)
    big = Profile("t", "x", {"stage1": StageProfile(1.0, 30.0, 8)})
    with pytest.raises(PlanError, match="stage1: needs about 30 GB per actor at batch_size=8 but a GPU has 24 GB"):
        plan(big, 4, 24)
    # Memory, not compute, sets a light stage's share: 20 GB on 24 GB GPUs takes 0.8334 of one.
    light = Profile("t", "x", {"encode": StageProfile(0.01, 20.0, 8), "stage1": StageProfile(1.0, 4.0, 8)})
    assert plan(light, 2, 24).stages["encode"].num_gpus >= 20 / 24 - 1e-4


def test_plan_command_saves_a_plan_that_run_applies(tmp_path):
    saved = tmp_path / "plan.json"
    result = ifrender(
        "plan", str(MANIFESTS_DIR / "production.yaml"), "--gpus", "8", "--images", "1000000", "--save", str(saved)
    )
    assert result.returncode == 0, result.stderr
    assert "images/hour; bottleneck:" in result.stdout and "GPU-hours" in result.stdout
    record = json.loads(saved.read_text())
    from jobs.cli import _plan_overrides

    m = load_manifest(MANIFESTS_DIR / "production.yaml", _plan_overrides(str(saved)))
    for stage, a in record["plan"]["stages"].items():
        cfg = getattr(m, stage)
        assert (cfg.pool_size, cfg.num_gpus, cfg.batch_size) == (a["pool_size"], a["num_gpus"], a["batch_size"])
    bad = ifrender("run", "--plan", str(tmp_path / "nope.json"))
    assert bad.returncode == 1 and "expected a plan saved by `ifrender plan --save`" in bad.stderr


def test_a_plan_moves_group_resources_with_gpu_shares():
    cluster = load_manifest(MANIFESTS_DIR / "cluster.yaml", run_date="2026-11-22")
    chosen = plan(flops_profile(cluster), 8, 48)
    applied = load_manifest(MANIFESTS_DIR / "cluster.yaml", chosen.overrides(cluster), run_date="2026-11-22")
    for stage, a in chosen.stages.items():
        cfg = getattr(applied, stage)
        assert cfg.num_gpus == a.num_gpus and set(cfg.resources.values()) == {a.num_gpus}
