"""`ifrender validate` as the preflight of `run`: each mistake a new user makes is named, with
exit 1, without starting Ray or loading a model; the shipped local manifests pass."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import MANIFESTS_DIR
from tests.helpers import ifrender

LOCAL = MANIFESTS_DIR / "local-tiny.yaml"


def _sets(tmp_path, **fields) -> list[str]:
    fields.setdefault("output.path", str(tmp_path / "out"))
    return [a for k, v in fields.items() for a in ("--set", f"{k}={v}")]


def _mistakes(tmp_path) -> dict[str, tuple[list[str], str]]:
    """name -> (validate's arguments, what its error must say)."""
    (tmp_path / "parti.tsv").write_text("id\tcaption\n1\ta cat\n")
    pq.write_table(pa.table({"Prompt": ["a", "b"]}), tmp_path / "p.parquet")
    (tmp_path / "seeds.csv").write_text("prompt,seed\na cat,7\na dog,-3\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text(LOCAL.read_text().replace("num_inference_steps: 10", "num_inference_stpes: 10", 1))
    broken = tmp_path / "broken.yaml"
    broken.write_text(LOCAL.read_text().replace("  shard_size: 4", "  shard_size: [4"))
    opened = broken.read_text().splitlines().index("  shard_size: [4") + 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ifrender's")
    return {
        "a misspelt field": ([str(typo)], "did you mean stage1.num_inference_steps?"),
        "a missing input": (_sets(tmp_path, **{"input.path": tmp_path / "none.txt"}), "none.txt: no such file"),
        "a TSV without a prompt column": (
            _sets(tmp_path, **{"input.path": tmp_path / "parti.tsv"}),
            'input.columns: {prompt: "caption"}',
        ),
        "a Parquet without a prompt column": (
            _sets(tmp_path, **{"input.path": tmp_path / "p.parquet"}),
            'input.columns: {prompt: "Prompt"}',
        ),
        "bad YAML": ([str(broken)], f"(while parsing a flow sequence started at line {opened})"),
        "a bad --set value": (
            ["--set", "stage1.num_inference_steps=many"],
            "from --set 'stage1.num_inference_steps=many', not the file",
        ),
        "a bad first row": (
            _sets(tmp_path, **{"input.path": tmp_path / "seeds.csv"}),
            "seeds.csv row 3: seed",
        ),
        "a model not on disk": (_sets(tmp_path, **{"stage2.model": tmp_path / "IF-II"}), "models: FAILED: stage2"),
        "a score head not on disk": (
            _sets(tmp_path, **{"score.aesthetic_model": tmp_path / "aesthetic"}),
            "models: FAILED: score.aesthetic_model: could not load model",
        ),
        "a foreign output folder": (_sets(tmp_path, **{"output.path": foreign}), "output: FAILED"),
        "pools that do not fit": (
            _sets(tmp_path, **{"groups": "[]", "stage1.num_gpus": 1, "ray.num_gpus": 0}),
            "pools: FAILED",
        ),
    }


def broken_name(tmp_path) -> str:
    return str(tmp_path / "broken.yaml")


def test_each_mistake_exits_1_with_its_message(tmp_path):
    for name, (args, expected) in _mistakes(tmp_path).items():
        result = ifrender("validate", *args)
        assert result.returncode == 1, f"{name}: {result.stderr}"
        assert expected in result.stderr, f"{name}: expected {expected!r} in:\n{result.stderr}"
        assert "Traceback" not in result.stderr, name
        if name == "bad YAML":
            assert f"{broken_name(tmp_path)}, line " in result.stderr


def test_another_jobs_output_is_named_and_allow_changed_passes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    from jobs.manifest import load_manifest
    from jobs.output.job_record import check_job

    check_job(str(out), load_manifest(LOCAL, _sets(tmp_path)[1::2]), allow_changed=False)
    changed = _sets(tmp_path, **{"stage1.guidance_scale": 3})
    result = ifrender("validate", *changed)
    assert result.returncode == 1 and "output: FAILED" in result.stderr and "guidance_scale" in result.stderr
    result = ifrender("validate", *changed, "--allow-changed")
    assert result.returncode == 0, result.stderr
    assert "resumes its job with 1 changed setting(s)" in result.stderr


@pytest.mark.parametrize("name", ["local-tiny.yaml", "modes-tiny.yaml", "bench-tiny.yaml"])
def test_the_shipped_local_manifests_pass(name, tmp_path):
    result = ifrender("validate", str(MANIFESTS_DIR / name), *_sets(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"]
    for check in ("input", "rows", "models", "output", "pools"):
        assert f"{check}: ok" in result.stderr
    assert "would start rendering" in result.stderr


def test_score_auto_without_its_weights_plans_no_score_stage(tmp_path):
    """The shipped default CLIP is not in this machine's cache: auto turns the stage off, and says so."""
    result = ifrender(
        "validate",
        *_sets(tmp_path, **{"score.enabled": "auto", "score.model": "openai/clip-vit-large-patch14"}),
    )
    assert result.returncode == 0, result.stderr
    assert "no score stage (score.enabled auto: openai/clip-vit-large-patch14" in result.stderr
    assert "score 1 x" not in result.stderr  # nor a pool for it


def test_validate_imports_neither_ray_nor_torch(tmp_path):
    """What keeps it at well under 3 s: the heavy libraries are imported where a command needs them."""
    probe = (
        "import sys; from jobs.cli import main; code = main(['validate', *sys.argv[1:]]); "
        "print(sorted(m for m in ('ray', 'torch', 'diffusers', 'transformers') if m in sys.modules)); "
        "sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, *_sets(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_explain_prints_a_fields_description_and_bounds():
    result = ifrender("validate", "--explain", "stage1.num_inference_steps")
    assert result.returncode == 0, result.stderr
    assert "Denoising steps" in result.stdout and ">= 1" in result.stdout and "default: 100" in result.stdout
    result = ifrender("validate", "--explain", "stage1.num_steps")
    assert result.returncode == 1 and "stage1.num_inference_steps" in result.stderr


def test_an_unreachable_s3_endpoint_stops_at_once(tmp_path):
    """One request with a short timeout, not minutes of retries."""
    from tests.helpers import free_port

    port = free_port()  # nothing listens there; the _S3 variable, which boto3 prefers, too
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"}
    env |= {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "validate", *_sets(tmp_path, **{"input.path": "s3://prompts/set/"})],
        capture_output=True,
        text=True,
        timeout=60,
        env=__import__("os").environ | env,
    )
    assert result.returncode == 1
    assert "input.path s3://prompts/set/: cannot reach http://127.0.0.1:" in result.stderr
