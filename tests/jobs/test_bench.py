"""The profiler, the bench and the simulation run end to end (their numbers are the benchmarks', not
the tests')."""

from __future__ import annotations

import pytest

from jobs.manifest import load_manifest
from jobs.plan.costs import Profile
from jobs.plan.search import plan
from tests.helpers import PER_STAGE_POOLS


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


def test_bench_wants_more_images_than_one_batch(tmp_path):
    from jobs.bench import bench

    with pytest.raises(
        ValueError, match=r"--images 4: expected more than the largest batch_size \(4\).*Fix: --images 16"
    ):
        bench(load_manifest(None, list(PER_STAGE_POOLS)), 4, tmp_path)
    with pytest.raises(ValueError, match=r"expected a manifest in the pipeline layout .*found groups \[\['encode'"):
        bench(load_manifest(None), 16, tmp_path)  # local-tiny's one replica
    assert not (tmp_path / "pipeline").exists()  # refused before any rendering


def test_the_steady_rate_starts_after_the_first_output_call_whatever_its_size():
    """A pool's smaller last batch may come out first: the rate is still measured, never 0."""
    from jobs.bench import steady_rate

    assert steady_rate([10.0, 10.0, 12.0, 12.0, 12.0, 12.0]) == (4 / 2.0, 2.0)  # 2 rows first, then 4
    assert steady_rate([12.0] * 4 + [10.0] * 2) == (4 / 2.0, 2.0)  # in any order
    assert steady_rate([5.0, 5.0]) == (0.0, 0.0)  # one call: nothing to measure after it
