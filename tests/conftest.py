"""Shared fixtures: tiny checkpoints built once, the tiny manifest, a real S3 server (moto) on
127.0.0.1, one local Ray."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from jobs.manifest import DEFAULT_MANIFEST, load_manifest
from tests.harness.credentials import CERT_ENV, KEY_ENV, signing_chain
from tests.helpers import LINES, PER_STAGE_POOLS, SHARED, free_port

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Where workers sync S3 model mirrors: set before Ray starts so its workers inherit it.
os.environ.setdefault("IFRENDER_MODEL_CACHE", tempfile.mkdtemp(prefix="ifrender-models-"))
# The test signing chain, as secrets in the environment (output.c2pa's env:NAME), before Ray starts.
_cert, _key = signing_chain()
os.environ.setdefault(CERT_ENV, _cert.decode())
os.environ.setdefault(KEY_ENV, _key.decode())


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """Tiny checkpoints in the hub layout, built through `ifrender tiny-models`' code path."""
    from jobs.plan.models import build_models

    root = tmp_path_factory.mktemp("tiny-models")
    build_models(root)
    return root


@pytest.fixture(scope="session")
def tiny_manifest(tiny_root):
    """Builds local-tiny's job in the pipeline layout (PER_STAGE_POOLS) with the session's tiny
    models, 2 denoising steps, no score stage (SCORED turns it on), an output path and any
    overrides: tiny_manifest("stage1.batch_size=2", output=str(tmp_path)). Tests of the workers
    alone need no output."""

    def build(*overrides: str, output: str = "/nonexistent/ifrender-test-output"):
        base = [
            *PER_STAGE_POOLS,
            f"output.path={output}",
            f"encode.model={tiny_root / 'IF-I-tiny'}",
            f"stage1.model={tiny_root / 'IF-I-tiny'}",
            f"stage2.model={tiny_root / 'IF-II-tiny'}",
            f"upscale.model={tiny_root / 'x4-upscaler-tiny'}",
            f"score.model={tiny_root / 'clip-tiny'}",
            f"score.aesthetic_model={tiny_root / 'aesthetic-tiny'}",
            # One pool fewer for the tests that do not look at scores; those that do turn it on.
            "score.enabled=false",
            "stage1.num_inference_steps=2",
            "stage2.num_inference_steps=2",
            "upscale.num_inference_steps=2",
        ]
        return load_manifest(DEFAULT_MANIFEST, base + list(overrides))

    return build


@pytest.fixture(scope="session")
def s3_server():
    """A real HTTP S3 endpoint on loopback; AWS_* variables point boto3 and pyarrow at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL_S3=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the session, started after the S3 server so workers inherit its endpoint."""
    import ray

    ray.init(num_cpus=4, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prompts(tmp_path_factory):
    """tests.helpers.LINES as a JSONL file: good rows, and bad ones that must become error rows."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in LINES) + "\n")
    return path


@pytest.fixture(scope="session")
def local_run(ray_local, prompts, tmp_path_factory, tiny_manifest):
    """One render for every test that asserts on the same output: the full cascade of `prompts`
    to a local directory at local-tiny's batch sizes, scored with embeddings, with every output
    format on (embedded images, WebDataset tars, contact sheets). Tests that run it again (a resume, a rebuild) use
    `local_run.manifest`; what the run itself wrote at its end is kept here, since they rewrite it."""
    from types import SimpleNamespace

    from jobs.render import run

    out = tmp_path_factory.mktemp("local") / "out"
    manifest = tiny_manifest(f"input.path={prompts}", *SHARED, output=str(out))
    summary = run(manifest, progress=False)
    return SimpleNamespace(
        out=out,
        manifest=manifest,
        summary=summary,
        summary_json=(out / "summary.json").read_text(),
        report=(out / "report.html").read_text(),
    )
