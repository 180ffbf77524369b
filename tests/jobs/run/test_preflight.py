"""Everything that fails before model work: the output, the weights, the resources, --overwrite."""

from __future__ import annotations

import pytest

from jobs.render import run
from workers.errors import StorageError


def test_missing_bucket_fails_at_once(s3_server, prompts, tiny_manifest):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' is not usable \\(the bucket does not exist\\)"):
        run(tiny_manifest(f"input.path={prompts}", output="s3://no-such-bucket/x"), progress=False)


def test_unreachable_endpoint_fails_at_once(s3_server, prompts, monkeypatch, tiny_manifest):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(StorageError, match="cannot reach http://127.0.0.1:9"):
        run(tiny_manifest(f"input.path={prompts}", output="s3://renders/x"), progress=False)


def test_missing_weights_fail_with_staging_advice(prompts, tmp_path, tiny_manifest):
    from jobs.run.preflight import resolve_models
    from workers.errors import ModelLoadError

    cases = {
        str(tmp_path / "not-there"): "Expected a directory in the hub layout there.*hf download REPO --local-dir",
        "DeepFloyd/IF-I-XL-v1.0": "not in the Hugging Face cache.*hf download DeepFloyd/IF-I-XL-v1.0",
    }
    for model, advice in cases.items():
        manifest = tiny_manifest(f"input.path={prompts}", f"stage1.model={model}", output=str(tmp_path / "o"))
        with pytest.raises(ModelLoadError, match=f"stage1: could not load model '{model}' offline.*{advice}"):
            resolve_models(manifest)


def test_gpu_pools_without_gpus_fail_before_rendering(ray_local, prompts, tmp_path, tiny_manifest):
    manifest = tiny_manifest(f"input.path={prompts}", "stage1.num_gpus=1", output=str(tmp_path / "o"))
    with pytest.raises(RuntimeError, match="stage1: asks for 1 GPU\\(s\\) per actor but this local Ray has 0"):
        run(manifest, progress=False)


def test_pools_steered_to_resources_this_ray_lacks_fail_before_rendering(ray_local, prompts, tmp_path, tiny_manifest):
    manifest = tiny_manifest(
        f"input.path={prompts}", "stage2.resources={ifrender_light: 1}", output=str(tmp_path / "o")
    )
    with pytest.raises(RuntimeError, match=r"stage2.resources: asks for \{'ifrender_light': 1.0\} per actor"):
        run(manifest, progress=False)


def claim(manifest, overwrite: bool) -> None:
    """What a run does to its output before rendering: check it, then (--overwrite) empty it."""
    from jobs.run.preflight import check_output
    from workers.storage import delete

    delete(manifest.output.path, check_output(manifest, overwrite))


def test_overwrite_empties_the_output_first(tmp_path, prompts, tiny_manifest):
    from jobs.output.job_record import check_job

    out = tmp_path / "old"
    (out / "images" / "000000-x").mkdir(parents=True)
    (out / "images" / "000000-x" / "a.png").write_bytes(b"old")
    (out / "commits").mkdir()
    (out / "commits" / "000000-000.json").write_text("{}")
    manifest = tiny_manifest(f"input.path={prompts}", output=str(out))
    check_job(str(out), manifest, allow_changed=False)  # an ifrender output: it has its job.json
    claim(manifest, overwrite=False)
    assert (out / "commits" / "000000-000.json").exists()  # resuming keeps everything
    claim(manifest, overwrite=True)
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_overwrite_refuses_anything_but_an_ifrender_output_and_checks_the_input_first(tmp_path, prompts, tiny_manifest):
    from jobs.output.job_record import check_job
    from workers.errors import InputError

    home = tmp_path / "home"
    (home / "photos").mkdir(parents=True)
    (home / "photos" / "me.jpg").write_bytes(b"precious")
    (home / "job.json").write_text('{"name": "not ours"}')
    with pytest.raises(StorageError, match=r"holds no job.json written by ifrender \(found job.json, photos/me.jpg\)"):
        claim(tiny_manifest(f"input.path={prompts}", output=str(home)), overwrite=True)
    assert (home / "photos" / "me.jpg").read_bytes() == b"precious"
    # An ifrender output keeps what ifrender did not write there.
    out = tmp_path / "out"
    manifest = tiny_manifest(f"input.path={prompts}", output=str(out))
    check_job(str(out), manifest, allow_changed=False)
    (out / "shards").mkdir()
    (out / "shards" / "000000-000-r.parquet").write_bytes(b"old")
    (out / "NOTES.txt").write_text("mine")
    claim(manifest, overwrite=True)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["NOTES.txt"]
    # A bad input stops a run before --overwrite touches anything.
    check_job(str(out), manifest, allow_changed=False)
    (out / "shards").mkdir(exist_ok=True)
    (out / "shards" / "000001-000-r.parquet").write_bytes(b"kept")
    with pytest.raises(InputError):
        run(tiny_manifest(f"input.path={tmp_path / 'missing.jsonl'}", output=str(out)), overwrite=True)
    assert (out / "shards" / "000001-000-r.parquet").read_bytes() == b"kept"


def test_unknown_tiny_model_is_named(prompts, tmp_path, tiny_manifest):
    from jobs.run.preflight import resolve_models

    manifest = tiny_manifest(f"input.path={prompts}", "stage2.model=tiny:IF-III", output=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="stage2.model: unknown tiny model 'IF-III'; expected one of"):
        resolve_models(manifest)


def test_a_store_that_ignores_conditional_writes_is_refused_before_any_model_work(
    s3_server, prompts, tmp_path, monkeypatch, tiny_manifest
):
    import boto3

    from tests.helpers import FaultyS3Proxy

    boto3.client("s3").create_bucket(Bucket="unconditional")
    never = 10**9  # no 503s, no lost answers: only the conditions go missing
    with FaultyS3Proxy(int(s3_server.rsplit(":", 1)[1]), never, never, ignore_conditions=True) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        with pytest.raises(StorageError, match="ignores If-None-Match: a second create of one key succeeded"):
            run(tiny_manifest(f"input.path={prompts}", output="s3://unconditional/job"), progress=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    assert boto3.client("s3").list_objects_v2(Bucket="unconditional").get("KeyCount") == 0  # probe cleaned up


def test_a_plain_run_into_someone_elses_folder_is_refused_and_writes_nothing(tmp_path, prompts, tiny_manifest):
    home = tmp_path / "home"
    home.mkdir()
    (home / "README.md").write_text("# my notes\n")
    (home / "data.csv").write_text("a,b\n")
    before = {p: p.read_bytes() for p in home.rglob("*")}
    for _ in range(2):
        with pytest.raises(
            StorageError,
            match=r"a run writes only into a new or empty folder or an ifrender output.*found README.md, data.csv",
        ):
            run(tiny_manifest(f"input.path={prompts}", output=str(home)), progress=False)
    assert {p: p.read_bytes() for p in home.rglob("*")} == before  # nothing written, the README kept


def test_an_output_whose_folder_is_a_link_is_refused_and_nothing_behind_it_deleted(tmp_path, prompts, tiny_manifest):
    import os

    from jobs.output.job_record import check_job

    other = tmp_path / "other-disk"
    other.mkdir()
    for i in range(3):
        (other / f"photo{i}.jpg").write_bytes(b"precious")
    out = tmp_path / "out"
    manifest = tiny_manifest(f"input.path={prompts}", output=str(out))
    check_job(str(out), manifest, allow_changed=False)  # an ifrender output
    os.symlink(other, out / "images")
    for overwrite in (True, False):
        with pytest.raises(StorageError, match=r"out: images/ is a link, not a folder"):
            run(manifest, overwrite=overwrite, progress=False)
    assert sorted(p.name for p in other.iterdir()) == ["photo0.jpg", "photo1.jpg", "photo2.jpg"]
    assert (out / "job.json").is_file()


def test_overwrite_checks_the_models_before_it_deletes_anything(tmp_path, prompts, tiny_manifest):
    from jobs.output.job_record import check_job
    from workers.errors import ModelLoadError

    out = tmp_path / "out"
    good = tiny_manifest(f"input.path={prompts}", output=str(out))
    check_job(str(out), good, allow_changed=False)
    (out / "commits").mkdir()
    (out / "commits" / "000000-000.json").write_text("{}")
    typo = tiny_manifest(f"input.path={prompts}", f"stage1.model={tmp_path / 'IF-I-tyop'}", output=str(out))
    with pytest.raises(ModelLoadError, match="stage1: could not load model"):
        run(typo, overwrite=True, progress=False)
    assert (out / "commits" / "000000-000.json").read_text() == "{}" and (out / "job.json").is_file()


def test_a_job_record_is_known_by_its_format_and_fields_not_two_key_names():
    import json

    from jobs.output.job_record import is_job_record

    two_keys = json.dumps({"fingerprint": 1, "manifest": 2}).encode()
    foreign = json.dumps({"format": "other-tool", "version": 1, "fingerprint": {}, "manifest": {}}).encode()
    assert not is_job_record(two_keys) and not is_job_record(foreign) and not is_job_record(b"[]")
