"""Exactly-once under kills and faults: a killed driver, a killed actor, two jobs on one output,
S3 slowdowns and lost answers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import boto3
import pyarrow.parquet as pq
import pytest

from jobs.output.commits import list_commits
from jobs.output.layout import SCHEMA
from jobs.render import run
from tests.helpers import (
    PER_STAGE_POOLS,
    FaultyS3Proxy,
    check_exactly_once,
    ifrender,
)
from workers.storage import join, list_prefix, read_bytes

PROMPTS = [f"prompt {i}: a lighthouse in a storm" for i in range(12)]


def shard_files(out: str) -> list[str]:
    """The published shards' data files (data/schema.parquet, written at the start, is none)."""
    return [k for k in list_prefix(out, "data/") if k != SCHEMA]


def _args(tiny_root, prompts, out, *extra):
    sets = [
        *PER_STAGE_POOLS,
        f"input.path={prompts}",
        f"output.path={out}",
        "input.shard_size=2",
        "last_stage=stage2",
        f"encode.model={tiny_root / 'IF-I-tiny'}",
        f"stage1.model={tiny_root / 'IF-I-tiny'}",
        f"stage2.model={tiny_root / 'IF-II-tiny'}",
        "stage1.num_inference_steps=4",
        "stage2.num_inference_steps=8",
        "stage1.batch_size=2",
        "stage2.batch_size=2",
        *extra,
    ]
    return ["run", *[a for s in sets for a in ("--set", s)], "--quiet"]


@pytest.mark.slow
def test_killed_driver_resumes_exactly_once(tiny_root, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = str(tmp_path / "out")
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *_args(tiny_root, prompts, out)],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list_prefix(out, "commits/") and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and its local Ray, as a preempted node would
    job.wait()
    first = len(list_commits(out))
    assert 1 <= first < len(PROMPTS) // 2, "the kill should land mid-run"
    status = ifrender("status", out)
    assert status.returncode == 0 and f"{len(PROMPTS) // 2} shards, {first} committed" in status.stdout
    assert f"pending {len(PROMPTS) - 2 * first}" in status.stdout

    result = ifrender(*_args(tiny_root, prompts, out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped (done before) {first}" in result.stdout
    check_exactly_once(out, len(PROMPTS))


@pytest.mark.slow
def test_stage_actors_killed_at_ten_random_moments_are_restarted_and_rows_come_out_once(
    ray_local, tiny_root, tmp_path, tiny_manifest
):
    import random

    import psutil

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"prompt {i}: a lighthouse in a storm" for i in range(40)) + "\n")
    out = str(tmp_path / "out")
    args = _args(tiny_root, prompts, out, "input.shard_size=4")
    manifest = tiny_manifest(*[a for a in args[1:-1] if a != "--set"], output=out)
    killed: list[str] = []
    done = threading.Event()
    pick = random.Random(13)

    def kill_actors_at_random_moments():
        # Ray titles actor processes "ray::MapWorker(MapBatches(Stage2Worker))..."
        while not done.is_set() and len(killed) < 10:
            time.sleep(pick.uniform(0.5, 2.0))
            stage = pick.choice(["EncodeWorker", "Stage1Worker", "Stage2Worker", "WriteWorker"])
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if f"MapBatches({stage})" in " ".join(proc.info["cmdline"] or []):
                    os.kill(proc.info["pid"], signal.SIGKILL)
                    killed.append(stage)
                    break

    killer = threading.Thread(target=kill_actors_at_random_moments, daemon=True)
    killer.start()
    summary = run(manifest, progress=False)
    done.set()
    killer.join(5)
    print(f"actors killed mid-run: {len(killed)} ({', '.join(killed)})")
    assert len(killed) >= 10, killed
    assert summary.committed_shards == 10 and summary.uncommitted_shards == 0
    check_exactly_once(out, 40)


@pytest.mark.slow
def test_two_jobs_on_one_output_share_the_work_and_commit_each_shard_once(tiny_root, tmp_path):
    """Two drivers of one job on one output at once (an overlapping nightly run): the shard leases
    split the work, so the rows are rendered once between them, not once each; both end with
    exit code 0 and an output holding every row once. On S3 the commit race runs in process, many
    times over (tests/scenarios/test_chaos.py)."""
    out = str(tmp_path / "out")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:8]) + "\n")
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    args = _args(
        tiny_root, prompts, out, "last_stage=stage1", "input.shard_size=1", "stage1.batch_size=1", "ray.chunk_shards=2"
    )
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", "jobs.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [job.communicate(timeout=600) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], [err[-2000:] for _, err in results]
    markers = [join(out, k) for k in list_prefix(out, "commits/")]
    assert len(markers) == 8 and all(m.endswith("-000.json") for m in markers)
    check_exactly_once(out, 8)
    # the jobs' own accounts agree: 8 commits between them, each other shard lost or skipped
    committed = [int(re.search(r"shards committed (\d+)", o)[1]) for o, _ in results]
    assert sum(committed) == 8, committed
    rendered = [int(re.search(r"this run: rows (\d+)", o)[1]) for o, _ in results]
    assert sum(rendered) == 8, rendered  # each row rendered once between the two drivers
    assert list_prefix(out, "leases/") == []  # both released what they held
    runs = {json.loads(read_bytes(m))["run_id"] for m in markers}
    print(f"shards committed per job: {committed}, rows rendered per job: {rendered}, by {len(runs)} runs")


@pytest.mark.slow
def test_job_survives_s3_slowdowns_and_lost_answers(s3_server, tiny_root, tmp_path):
    boto3.client("s3").create_bucket(Bucket="flaky")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:8]) + "\n")
    with FaultyS3Proxy(int(s3_server.rsplit(":", 1)[1])) as proxy:
        secret = "ifrender-secret-4c1f9a"  # the server accepts any key; it must never be written out
        env = os.environ | {
            "RAY_AUTH_MODE": "disabled",
            "AWS_ENDPOINT_URL_S3": proxy.endpoint,
            "AWS_SECRET_ACCESS_KEY": secret,
        }
        env.pop("RAY_ADDRESS", None)
        args = _args(tiny_root, prompts, "s3://flaky/job", "last_stage=stage1")
        result = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *args], env=env, capture_output=True, text=True, timeout=600
        )
    assert result.returncode == 0, result.stderr[-3000:]
    assert proxy.counts["503"] >= 5 and proxy.counts["dropped"] >= 3, proxy.counts
    check_exactly_once("s3://flaky/job", 8)  # read back directly from the server, not the proxy
    assert secret not in result.stdout + result.stderr
    for uri in (join("s3://flaky/job", k) for k in list_prefix("s3://flaky/job")):
        assert secret.encode() not in read_bytes(uri), uri


@pytest.mark.slow
def test_a_run_stopped_between_chunks_is_finished_by_the_next_one(tiny_manifest, ray_local, tmp_path):
    """--stop-after (a night's budget): the first run renders one chunk of one shard, then starts
    no other and reports the rest as left (exit code 4 in the CLI); the same job run again
    renders only what is left, and every row is in the output once."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS[:6]))
    out = tmp_path / "out"
    m = tiny_manifest(
        f"input.path={prompts}", "input.shard_size=2", "last_stage=stage1", "ray.chunk_shards=1", output=str(out)
    )
    # A budget the first chunk overruns: it runs (the first always does), and no other starts.
    first = run(m, progress=False, stop_after_s=0.5)
    assert (first.committed_shards, first.uncommitted_shards, first.ok) == (1, 2, 2)
    assert first.stopped == "--stop-after 0.5 s reached with 2 shards to go"
    second = run(m, progress=False)
    assert second.skipped_shards == first.committed_shards and second.uncommitted_shards == 0
    check_exactly_once(str(out), 6)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_code_4_and_the_plain_resume_renders_every_row(tiny_root, tmp_path):
    """The output on a small tmpfs that fills mid-run: no row is failed for it (no `No space left`
    error row is committed), what committed stays, exit 4 names the cause; with space freed the
    same command renders the rest, every row once."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): run as root")
    try:
        prompts = tmp_path / "p.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
        out = disk / "out"
        first = ifrender(*_args(tiny_root, prompts, out))
        print(first.stdout[-1500:], first.stderr[-1500:])
        assert first.returncode == 4, first.stderr[-3000:]
        assert "No space left on device" in first.stderr and "no space left on the device" in first.stderr
        committed = list_commits(str(out))
        assert len(committed) < len(PROMPTS) // 2  # the disk filled before the end
        for commit in committed.values():  # what committed holds no row failed for the disk
            rows = pq.read_table(out / commit.metadata).to_pylist()
            assert not [r for r in rows if "space" in (r["error"] or "")]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        second = ifrender(*_args(tiny_root, prompts, out))
        assert second.returncode == 0, second.stderr[-3000:]
        check_exactly_once(str(out), len(PROMPTS))
        print(f"full disk: {len(committed)} of {len(PROMPTS) // 2} shards committed before the disk filled; "
              f"exit {first.returncode}, then the plain resume exit {second.returncode} with every row once")  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_stop_signal_after_the_first_publish_drains_exits_4_and_the_same_command_finishes(
    tiny_root, tmp_path, signum
):
    """Kubernetes' SIGTERM (or Ctrl-C's SIGINT) to the driver once a shard is published: the run
    commits what comes in within ray.stop_grace_s, publishes it, leaves no Ray process behind and
    exits 4 with one line of account and no traceback; the same command then renders the rest, every
    row once."""
    import psutil

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = str(tmp_path / "out")
    grace = 10
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    # Chunks of two shards: the signal lands in the second chunk or a later one, with chunks to go.
    args = _args(tiny_root, prompts, out, f"ray.stop_grace_s={grace}", "ray.chunk_shards=2")
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not shard_files(out) and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert job.poll() is None, "the run ended before its first publish"
    ray_processes = psutil.Process(job.pid).children(recursive=True)
    sent = time.monotonic()
    job.send_signal(signum)
    stdout, stderr = job.communicate(timeout=grace + 120)
    took = time.monotonic() - sent
    time.sleep(5)
    left = [p for p in ray_processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    committed = list_commits(out)
    published = shard_files(out)
    print(
        f"{signal.Signals(signum).name}: exit {job.returncode} after {took:.1f} s (grace {grace} s); "
        f"{len(committed)} of {len(PROMPTS) // 2} shards committed, {len(published)} published; "
        f"{len(left)} of {len(ray_processes)} Ray processes left"
    )
    assert job.returncode == 4, stderr[-3000:]
    assert took < grace + 60 and "Traceback" not in stderr
    assert f"{signal.Signals(signum).name} received: stopped" in stdout + stderr
    assert 1 <= len(committed) < len(PROMPTS) // 2 and len(published) == len(committed)
    assert not left, [p.cmdline()[:2] for p in left]

    result = ifrender(*_args(tiny_root, prompts, out))  # the same job, in one chunk (ray.* is no part of its images)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped (done before) {len(committed)}" in result.stdout
    check_exactly_once(out, len(PROMPTS))


@pytest.mark.slow
def test_a_killed_raylet_ends_the_run_with_ifrenders_message_and_code_4_and_the_same_command_finishes(
    tiny_root, tmp_path
):
    """SIGKILL of the local raylet once a shard is committed: Ray ends the driver from its C++ core
    (no Python handler runs), and the `ifrender run` around it says so in its own words: exit 4,
    what is committed, the fix; no Ray process of the job is left; the same command renders the
    rest, every row once."""
    import psutil

    out = str(tmp_path / "out")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    args = _args(tiny_root, prompts, out, "ray.chunk_shards=2")
    job = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 300
    while not list_prefix(out, "commits/") and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert job.poll() is None, "the run ended before its first commit"
    processes = psutil.Process(job.pid).children(recursive=True)
    (raylet,) = [p for p in processes if p.name() == "raylet"]
    raylet.kill()
    killed = time.monotonic()
    stdout, stderr = job.communicate(timeout=180)
    took = time.monotonic() - killed
    time.sleep(5)
    left = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    committed = list_commits(out)
    print(f"raylet killed: exit {job.returncode} after {took:.1f} s; {len(committed)} shards committed; "
          f"{len(left)} of {len(processes)} processes left")  # fmt: skip
    assert job.returncode == 4, stderr[-3000:]
    message = next(line for line in stderr.splitlines() if line.startswith("ifrender: stopped:"))
    assert "its Ray went away" in message and f"{len(committed)} shard(s) of {out} are committed" in message
    assert "run the same command again" in message
    assert not left, [p.cmdline()[:2] for p in left]

    result = ifrender(*_args(tiny_root, prompts, out))
    assert result.returncode == 0, result.stderr[-3000:]
    check_exactly_once(out, len(PROMPTS))
