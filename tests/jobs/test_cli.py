"""The `ifrender` command as a user runs it, in a subprocess with its own local Ray."""

from __future__ import annotations

import json
import subprocess

import pyarrow.parquet as pq
import pytest

from jobs.manifest import MANIFESTS_DIR
from tests.helpers import (
    PER_STAGE_POOLS,
    ifrender,
)


def test_bad_manifest_exits_1_naming_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((MANIFESTS_DIR / "local-tiny.yaml").read_text().replace("shard_size:", "shard_sise:"))
    result = ifrender("run", str(bad))
    assert result.returncode == 1
    assert f"{bad}: invalid manifest" in result.stderr and "input.shard_sise: unknown field" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_prints_every_default(tmp_path):
    # Its own output: the default out/local-tiny may hold a demo's render (make demo, then make test).
    result = ifrender("validate", "--set", "stage2.noise_level=100", "--set", f"output.path={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["stage2"]["noise_level"] == 100 and resolved["upscale"]["noise_level"] == 100
    assert resolved["write"]["pool_size"] == 1


def test_validate_prints_the_column_mapping_and_refuses_an_unmapped_prompt(tmp_path):
    path = tmp_path / "parti.tsv"
    path.write_text('Prompt\tCategory\n"a" fox\tAnimals\n')
    sets = ["--set", f"input.path={path}", "--set", f"output.path={tmp_path / 'out'}"]
    result = ifrender("validate", *sets, "--set", "input.columns.prompt=Prompt")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["input"]["columns"] == {"prompt": "Prompt"}
    assert "input: ok: 1 rows in 1 shards" in result.stderr
    assert "  prompt <- Prompt" in result.stderr and "  Category: string" in result.stderr
    result = ifrender("validate", *sets)
    assert result.returncode == 1
    assert "parti.tsv: no 'prompt' column" in result.stderr and 'input.columns: {prompt: "Prompt"}' in result.stderr


def test_tiny_models_command_writes_hub_layout(tmp_path):
    result = ifrender("tiny-models", str(tmp_path))
    assert result.returncode == 0, result.stderr
    for repo in ("IF-I-tiny", "IF-II-tiny", "x4-upscaler-tiny"):
        assert (tmp_path / repo / "model_index.json").is_file()
    assert (tmp_path / "IF-I-tiny" / "text_encoder" / "model.safetensors").is_file()
    assert (tmp_path / "x4-upscaler-tiny" / "vae" / "config.json").is_file()


@pytest.mark.slow
def _answer(address: str, port: int) -> list[str]:
    """What an HTTP GET of / and /metrics on the endpoint answers without a token (a wildcard
    address is asked on loopback): status codes, or the error that took the place of an answer."""
    import http.client

    host = "127.0.0.1" if address in ("0.0.0.0", "::", "") else address
    found = []
    for path in ("/", "/metrics"):
        conn = http.client.HTTPConnection(host, port, timeout=3)
        try:
            conn.request("GET", path)
            found.append(str(conn.getresponse().status))
        except Exception as err:  # noqa: BLE001 - a refusal of any kind is the answer wanted
            found.append(type(err).__name__)
        finally:
            conn.close()
    return found


def run_probing_endpoints(args: list[str]) -> tuple[subprocess.CompletedProcess, dict[int, tuple[str, list[str]]]]:
    """`ifrender ARGS` with the environment a user has (no RAY_AUTH_MODE set), and while it runs
    every TCP endpoint its processes listen on ({port: (address, answers)}), each probed when first
    seen and again 5 s later."""
    import os
    import sys
    import time

    import psutil

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")} | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    endpoints: dict[int, tuple[str, list[str]]] = {}
    first_seen: dict[int, float] = {}
    reprobed: set[int] = set()
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                listening = [c for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in listening:
                port = c.laddr.port
                if port not in endpoints:
                    endpoints[port], first_seen[port] = (c.laddr.ip, _answer(c.laddr.ip, port)), time.monotonic()
                elif port not in reprobed and time.monotonic() - first_seen[port] > 5:
                    reprobed.add(port)
                    endpoints[port] = (c.laddr.ip, endpoints[port][1] + _answer(c.laddr.ip, port))
        time.sleep(0.5)
    stdout, stderr = proc.communicate(timeout=max(1, deadline - time.monotonic()))
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), endpoints


AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT = 44217, 44227  # ray.autoscaler, ray.dashboard constants


def test_run_schedules_each_pool_on_its_gpu_share(tiny_root, tmp_path):
    """A fresh local Ray with 2 logical GPUs: every stage pool asks for a GPU fraction, runs on
    the CPU (device=cpu), and records the GPU Ray gave it; every endpoint of the local run is on
    loopback, and none but Ray's two metrics servers answers a request without Ray's token. The shares fit only largest first
    (0.7 + 0.3 on each GPU): in stage order, encode and stage I would share GPU 0 and leave no
    room there for stage II's second actor."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na lighthouse\na corgi\n")
    out = tmp_path / "out"
    sets = [
        *PER_STAGE_POOLS,
        f"input.path={prompts}",
        f"output.path={out}",
        "ray.num_gpus=2",
        "last_stage=stage2",
        f"encode.model={tiny_root / 'IF-I-tiny'}",
        f"stage1.model={tiny_root / 'IF-I-tiny'}",
        f"stage2.model={tiny_root / 'IF-II-tiny'}",
        "stage1.num_inference_steps=2",
        "stage2.num_inference_steps=2",
        "stage2.pool_size=2",
    ]
    for stage, share in (("encode", 0.3), ("stage1", 0.3), ("stage2", 0.7)):
        sets += [f"{stage}.num_gpus={share}", f"{stage}.device=cpu"]
    # Run as a user does (Ray's token auth at its default), every listening endpoint probed while it runs.
    result, endpoints = run_probing_endpoints(["run", *[a for s in sets for a in ("--set", s)], "--quiet"])
    assert result.returncode == 0, result.stderr[-3000:]
    print(
        f"{len(endpoints)} endpoints listened: "
        + ", ".join(f"{a}:{p} {ans}" for p, (a, ans) in sorted(endpoints.items()))
    )
    assert endpoints, "no listening endpoint was seen: the probe did not run"
    # Every endpoint of a local run is on loopback: none can be reached from another machine.
    assert {a for a, _ in endpoints.values()} <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, endpoints
    # Of those, the only ones that answer without Ray's token are the two read-only Prometheus
    # servers Ray's autoscaler and dashboard head always start (their ports: Ray's constants).
    answered = {p: v for p, v in endpoints.items() if any(code.startswith(("2", "3")) for code in v[1])}
    assert set(answered) <= {AUTOSCALER_METRIC_PORT, DASHBOARD_METRIC_PORT}, answered
    assert "this run: rows 3: ok 3, error 0" in result.stdout
    assert "busy seconds per image by stage: encode" in result.stdout
    assert (
        "3 rows rendered, 3 images ok, 0 errors" in result.stdout and " rows, " not in result.stderr
    )  # --quiet: no line
    assert "reserved 2 x {'GPU': 0.7, 'CPU': 0.5} for stage2" in result.stderr
    status = ifrender("status", str(out))
    assert status.returncode == 0 and "rows 3: done 3, failed 0, pending 0" in status.stdout
    rows = pq.read_table(out / "data").to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    gpus = {}
    for stage in ("encode", "stage1", "stage2"):
        params = json.loads(rows[0][f"{stage}_params"])
        assert len(params["gpus"]) == 1 and params["device"] == "cpu", (stage, params)
        gpus[stage] = params["gpus"][0]
    assert gpus["encode"] != gpus["stage1"], gpus


def test_run_refuses_gpu_shares_that_do_not_pack_before_loading_models(tiny_root, tmp_path):
    """1.8 GPUs asked of 2, but three 0.6 shares cannot share GPUs: an error, not a stalled pool."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n")
    sets = [*PER_STAGE_POOLS, f"input.path={prompts}", f"output.path={tmp_path / 'out'}", "ray.num_gpus=2"]
    sets += ["last_stage=stage2"]
    sets += [f"{s}.model={tiny_root / r}" for s, r in (("encode", "IF-I-tiny"), ("stage1", "IF-I-tiny"))]
    sets += [f"stage2.model={tiny_root / 'IF-II-tiny'}", "stage1.pool_size=2"]
    sets += [f"{s}.{k}" for s in ("stage1", "stage2") for k in ("num_gpus=0.6", "device=cpu")]
    result = ifrender("run", *[a for s in sets for a in ("--set", s)], "--quiet")
    assert result.returncode != 0
    assert "do not pack onto this local Ray's 2 GPUs" in result.stderr and "stage1 2 x 0.6" in result.stderr
    assert "Fix:" in result.stderr


def test_status_of_a_missing_output_says_what_is_expected(tmp_path):
    result = ifrender("status", str(tmp_path / "nothing"))
    assert result.returncode == 1 and "no ifrender job here" in result.stderr


@pytest.mark.slow
def test_exit_3_only_when_no_row_of_the_output_is_ok(tiny_root, tmp_path):
    """A retry that renders nothing (its failed row's input is wrong, so another try would fail
    it again) leaves an output with good rows: exit 0, not 3, naming the row. An output whose
    every row failed: exit 3."""
    models = [f"{s}.model={tiny_root / 'IF-I-tiny'}" for s in ("encode", "stage1")]
    sets = [*models, "last_stage=stage1", "stage1.num_inference_steps=2"]
    mixed, bad = tmp_path / "mixed.jsonl", tmp_path / "bad.jsonl"
    mixed.write_text('{"prompt": "a fox"}\n{"prompt": ""}\n')
    bad.write_text('{"prompt": ""}\n{"prompt": "a fox", "seed": -1}\n')

    def run(data, out, *extra):
        args = [a for s in [*sets, f"input.path={data}", f"output.path={tmp_path / out}"] for a in ("--set", s)]
        return ifrender("run", *args, "--quiet", *extra)

    first = run(mixed, "mixed")
    assert first.returncode == 0, first.stderr[-2000:]
    retry = run(mixed, "mixed", "--retry-errors")  # the empty prompt would fail again: not retried
    assert retry.returncode == 0, retry.stderr[-2000:]
    assert "this run: rows 0: ok 0, error 0" in retry.stdout
    assert "not retried: 1 failed row(s) need their input fixed" in retry.stdout and "prompt" in retry.stdout
    assert "--retry-errors: 1 failed row(s) need their input fixed" in retry.stderr
    assert run(bad, "bad").returncode == 3
