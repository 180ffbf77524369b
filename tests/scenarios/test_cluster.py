"""On a real multi-node Ray: a head and GPU-group nodes started with `ray start` on 127.0.0.1
(tests/harness/cluster.py), the job submitted to it through the CLI as an operator runs it. Nodes join
and are killed mid-job; a stage that cannot run is reported, not waited on; the metrics are
scraped from the cluster's Prometheus endpoints.

The nodes declare logical GPUs and the GPU worker group's `ifrender_gpu`, as the KubeRay group
does; the replicas run the tiny cascade on the CPU (manifests/cluster-tiny.yaml)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from jobs.manifest import MANIFESTS_DIR
from tests.harness.cluster import LocalCluster, ray_env
from tests.helpers import check_exactly_once

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MANIFEST = str(MANIFESTS_DIR / "cluster-tiny.yaml")
# Enough work per replica that a second one pays for its start-up on this machine's 2 cores.
STEPS = [f"{s}.num_inference_steps=12" for s in ("stage1", "stage2", "upscale")]


@pytest.fixture
def cluster():
    c = LocalCluster()
    try:
        c.add_gpu_node("gpu1")
        yield c
    finally:
        c.stop()


def prompts(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"a lighthouse at dusk, study {i}\n" for i in range(n)))
    return path


class Job:
    """`ifrender run` against the cluster in a subprocess, its log lines timestamped as they come."""

    def __init__(self, cluster: LocalCluster, out: Path, *sets: str) -> None:
        cmd = [sys.executable, "-m", "jobs.cli", "run", MANIFEST, "--quiet", "--set", f"ray.address={cluster.address}"]
        cmd += [arg for s in (f"output.path={out}", *sets) for arg in ("--set", s)]
        self.out, self.lines, self.started = out, [], time.time()
        self.proc = subprocess.Popen(cmd, env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip()))

    def wait_for(self, pattern: str, timeout: float = 300) -> float:
        """The wall time of the first log line matching `pattern`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for at, line in list(self.lines):
                if re.search(pattern, line):
                    return at
            if self.proc.poll() is not None and not self.reader.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no log line matched {pattern!r}:\n" + "\n".join(line for _, line in self.lines[-40:]))

    def finish(self, timeout: float = 600) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        self.ended = time.time()
        return rc

    def log(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())


def test_a_node_that_joins_mid_job_takes_work_and_the_job_finishes_sooner(cluster, tmp_path):
    """The same job twice on one GPU node: alone, and with a second GPU node joining once the
    job runs. The joined node's replica takes work while the job runs (the pool grows through
    Ray Data's autoscaling pool, up to max_pool_size), the summary shows it, and the job ends sooner.
    On this machine's 2 cores the second replica shares the first one's CPUs and pays ~25 s of
    start-up: 36 rows measured 0.96-1.27x, so the job is long enough for the gain to show."""
    n = 60
    sets = [f"input.path={prompts(tmp_path, n)}", "ray.chunk_shards=null", *STEPS]
    alone = Job(cluster, tmp_path / "alone", *sets)
    assert alone.finish() == 0, alone.log()
    check_exactly_once(str(tmp_path / "alone"), n)
    assert len(alone.summary()["rows_by_node"]) == 2  # the head's writer, gpu1's replica

    joined = Job(cluster, tmp_path / "joined", *sets)
    joined.wait_for(r"chunk of \d+ shards")
    join_at = cluster.add_gpu_node("gpu2")
    assert joined.finish() == 0, joined.log()
    check_exactly_once(str(tmp_path / "joined"), n)

    summary = joined.summary()
    port = f":{cluster.nodes['gpu2']}"
    (gpu2,) = [node for node, name in summary["node_names"].items() if name.endswith(port)]
    assert summary["rows_by_node"][gpu2].get("upscale", 0) > 0, summary["rows_by_node"]
    first_work_s = summary["first_work_at"][gpu2] - join_at
    alone_s, joined_s = alone.ended - alone.started, joined.ended - joined.started
    print(
        f"\njoin to first work on the new node: {first_work_s:.1f} s; job alone {alone_s:.1f} s, with the join "
        f"{joined_s:.1f} s ({alone_s / joined_s:.2f}x); rows by node {summary['rows_by_node']}"
    )
    assert first_work_s < 90  # the bound docs/deployment.md states for a pool that can grow
    assert joined_s < alone_s


def kill_after_a_commit(cluster: LocalCluster, tmp_path: Path, n: int, node: str):
    """Start an n-row job in one chunk (the kill lands while replicas hold batches, not between
    chunks) and SIGKILL `node` once a shard is committed. Returns (job, output, its settings,
    the wall time of the kill)."""
    sets = [f"input.path={prompts(tmp_path, n)}", "ray.chunk_shards=null", "ray.no_progress_timeout_s=30", *STEPS]
    out = tmp_path / "out"
    job = Job(cluster, out, *sets)
    deadline = time.time() + 300
    while not list(out.glob("commits/*.json")):  # a shard committed: the output says so
        assert time.time() < deadline and job.proc.poll() is None, "no shard committed:\n" + job.log()
        time.sleep(0.2)
    return job, out, sets, cluster.kill_node(node)


def test_a_node_killed_mid_job_ends_exactly_once_after_at_most_one_rerun(cluster, tmp_path):
    """SIGKILL a GPU node's raylet and workers while both replicas work. The run either finishes
    with every row once, or stops with exit code 4 within the no-progress timeout and the same
    command finishes it; either way each row is in the output once."""
    cluster.add_gpu_node("gpu2")
    n = 24
    job, out, sets, killed = kill_after_a_commit(cluster, tmp_path, n, "gpu2")
    rc = job.finish()
    ended = time.time() - killed
    runs = 1
    assert rc in (0, 4), job.log()
    if rc == 4:
        assert "no progress for" in job.log() or "left incomplete" in job.log(), job.log()
        again = Job(cluster, out, *sets)
        rc, runs = again.finish(), 2
        assert rc == 0, again.log()
    check_exactly_once(str(out), n)
    summary = json.loads((out / "summary.json").read_text())
    print(
        f"\nnode killed: the first run ended {ended:.1f} s later with exit code {'4' if runs == 2 else '0'}; runs {runs}"
    )
    assert ended < 30 + 120  # the no-progress timeout, and the slack of a chunk's start-up
    assert summary["output_rows"] == n


def test_the_last_gpu_node_killed_stops_the_run_with_code_4_and_the_same_command_finishes(cluster, tmp_path):
    """Where Ray cannot go on (the only GPU node gone: the replica has nowhere to restart and its
    batch waits for it), the run stops with exit code 4 within the no-progress timeout, naming
    the replicas' stage; once a GPU node is back, the same command completes it exactly once."""
    n = 12
    job, out, sets, killed = kill_after_a_commit(cluster, tmp_path, n, "gpu1")
    assert job.finish() == 4, job.log()
    stopped_after = job.ended - killed
    message = next(line for line in job.log().splitlines() if "no progress for" in line)
    assert "queued rows" in message and "encode+stage1+stage2+upscale" in message, message
    first = json.loads((out / "summary.json").read_text())
    assert first["committed_shards"] >= 1 and first["uncommitted_shards"] >= 1
    cluster.add_gpu_node("gpu2")  # capacity comes back
    again = Job(cluster, out, *sets)
    assert again.finish() == 0, again.log()
    check_exactly_once(str(out), n)
    second = json.loads((out / "summary.json").read_text())
    assert second["skipped_shards"] == first["committed_shards"]
    print(f"\nlast GPU node killed: exit code 4 {stopped_after:.1f} s later; the re-run finished the other shards")
    assert stopped_after < 30 + 60


def test_a_stage_that_cannot_start_ends_the_run_naming_it(cluster, tmp_path):
    """A pool asking for a resource no node has: its actors never start. Instead of Ray's silent
    wait, the run ends after ray.no_progress_timeout_s with exit code 4 and a message naming
    the stage, its queued rows and its actors' state."""
    out = tmp_path / "out"
    job = Job(
        cluster,
        out,
        f"input.path={prompts(tmp_path, 4)}",
        "write.resources={nowhere: 1}",
        "ray.no_progress_timeout_s=15",
    )
    rc = job.finish(timeout=300)
    took = job.ended - job.started
    log = job.log()
    assert rc == 4, log
    message = next(line for line in log.splitlines() if "no progress for" in line)
    assert "stage write" in message and "4 queued rows" in message and "none has started" in message, message
    assert json.loads((out / "summary.json").read_text())["stalled"].startswith("no progress for")
    assert took < 15 + 60, took


def scrape(ports: list[int], name: str) -> list[str]:
    lines = []
    for port in ports:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        except OSError:
            continue
        lines += [line for line in text.splitlines() if line.startswith(name)]
    return lines


def test_the_metrics_are_on_the_clusters_prometheus_endpoint(cluster, tmp_path):
    """Rows per stage and status, queue depths, shard commits and images/s, scraped from the
    nodes' metrics ports while the job runs."""
    out = tmp_path / "out"
    job = Job(cluster, out, f"input.path={prompts(tmp_path, 8)}")
    ports = [cluster.metrics_port, *cluster.node_metrics_ports]
    seen: dict[str, list[str]] = {}
    wanted = (
        "ray_ifrender_rows_total",
        "ray_ifrender_queue_rows",
        "ray_ifrender_shard_commits_total",
        "ray_ifrender_images_per_second",
    )
    while job.proc.poll() is None and len(seen) < len(wanted):
        for name in wanted:
            found = scrape(ports, name + "{")
            if found:
                seen[name] = found
        time.sleep(2)
    assert job.finish() == 0, job.log()
    assert set(seen) == set(wanted), seen
    rows = seen["ray_ifrender_rows_total"]
    assert any('stage="upscale"' in r and 'status="ok"' in r and 'job="cluster-tiny"' in r for r in rows), rows
    assert float(seen["ray_ifrender_shard_commits_total"][0].rsplit(" ", 1)[1]) >= 1
