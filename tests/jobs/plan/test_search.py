"""The planner: FLOP profile, plans that fit and come close to the ideal, packing, saved plans."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from jobs.cli import _load
from jobs.manifest import MANIFESTS_DIR, load_manifest
from jobs.plan.costs import Profile, StageProfile, flops_profile, step_costs
from jobs.plan.packing import packs
from jobs.plan.search import Allocation, Plan, choose, naive, partitions, plan, plan_layouts, predict
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
    fast = flops_profile(load_manifest(None, ["groups=[]", "stage1.timesteps=smart27", "stage1.batch_size=8"]))
    assert fast.stages["stage1"].seconds_per_image == pytest.approx(
        production.stages["stage1"].seconds_per_image * 27 / 100
    )


@pytest.mark.parametrize("gpus", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("memory", [80, 24])
def test_every_layouts_plan_fits_the_gpus_and_the_pick_comes_close_to_the_ideal(production, gpus, memory):
    layouts = plan_layouts(production, gpus, memory)
    if gpus == 1 and memory == 24:  # 42 GB of models and activations on one 24 GB GPU
        need = round(sum(p.memory_gb for p in production.stages.values()), 2)
        with pytest.raises(PlanError, match=f"replicas: a copy of the cascade needs about {need:g} GB"):
            choose(layouts)
        return
    for layout, p in layouts.items():
        if not isinstance(p, Plan):
            continue
        assert p.layout == layout
        shares = [a.num_gpus for a in p.pools.values() for _ in range(a.pool_size)]
        assert packs(shares, gpus) and sum(shares) <= gpus + 1e-9
        for a in p.pools.values():
            need = sum(production.stages[s].memory_gb for s in a.stages)
            assert need <= max(1.0, a.num_gpus) * memory + 1e-6  # any packing fits memory
        rate, bottleneck, _ = predict(production, p.pools, gpus)
        assert (rate, bottleneck) == (p.images_per_second, p.bottleneck)
    chosen = choose(layouts)
    ideal = gpus / sum(p.seconds_per_image for p in production.stages.values())
    assert ideal * 0.85 <= chosen.images_per_second <= ideal * (1 + 1e-9)
    assert chosen.images_per_second >= naive(production, gpus, memory).images_per_second
    # A copy of the cascade fits 80 GB, and copies keep every GPU busy: replicas. Not in 24 GB.
    assert chosen.layout == ("replicas" if memory == 80 else "fused")
    assert isinstance(layouts["replicas"], Plan) == (memory == 80)
    assert chosen.gpu_hours(1_000_000) == pytest.approx(1_000_000 / chosen.images_per_hour * gpus)


def test_time_slicing_and_shares_disagree_where_a_busy_pool_shares_a_gpu_with_an_idle_one(production):
    """encode and stage2 with half a GPU each, as the fractional plans had them: by shares stage2
    runs at half speed; time-sliced, T5 (a hundredth of the work) gives stage2 its time."""
    one = {
        "encode": Allocation(("encode",), 1, 0.5, 32),
        "stage2": Allocation(("stage2",), 1, 0.5, 8),
    }
    s_encode, s_stage2 = (production.stages[s].seconds_per_image for s in ("encode", "stage2"))
    shares, _, _ = predict(production, one, gpus=1, mps=True)
    sliced, bottleneck, _ = predict(production, one, gpus=1)
    assert shares == pytest.approx(0.5 / s_stage2)
    assert sliced == pytest.approx(1 / (s_encode + s_stage2))
    assert sliced / shares > 1.99 and bottleneck == "GPU 0, time-sliced by encode + stage2"
    # Two busy stages of equal cost on one GPU: both models agree, each gets half, and a
    # measured switching loss takes its part.
    even = Profile("t", "x", {"stage1": StageProfile(1.0, 10, 8), "stage2": StageProfile(1.0, 10, 8)}, 0.9)
    halves = {s: Allocation((s,), 1, 0.5, 8) for s in ("stage1", "stage2")}
    assert predict(even, halves, 1, mps=True)[0] == pytest.approx(0.5)
    assert predict(even, halves, 1)[0] == pytest.approx(0.45)


def test_partitions_cover_every_layout_of_the_cascade():
    runs = partitions(("encode", "stage1", "stage2", "upscale"))
    assert len(runs) == 8 and len(set(runs)) == 8
    assert (("encode", "stage1", "stage2", "upscale"),) in runs  # replicas
    assert (("encode",), ("stage1",), ("stage2",), ("upscale",)) in runs  # pipeline
    for r in runs:
        assert tuple(s for group in r for s in group) == ("encode", "stage1", "stage2", "upscale")


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
    light = Profile("t", "x", {"encode": StageProfile(0.01, 20.0, 8), "stage1": StageProfile(1.0, 8.0, 8)})
    pipeline = plan_layouts(light, 2, 24)["pipeline"]
    assert pipeline.pools["encode"].num_gpus >= 20 / 24 - 1e-4
    assert plan_layouts(light, 2, 24)["replicas"].startswith("a copy of the cascade needs about 28 GB")


def test_plan_command_prints_every_layout_and_saves_a_plan_that_run_applies(tmp_path):
    saved = tmp_path / "plan.json"
    result = ifrender(
        "plan",
        str(MANIFESTS_DIR / "production.yaml"),
        "--gpus",
        "8",
        "--gpu-memory",
        "80",
        "--images",
        "1000000",
        "--save",
        str(saved),
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "images/hour; bottleneck:" in out and "GPU-hours" in out
    for layout in ("replicas", "fused", "pipeline"):
        assert re.search(rf"{layout} +[\d,]+ images/h", out), layout
    assert re.search(r"chosen replicas", out)
    record = json.loads(saved.read_text())
    m = _load(
        argparse.Namespace(
            manifest=str(MANIFESTS_DIR / "production.yaml"), set=[], run_date=None, run_id=None, plan=str(saved)
        )
    )
    assert m.layout == record["plan"]["layout"] == "replicas"
    for name, a in record["plan"]["pools"].items():
        _, pool = m.model_pools()[name]
        assert (pool.pool_size, pool.num_gpus, pool.batch_size) == (a["pool_size"], a["num_gpus"], a["batch_size"])
    bad = ifrender("run", "--plan", str(tmp_path / "nope.json"))
    assert bad.returncode == 1 and "expected a plan saved by `ifrender plan --save`" in bad.stderr


@pytest.mark.parametrize("layout", ["replicas", "fused", "pipeline"])
def test_a_plan_of_any_layout_applies_and_moves_group_resources_with_gpu_shares(layout):
    cluster = load_manifest(MANIFESTS_DIR / "cluster.yaml", run_date="2026-11-22")
    chosen = plan_layouts(flops_profile(cluster), 8, 48)[layout]
    applied = chosen.apply(cluster)
    assert applied.layout == layout
    for name, a in chosen.pools.items():
        stages, pool = applied.model_pools()[name]
        assert stages == a.stages and (pool.pool_size, pool.num_gpus) == (a.pool_size, a.num_gpus)
        assert set(pool.resources.values()) == {a.num_gpus}
        for stage in stages:  # the workers get the pool's share: what picks their device
            assert applied.stage_config(stage).num_gpus == a.num_gpus


@pytest.mark.parametrize("seconds", [0.0, -0.4, float("nan"), float("inf")])
def test_a_profile_with_a_stage_that_takes_no_time_is_refused_naming_it(seconds):
    with pytest.raises(PlanError, match=r"stage stage2 has seconds_per_image=.*expected a positive, finite time"):
        Profile("t", "x", {"stage1": StageProfile(1.0, 10, 8), "stage2": StageProfile(seconds, 10, 8)})
    with pytest.raises(PlanError, match=r"timeslice_efficiency=0.0; expected a share"):
        Profile("t", "x", {"stage1": StageProfile(1.0, 10, 8)}, 0.0)


def test_step_costs_split_a_call_and_never_go_negative_on_noisy_timings():
    fixed, per_step = step_costs({2: 1.0 + 2 * 0.5, 3: 1.0 + 3 * 0.5})
    assert (round(fixed, 9), round(per_step, 9)) == (1.0, 0.5)
    # The 3-step call timed faster than the 2-step one (a busy CPU): each call's time all per step,
    # the larger rate, so a call at any step count costs at least what was measured.
    fixed, per_step = step_costs({2: 0.9, 3: 0.6})
    assert fixed == 0.0 and per_step == 0.45 and fixed + 100 * per_step > 0
