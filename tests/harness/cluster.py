"""A real multi-node Ray cluster on 127.0.0.1: a head and worker nodes started with `ray start`,
each declaring its logical GPUs and its worker group's custom resources as the KubeRay groups do
(infra/kuberay/rayjob.yaml: the GPU group declares `ifrender_gpu`). Nodes can join and be killed
while a job runs; teardown stops only this cluster's processes (everything under its temp dir),
never another Ray on the machine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from jobs.run.cluster import LOOPBACK
from tests.helpers import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def ray_env() -> dict[str, str]:
    """The environment of the cluster's nodes and of what runs on them: this venv's commands on
    the PATH (a submitted job's entrypoint runs `ifrender`), no token for the local CLI nodes."""
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "PATH": path}
    env.pop("RAY_ADDRESS", None)
    # A local run in this process (the CLI called in-process) sets it to 0, which makes
    # `ray start --address` refuse to join: these nodes form a multi-node cluster.
    env.pop(LOOPBACK, None)
    return env


class LocalCluster:
    def __init__(self, head_cpus: int = 2, dashboard_port: int | None = None) -> None:
        # Short: Ray's socket paths live under it and must stay within 107 characters.
        self.temp = tempfile.mkdtemp(prefix="ifr-ray-", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.nodes: dict[str, int] = {}  # name -> node manager port
        self.node_metrics_ports: list[int] = []
        self._start(
            "head",
            "--head",
            f"--port={self.port}",
            f"--num-cpus={head_cpus}",
            "--num-gpus=0",
            f"--temp-dir={self.temp}",
            f"--metrics-export-port={self.metrics_port}",
            *(
                ["--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
                # Ports of its own: another Ray on the machine (a test's local one) holds the defaults,
                # and a job agent that cannot bind its port never takes a submission.
                + [f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}"]
                + [f"--ray-client-server-port={free_port()}"]
                if dashboard_port
                else ["--include-dashboard=false"]
            ),
        )

    def _start(self, name: str, *args: str) -> None:
        port = free_port()
        cmd = [RAY, "start", *args, f"--node-manager-port={port}", "--disable-usage-stats"]
        done = subprocess.run(cmd, env=ray_env(), capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
        self.nodes[name] = port

    def add_gpu_node(self, name: str, gpus: int = 1, cpus: int = 1) -> float:
        """A node of the GPU worker group: `gpus` logical GPUs and as many `ifrender_gpu`. Returns
        the wall time `ray start` returned (the node is registered then)."""
        self.node_metrics_ports.append(free_port())
        self._start(
            name,
            f"--address={self.address}",
            f"--num-cpus={cpus}",
            f"--num-gpus={gpus}",
            f"--resources={json.dumps({'ifrender_gpu': gpus})}",
            f"--metrics-export-port={self.node_metrics_ports[-1]}",
        )
        return time.time()

    def raylet(self, name: str) -> psutil.Process:
        flag = f"--node_manager_port={self.nodes[name]}"
        for proc in psutil.process_iter(["name", "cmdline"]):
            cmdline = proc.info["cmdline"] or []
            if "raylet" in (proc.info["name"] or "") and flag in cmdline:
                return proc
        raise LookupError(f"no raylet with {flag}")

    def kill_node(self, name: str) -> float:
        """SIGKILL a node's raylet and every process under it (its workers, its agents), as a
        spot reclaim does. Returns the wall time of the kill."""
        raylet = self.raylet(name)
        victims = [raylet, *raylet.children(recursive=True)]
        for proc in victims:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return time.time()

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes: each names its session under this cluster's temp dir, or (Ray's
        client server, which outlives its parent) this cluster's GCS address."""
        mine = []
        gcs = f":{self.port}"
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            ours = any(self.temp in part for part in cmdline) or any(
                part.startswith(("--address=", "--gcs-address=", "--gcs_address=")) and part.endswith(gcs)
                for part in cmdline
            )
            if proc.pid != os.getpid() and ours:
                mine.append(proc)
        for raylet_port in self.nodes.values():  # workers name no session dir: take each raylet's children
            for proc in psutil.process_iter(["name", "cmdline"]):
                if f"--node_manager_port={raylet_port}" in (proc.info["cmdline"] or []):
                    mine += [proc, *proc.children(recursive=True)]
        return list({p.pid: p for p in mine}.values())

    def stop(self) -> None:
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=20)
        shutil.rmtree(self.temp, ignore_errors=True)
