"""The benchmarks run end to end as a user runs them: `ifrender bench`'s three ways, the
simulation of a GPU cluster with stand-ins, and the GPU probe's dry run on the tiny models (their
numbers are the benchmarks', not the tests'). A minute or two each: the second tier."""

from __future__ import annotations

import json
import os
import re

import pytest

from jobs.plan.costs import Profile
from jobs.plan.search import plan


@pytest.mark.slow
def test_simulation_runs_every_image_through_stand_ins(tmp_path):
    """In its own process: the simulation starts a Ray with N logical GPUs of its own."""
    import subprocess
    import sys

    from jobs.manifest import MANIFESTS_DIR as M

    script = M.parent / "benchmarks" / "simulate.py"
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    args = [sys.executable, str(script), "--gpus", "2", "--images", "24", "--out", str(out), "--plot", str(png)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=M.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads(out.read_text())["results"]
    assert [(r["gpus"], r["allocation"], r["images"]) for r in runs] == [(2, "planned", 24), (2, "naive", 24)]
    assert all(r["steady_images_per_second"] > 0 for r in runs)
    assert set(runs[0]["mean_gap_seconds"]) >= {"encode->stage1", "stage1->stage2", "stage2->upscale"}
    busy = runs[0]["busy_in_steady_state"]
    assert set(busy) == {"encode", "stage1", "stage2", "upscale", "score"}  # production scores its images
    assert all(0 <= b <= 1 for v in busy.values() for b in v) and max(busy["upscale"]) > 0
    report = subprocess.run([sys.executable, str(script), "--report", str(out)], capture_output=True, text=True)
    assert "| 2 | planned |" in report.stdout and "Planned over one pool per stage: N=2: predicted" in report.stdout
    from PIL import Image

    assert Image.open(png).size == (760, 480)


# Run at interpreter start: ray and boto3 are not found, as where they are not installed.
HIDE_PACKAGES = """
import sys


class Hidden:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "boto3"):
            return None
        return self.finder.find_spec(name, path, target) if hasattr(self.finder, "find_spec") else None

    def __getattr__(self, name):  # package metadata and the rest: the finder's own
        return getattr(self.finder, name)


sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
"""


@pytest.mark.slow
def test_the_gpu_probe_runs_every_section_without_ray_and_writes_a_profile_the_planner_takes(tmp_path):
    """`benchmarks/gpu_probe.py --dry-run`: the tiny models on this CPU, in its own process, where
    Ray and boto3 cannot be imported (as on the GPU machine)."""
    import os
    import subprocess
    import sys

    from jobs.manifest import MANIFESTS_DIR as M

    absent = tmp_path / "absent"
    absent.mkdir()
    (absent / "sitecustomize.py").write_text(HIDE_PACKAGES)
    args = [sys.executable, str(M.parent / "benchmarks" / "gpu_probe.py"), "--dry-run", "--out", str(tmp_path)]
    args += ["--scratch", str(tmp_path / "scratch")]
    env = os.environ | {"PYTHONPATH": str(absent)}
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    probe = json.loads((tmp_path / "gpu-probe.json").read_text())
    sections = probe["sections"]
    expected = ["ceilings", "unets", "vae", "t5", "host", "workers", "sharing", "profile"]
    assert list(sections) == expected and not [k for k, v in sections.items() if "error" in v]
    unets = sections["unets"]
    assert {(r["layout"], r["batch"]) for r in unets["stage2"]} == {
        (layout, b) for layout in ("nchw", "channels_last") for b in (1, 2)
    }
    assert {(r["dtype"], r["finite"]) for r in sections["vae"]["rows"]} == {
        ("fp32", True),
        ("bf16", True),
        ("fp16", True),
    }
    assert all(r["ms_per_unguided_step"] > 0 for r in unets["stage2"])  # a step outside the guidance interval
    for stage in ("stage1", "stage2", "upscale"):  # two step counts each, through the real workers
        assert set(sections["workers"][stage]["seconds_per_call"]) == {"2", "3"}
        assert sections["workers"][stage]["half_interval_seconds_per_call"] > 0  # and a half interval
    assert sections["sharing"]["alone_steps_per_s"] > 0 and len(sections["sharing"]["together_steps_per_s"]) == 2
    profile = Profile.load(tmp_path / "gpu-profile.json")
    assert set(profile.stages) == {"encode", "stage1", "stage2", "upscale"}
    assert 0 < profile.timeslice_efficiency <= 1
    assert plan(profile, 8, 80).images_per_second > 0


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
