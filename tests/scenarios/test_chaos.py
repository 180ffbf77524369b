"""The chaos harness's fast tier: the real commit path killed at every storage call (before it and
mid-write), then resumed; and two writers racing with random delays. After each trial every
reader of data/ sees each row once, no temporary file is visible, no image is orphaned, and the
tars and embedded images equal the stored files. Prints the figures docs/reliability.md records."""

from __future__ import annotations

import itertools
import os
import time

import boto3
import pytest

from jobs.output.layout import Derived
from tests.harness.chaos import count_calls, kill_trials, race_trials

ALL = Derived(embed_images=True, webdataset=True, contact_sheets=True)


def outputs(tmp_path):
    n = itertools.count()
    return lambda: str(tmp_path / f"out{next(n)}")


def s3_outputs():
    bucket = f"chaos-{os.getpid()}-{time.monotonic_ns()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    n = itertools.count()
    return lambda: f"s3://{bucket}/out{next(n)}"


def report(name: str, figures) -> None:
    print(f"\n{name}\n{figures.table()}")
    assert figures.problems == []
    for counter in (figures.lost, figures.duplicated, figures.uncommitted):
        assert sum(counter.values()) == 0, dict(counter)


def test_every_kill_point_of_the_commit_path_resumes_exactly_once(ray_local, tmp_path):
    new_output = outputs(tmp_path)  # one factory: every trial gets an output of its own
    calls = count_calls(new_output, ALL)
    figures = kill_trials(new_output, ALL, sampled=("ray", "datasets"), every=73, hf_cache=str(tmp_path / "hf"))
    assert figures.trials == 2 * sum(calls) >= 200
    assert figures.reads["ray"] >= 6 and figures.reads["datasets"] >= 6  # slower readers, on every 73rd
    report(f"kill points, local: {calls} storage calls per phase", figures)


def test_two_writers_with_random_delays_never_crash_and_leave_each_row_once(tmp_path):
    report("two writers, local", race_trials(outputs(tmp_path), ALL, trials=100, delay_s=0.001))


@pytest.mark.slow
def test_kill_points_and_two_writers_on_s3(s3_server):
    new_output = s3_outputs()
    calls = count_calls(new_output, ALL)
    figures = kill_trials(new_output, ALL, readers=("pyarrow",), stride=12)
    assert figures.trials >= 2 * sum(calls) // 12
    report(f"kill points, S3 (every 12th): {calls} storage calls per phase", figures)
    report("two writers, S3", race_trials(new_output, ALL, trials=6, delay_s=0.005, readers=("pyarrow",)))
