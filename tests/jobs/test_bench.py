"""The profiler, the bench and the simulation run end to end (their numbers are the benchmarks', not
the tests')."""

from __future__ import annotations

import os
import re

import pytest

from jobs.manifest import load_manifest
from jobs.plan.costs import Profile
from jobs.plan.search import plan


def test_profiler_measures_every_stage_at_each_batch_size(tmp_path, tiny_manifest):
    from jobs.plan.profile import profile_stages

    m = tiny_manifest("last_stage=stage2", output=str(tmp_path / "o"))
    profile, measurements = profile_stages(m, [1, 2], repeats=1)
    assert {(x["stage"], x["batch_size"]) for x in measurements} == {
        (s, b) for s in ("encode", "stage1", "stage2") for b in (1, 2)
    }
    assert all(x["seconds_per_image"] > 0 and x["peak_gb"] > 0 for x in measurements)
    profile.save(tmp_path / "p.json")
    again = Profile.load(tmp_path / "p.json")
    assert again.stages == profile.stages
    assert plan(again, 1, 80).images_per_second > 0


@pytest.mark.slow
def test_bench_renders_the_same_images_three_ways_and_checks_the_planners_pick(ray_local, tmp_path, tiny_manifest):
    from jobs.bench import bench, report
    from jobs.machine_load import verdict

    m = tiny_manifest("last_stage=stage2", "stage1.batch_size=2", "stage2.batch_size=2", output=str(tmp_path / "o"))
    result = bench(m, 6, tmp_path / "bench")
    assert result["pipeline"]["images"] == result["replicas"]["images"] == result["sequential"]["images"] == 6
    assert result["replicas"]["layout"] == "replicas" and result["replicas"]["pools"] == {
        "encode+stage1+stage2": os.cpu_count()
    }
    # Same rows, seeds, steps and compute shapes: replicas give the pipeline's bytes; the
    # sequential process on all cores the same images up to thread-count rounding.
    assert result["replicas_bit_identical"] is True
    assert result["images_compared"] == 6 and result["max_pixel_diff"] <= 2
    rates = result["images_per_second"]
    assert set(rates) >= {"pipeline", "replicas", "sequential"} and all(v > 0 for v in rates.values())
    assert result["ratios"]["replicas/pipeline"] == pytest.approx(rates["replicas"] / rates["pipeline"], rel=1e-2)
    assert result["planner"]["chosen"] in rates  # the pick is always measured
    assert set(result["pipeline"]["busy_fraction"]) == {"encode", "stage1", "stage2"}
    assert set(result["pipeline"]["gap_s"]) == {"encode->stage1", "stage1->stage2"}
    text = report(result)
    assert re.search(r"pipeline: [\d.]+ images/s +replicas .*: [\d.]+ images/s +sequential \(one process\)", text)
    assert "ratios: replicas/pipeline" in text and "replicas and pipeline bit for bit: True" in text
    # Each way's share taken by other processes is recorded; the pick is reported only on a quiet machine.
    assert set(result["machine"]["other_process_cores"]) == set(rates)
    picked = f"the planner picks {result['planner']['chosen']}"
    if result["planner"]["unreliable"]:
        assert "NO PICK: other processes used" in text and picked not in text
    else:
        assert picked in text and "NO PICK" not in text
    busy = result | {"planner": result["planner"] | {"unreliable": verdict({"pipeline": 0.0, "replicas": 1.1})}}
    assert "NO PICK: other processes used up to 1.10 cores" in report(busy) and picked not in report(busy)


def test_bench_wants_more_images_than_one_batch(tmp_path):
    from jobs.bench import bench

    with pytest.raises(
        ValueError, match=r"--images 4: expected more than the largest batch_size \(4\).*Fix: --images 16"
    ):
        bench(load_manifest(None), 4, tmp_path)
    assert not (tmp_path / "pipeline").exists()  # refused before any rendering


def test_the_steady_rate_starts_after_the_first_output_call_whatever_its_size():
    """A pool's smaller last batch may come out first: the rate is still measured, never 0."""
    from jobs.bench import steady_rate

    assert steady_rate([10.0, 10.0, 12.0, 12.0, 12.0, 12.0]) == (4 / 2.0, 2.0)  # 2 rows first, then 4
    assert steady_rate([12.0] * 4 + [10.0] * 2) == (4 / 2.0, 2.0)  # in any order
    assert steady_rate([5.0, 5.0]) == (0.0, 0.0)  # one call: nothing to measure after it
