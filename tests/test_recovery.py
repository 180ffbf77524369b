"""Exactly-once under races and kills: racing commits, a killed driver, a killed actor, two jobs."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest

from jobs.commits import Commit, list_commits
from jobs.inputs import Shard
from jobs.render import METADATA_SCHEMA, Work, commit_shard, run
from jobs.storage import create_exclusive, join, list_prefix, read_bytes, write_bytes
from tests.conftest import manifest_for
from tests.test_cli import ifrender


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    request.getfixturevalue("s3_server")
    bucket = f"race-{os.getpid()}-{time.monotonic_ns()}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/job"


def test_racing_creates_have_exactly_one_winner(output):
    key = join(output, "commits/000001-000.json")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: create_exclusive(key, f"writer {i}".encode()), range(8)))
    assert results.count(True) == 1
    assert read_bytes(key) == f"writer {results.index(True)}".encode()


def _work(shard: int, rows: int, run: str) -> Work:
    work = Work(Shard(shard, "in.txt", "text", shard * rows, rows, 0, 0, 1), 0)
    for r in range(shard * rows, shard * rows + rows):
        row = dict.fromkeys(METADATA_SCHEMA.names)
        key = f"images/{shard:06d}-{run}/{r}.png"
        row.update(id=str(r), row=r, shard=shard, status="ok", image_key=key, prompt="p", seed=r)
        work.rows[r] = row
    return work


def test_losing_writer_drops_its_copy_and_winner_clears_leftovers(output):
    # a killed run left images and metadata of shard 3 behind
    write_bytes(join(output, "images/000003-killed1/6.png"), b"old")
    write_bytes(join(output, "shards/000003-000-killed1.parquet"), b"old")
    won = {}
    for run_id in ("first", "second"):
        for r in range(6, 8):
            write_bytes(join(output, f"images/000003-{run_id}/{r}.png"), run_id.encode())
        won[run_id] = commit_shard(output, _work(3, 2, run_id), run_id)
    assert won == {"first": True, "second": False}
    base = output.rstrip("/") + "/"
    left = sorted(u[len(base) :] for u in list_prefix(join(output, "")))
    assert left == [
        "commits/000003-000.json",
        "images/000003-first/6.png",
        "images/000003-first/7.png",
        "shards/000003-000-first.parquet",
    ]
    assert list_commits(output)[3] == Commit(
        3, 0, "shards/000003-000-first.parquet", 2, 2, 0, "first", list_commits(output)[3].stage_seconds
    )


# ---- kills ---------------------------------------------------------------------------------

PROMPTS = [f"prompt {i}: a lighthouse in a storm" for i in range(12)]


def _args(tiny_root, prompts, out, *extra):
    sets = [
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


def check_exactly_once(out: str, n: int) -> None:
    """Every row once in the committed metadata, every image referenced, nothing else left."""
    from tests.test_render import read_output  # the consumer's view, with its orphan checks

    rows, images = read_output(out)
    assert sorted(r["row"] for r in rows) == list(range(n))
    assert all(r["status"] == "ok" for r in rows) and len(images) == n


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
    while not list_prefix(join(out, "commits/")) and time.monotonic() < deadline and job.poll() is None:
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
def test_killed_stage_actor_is_restarted_and_rows_come_out_once(ray_local, tiny_root, tmp_path):
    import psutil

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = str(tmp_path / "out")
    args = _args(tiny_root, prompts, out)
    manifest = manifest_for(tiny_root, *[a for a in args[1:-1] if a != "--set"], output=out)
    killed = []

    def kill_stage2_when_busy():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if list_prefix(join(out, "commits/")):
                # Ray titles actor processes "ray::MapWorker(MapBatches(Stage2Worker))..."
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if "Stage2Worker" in " ".join(proc.info["cmdline"] or []):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        killed.append(proc.info["pid"])
            time.sleep(0.2)

    killer = threading.Thread(target=kill_stage2_when_busy, daemon=True)
    killer.start()
    summary = run(manifest, progress=False)
    killer.join(5)
    assert killed, "no stage2 actor was killed"
    assert summary.committed_shards == len(PROMPTS) // 2 and summary.uncommitted_shards == 0
    check_exactly_once(out, len(PROMPTS))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_jobs_on_one_output_commit_each_shard_once(where, tiny_root, tmp_path, request):
    if where == "s3":
        request.getfixturevalue("s3_server")
        boto3.client("s3").create_bucket(Bucket="two-writers")
        out = "s3://two-writers/job"
    else:
        out = str(tmp_path / "out")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:8]) + "\n")
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    args = _args(tiny_root, prompts, out, "last_stage=stage1", "input.shard_size=1", "stage1.batch_size=1")
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
    markers = list_prefix(join(out, "commits/"))
    assert len(markers) == 8 and all(m.endswith("-000.json") for m in markers)
    check_exactly_once(out, 8)
    # the jobs' own accounts agree: 8 commits between them, each other shard lost or skipped
    committed = [int(re.search(r"shards committed (\d+)", o)[1]) for o, _ in results]
    assert sum(committed) == 8, committed
    runs = {json.loads(read_bytes(m))["run"] for m in markers}
    print(f"shards committed per job: {committed}, by {len(runs)} runs")


# ---- transient S3 faults, hung and broken stages ---------------------------------------------


@pytest.mark.slow
def test_job_survives_s3_slowdowns_and_lost_answers(s3_server, tiny_root, tmp_path):
    from tests.faulty_s3 import FaultyS3Proxy

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
    for uri in list_prefix("s3://flaky/job/"):
        assert secret.encode() not in read_bytes(uri), uri


HANG_OR_BREAK = """
import sys, time, types
import numpy as np
from workers.common import StageWorker

class Stuck(StageWorker):
    stage, needs = "stuck", ()
    def run(self, batch, rows, params):
        if sys.argv[1] == "hang":
            time.sleep(60)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    def blank(self, batch, n):
        return {}

cfg = types.SimpleNamespace(model="m", micro_batch=1, device="cpu", num_gpus=0, dtype="fp32", variant=None, watchdog_s=1,
                            offload="none", attention="sdpa", compile=False)
row = {k: np.array([v], dtype=object) for k, v in dict(id="a", prompt="p", negative_prompt="", seed=1, status="ok", error="").items()}
Stuck(cfg, {})(row)
print("returned")
"""


@pytest.mark.parametrize(
    ("mode", "message"), [("hang", "ran over watchdog_s=1"), ("fatal", "fatal device error: CUDA error")]
)
def test_hung_or_broken_stage_exits_its_process_for_a_restart(mode, message):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", HANG_OR_BREAK, mode], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "returned" not in result.stdout
    assert message in result.stderr and "exiting so Ray restarts this actor" in result.stderr
    assert time.monotonic() - started < 30
