"""End to end on a local Ray with tiny models: local disk and a real S3 server, bad rows, determinism."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import subprocess
import sys

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.output.commits import list_commits
from jobs.plan.layouts import with_groups
from jobs.render import run
from tests.helpers import (
    GOOD,
    LINES,
    OK_COUNT,
    SCORED,
    SHARED,
    SIGNED,
    check_complete,
    png,
    read_output,
    readme_recipes,
)
from workers.errors import ChangedManifestError


@pytest.mark.slow
def test_local_run_renders_every_good_row_and_reports_bad_ones(local_run):
    out, summary = local_run.out, local_run.summary
    rows, images = read_output(str(out))
    check_complete(rows, images, 256)
    by_prompt = {r["prompt"]: r for r in rows}
    assert by_prompt[GOOD[1]]["negative_prompt"] == "blurry"
    errors = [r["error"] for r in rows if r["status"] == "error"]
    assert any("prompt: expected non-empty text" in e for e in errors)
    assert any("seed: expected an integer" in e and "not-a-seed" in e for e in errors)
    assert any("not valid JSON" in e for e in errors)
    corgi = next(r for r in rows if r["id"] == "corgi/1")
    assert corgi["seed"] == 42 and "/corgi_1-" in corgi["image_key"]
    for r in rows:
        if r["status"] == "ok":
            assert all(r[f"{s}_seconds"] > 0 for s in ("encode", "stage1", "stage2", "upscale", "write"))
            assert json.loads(r["stage1_params"])["num_inference_steps"] == 2
            assert r["upscale_model"].endswith("x4-upscaler-tiny") and r["last_stage"] == "upscale"
            assert r["source_file"].endswith("prompts.jsonl") and r["source_row"] >= 1
    assert (summary.rows, summary.ok, summary.error) == (len(LINES), OK_COUNT, len(LINES) - OK_COUNT)
    assert summary.committed_shards == 3 and summary.uncommitted_shards == 0
    job = json.loads((out / "job.json").read_text())
    assert job["manifest"]["stage1"]["num_inference_steps"] == 2
    assert json.loads(local_run.summary_json)["ok"] == OK_COUNT
    # The summary's last line is a command that reads the output, the scores included (the stage ran).
    read = local_run.summary.where()[-1].split("read it:", 1)[1].strip()
    assert "'clip_score', 'aesthetic_score'" in read
    shown = subprocess.run(
        ["sh", "-c", read.replace("python ", f"{sys.executable} ", 1)], capture_output=True, text=True
    )
    assert shown.returncode == 0 and "clip_score" in shown.stdout and "000000000" in shown.stdout, shown.stderr
    # and the compute the rows spent, from their recorded settings: 2 steps each, guided throughout
    from jobs.plan.costs import FORWARD_TFLOP as F
    from jobs.plan.costs import VAE_DECODE_TFLOP

    spent = 2 * 2 * (F["stage1"] + F["stage2"] + F["upscale"]) + VAE_DECODE_TFLOP + 2 * F["encode"] + F["score"]
    assert summary.tflop_per_image == pytest.approx(spent, abs=0.1)


@pytest.mark.slow
def test_a_row_renders_the_same_whatever_batch_pool_and_block_layout(local_run, prompts, tmp_path, tiny_manifest):
    """Other batch sizes, pool sizes, shards and blocks: the upscaled images stay within 1/255."""
    out = local_run.out
    manifest = tiny_manifest(
        f"input.path={prompts}",
        "input.shard_size=5",
        "ray.block_rows=3",
        "encode.batch_size=3",
        "stage1.batch_size=3",
        "stage1.pool_size=2",
        "stage2.batch_size=1",
        "upscale.batch_size=3",
        "write.batch_size=2",
        output=str(tmp_path / "other"),
    )
    run(manifest, progress=False)
    base, base_images = read_output(str(out))
    other, other_images = read_output(str(tmp_path / "other"))
    assert [r["id"] for r in base] == [r["id"] for r in other]
    for a, b in zip(base, other):
        assert (a["status"], a["seed"]) == (b["status"], b["seed"])
        if a["status"] == "ok":
            pa_ = np.asarray(Image.open(io.BytesIO(base_images[a["image_key"]]))).astype(int)
            pb_ = np.asarray(Image.open(io.BytesIO(other_images[b["image_key"]]))).astype(int)
            assert np.abs(pa_ - pb_).max() <= 1, a["id"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "groups",
    [
        [{"stages": ["encode", "stage1", "stage2", "upscale"], "pool_size": 2, "batch_size": 3, "num_cpus": 0.5}],
        [{"stages": ["encode", "stage1"], "batch_size": 3, "num_cpus": 0.5}, {"stages": ["stage2", "upscale"]}],
    ],
    ids=["replicas", "fused"],
)
def test_replicas_and_fused_stages_render_the_pipelines_images_bit_for_bit(
    local_run, prompts, tmp_path, tiny_manifest, groups
):
    """Same micro_batch per stage, other layout: every row's image bytes are the pipeline's."""
    out = local_run.out
    base = tiny_manifest(f"input.path={prompts}", "input.shard_size=3", output=str(tmp_path / "out"))
    manifest = with_groups(base, groups)
    assert manifest.layout == ("replicas" if len(groups) == 1 else "fused")
    summary = run(manifest, progress=False)
    rows, images = read_output(str(tmp_path / "out"))
    check_complete(rows, images, 256)
    pipeline_rows, _ = read_output(str(out))
    assert {r["id"]: r["sha256"] for r in rows} == {r["id"]: r["sha256"] for r in pipeline_rows}
    params = json.loads(next(r for r in rows if r["status"] == "ok")["stage1_params"])
    assert params["micro_batch"] == base.stage1.micro_batch
    assert summary.ok == OK_COUNT


@pytest.mark.slow
def test_stage2_output_is_bit_identical_across_layouts_and_s3_holds_the_output(
    ray_local, prompts, tmp_path, tiny_manifest
):
    """Two layouts render the same bytes; the second writes to a real S3 server (moto on 127.0.0.1)."""
    boto3.client("s3").create_bucket(Bucket="renders")
    layouts = {
        "small": [
            "input.shard_size=1",
            "ray.block_rows=1",
            "encode.batch_size=1",
            "stage1.batch_size=1",
            "stage2.batch_size=1",
        ],
        "large": [
            "input.shard_size=8",
            "ray.block_rows=4",
            "encode.batch_size=4",
            "stage1.batch_size=4",
            "stage1.pool_size=2",
            "stage2.batch_size=3",
        ],
    }
    outputs = {"small": str(tmp_path / "small"), "large": "s3://renders/nightly/run-1"}
    digests = {}
    for name, overrides in layouts.items():
        manifest = tiny_manifest(f"input.path={prompts}", "last_stage=stage2", *overrides, output=outputs[name])
        summary = run(manifest, progress=False)
        assert summary.ok == OK_COUNT
        rows, images = read_output(outputs[name])
        check_complete(rows, images, 64)
        digests[name] = {r["id"]: r["sha256"] for r in rows}
    assert digests["small"] == digests["large"]
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="renders")["Contents"]}
    assert {f"nightly/run-1/{k}" for k in images} <= keys and "nightly/run-1/commits/000000-000.json" in keys


@pytest.mark.slow
def test_rerun_renders_nothing_and_changes_nothing(local_run, prompts, tiny_manifest):
    out = local_run.out
    before = read_output(str(out))
    # pools and batch sizes may differ on a resume: they change no pixel
    manifest = tiny_manifest(f"input.path={prompts}", *SHARED, "stage1.batch_size=1", output=str(out))
    summary = run(manifest, progress=False)
    assert (summary.rows, summary.skipped_shards, summary.output_rows) == (0, 3, len(LINES))
    assert read_output(str(out)) == before


@pytest.mark.slow
def test_changed_manifest_is_refused_naming_the_change(local_run, prompts, tiny_manifest):
    out = local_run.out
    manifest = tiny_manifest(f"input.path={prompts}", *SHARED, "stage1.num_inference_steps=3", output=str(out))
    with pytest.raises(ChangedManifestError, match="stage1.num_inference_steps: 2 -> 3.*--allow-changed"):
        run(manifest, progress=False)


@pytest.mark.slow
def test_retry_errors_leaves_rows_whose_input_is_wrong_and_starts_no_pool(prompts, ray_local, tmp_path, tiny_manifest):
    """The shared prompts fail by their input only (no prompt, a bad seed, broken JSON): another
    try would fail them the same way, so a retry names them and renders nothing."""
    out = str(tmp_path / "retry")
    manifest = tiny_manifest(f"input.path={prompts}", "last_stage=stage1", "input.shard_size=3", output=out)
    run(manifest, progress=False)
    first, first_images = read_output(out)
    summary = run(manifest, retry_errors=True, progress=False)
    assert summary.rows == 0 and not summary.pool_sizes  # no chunk ran, so no pool started
    assert summary.not_retryable == len(LINES) - OK_COUNT
    assert any("prompt" in e for e in summary.not_retryable_examples)
    assert "need their input fixed (then run again with --allow-changed)" in summary.text()
    again, again_images = read_output(out)
    check_complete(again, again_images, 16)
    assert again_images == first_images and again == first
    assert {s: c.attempt for s, c in list_commits(out).items()} == {0: 0, 1: 0, 2: 0}


@pytest.mark.slow
def test_every_reader_of_the_readme_sees_each_row_once_and_the_tars_match(local_run, tmp_path):
    import webdataset as wds

    out, manifest = local_run.out, local_run.manifest
    size = 256
    rows, images = read_output(str(out))
    check_complete(rows, images, size)
    ok = sorted(r["id"] for r in rows if r["status"] == "ok")

    recipes = readme_recipes()
    assert sorted(recipes) == ["datasets", "duckdb", "pyarrow", "ray"]
    for name, code in recipes.items():
        scope = {"OUT": str(out), "HF_HOME": str(tmp_path / "hf")}
        exec(code, scope)  # noqa: S102 - the README's own code, run as a user would
        assert sorted(scope["ids"]) == ok, name
    # the datasets recipe decodes the embedded images, equal to the stored files
    for sample in scope["ds"]:
        assert sample["image"].size == (size, size) and sample["image"].mode == "RGB"
        np.testing.assert_array_equal(
            np.asarray(sample["image"]), np.asarray(Image.open(io.BytesIO(images[sample["image_key"]])))
        )

    tars = sorted(p.name for p in (out / "webdataset").glob("*.tar"))
    assert tars == ["000000.tar", "000001.tar", "000002.tar"]
    samples = list(wds.WebDataset([str(out / "webdataset" / t) for t in tars], shardshuffle=False).decode("pil"))
    assert len(samples) == OK_COUNT  # successful rows only; failures stay in the Parquet
    by_id = {r["id"]: r for r in rows}
    for sample in samples:
        meta = sample["json"]
        assert sample["txt"] == by_id[meta["id"]]["prompt"] and sample["png"].size == (size, size)
        assert sample["__key__"] == f"{meta['row']:09d}"
        assert np.array_equal(
            np.asarray(sample["png"]), np.asarray(Image.open(io.BytesIO(images[by_id[meta["id"]]["image_key"]])))
        )

    # a tar lost after its commit (a kill between the two), or overwritten since, is rebuilt by the next run
    (out / "webdataset" / "000001.tar").unlink()
    (out / "webdataset" / "000002.tar").write_bytes(b"not a tar")
    summary = run(manifest, progress=False)
    assert summary.rows == 0 and (out / "webdataset" / "000001.tar").is_file()
    assert len(list(wds.WebDataset(str(out / "webdataset" / "000001.tar"), shardshuffle=False))) == 1
    assert len(list(wds.WebDataset(str(out / "webdataset" / "000002.tar"), shardshuffle=False))) >= 1
    assert read_output(str(out))[0] == rows


HOSTILE = [
    {"prompt": "x" * 100_000},
    {"prompt": "bell\x07 and null\x00 and escape\x1b[31m red"},
    {"prompt": "dup a", "id": "same"},
    {"prompt": "dup b", "id": "same"},  # same shard: fails
    {"prompt": "dup c", "id": "same"},  # later shard: its own image directory
    {"prompt": "up", "id": "../../etc/passwd"},
    {"prompt": "abs", "id": "/abs/path"},
    {"prompt": "ctl", "id": "tab\there\nnewline"},
    {"prompt": "dots", "id": ".."},
    {"prompt": "seed", "seed": "12abc"},
    {"prompt": "seed", "seed": 1e30},
    {"prompt": None, "id": 7},
    {"prompt": {"nested": "object"}},
]


@pytest.mark.slow
def test_hostile_rows_all_accounted_for_and_keys_stay_inside(ray_local, tmp_path, tiny_manifest):
    path = tmp_path / "hostile.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in HOSTILE))
    out = tmp_path / "out"
    args = (f"input.path={path}", "input.shard_size=4", "last_stage=stage1")
    summary = run(tiny_manifest(*args, output=str(out)), progress=False)
    rows = pq.read_table(out / "data").to_pylist()
    assert len(rows) == len(HOSTILE) == summary.ok + summary.error  # rows in = ok + error
    by_prompt = {r["prompt"]: r for r in rows}
    assert by_prompt["dup b"]["status"] == "error" and "ids must be unique" in by_prompt["dup b"]["error"]
    assert by_prompt["dup a"]["status"] == by_prompt["dup c"]["status"] == "ok"
    assert by_prompt["dup a"]["image_key"] != by_prompt["dup c"]["image_key"]
    assert {by_prompt[p]["status"] for p in ("x" * 100_000, "up", "abs", "ctl", "dots")} == {"ok"}
    assert by_prompt["seed"]["status"] == "error"
    for r in rows:
        if r["image_key"]:
            assert (out / r["image_key"]).resolve().is_relative_to(out / "images")
            assert r["image_key"].isprintable() and ".." not in r["image_key"]


@pytest.mark.slow
def test_mixed_dataset_end_to_end_with_retry_and_contact_sheets(ray_local, tmp_path, tiny_manifest):
    (tmp_path / "fox.png").write_bytes(png((180, 90, 20)))
    (tmp_path / "mask.png").write_bytes(png(0, mask=True))
    records = [
        {"id": "text", "prompt": "a lighthouse", "num_images": 2, "upscale_noise_level": 50},
        {"id": "img2img", "prompt": "a fox", "image": "fox.png", "strength": 0.6},
        {"id": "inpaint", "prompt": "a fox", "image": "fox.png", "mask_image": "mask.png"},
        {"id": "late", "prompt": "an owl", "image": "owl.png"},  # missing until the retry
        {"id": "bad", "prompt": "a cat", "stage2_noise_level": -3},
    ]
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "out"
    manifest = tiny_manifest(f"input.path={prompts}", "input.shard_size=3", *SIGNED, *SCORED, output=str(out))
    summary = run(manifest, progress=False)
    assert (summary.rows, summary.ok, summary.error) == (6, 4, 2)
    assert summary.encode_texts - round(summary.encodes) >= 3  # "" once per actor, "a fox" shared

    def metadata():
        index = json.loads((out / "index.json").read_text())
        found = []
        for shard in index["shards"]:
            found += pq.read_table(out / shard["data"]).to_pylist()
        return {r["id"]: r for r in found}

    meta = metadata()
    assert sorted(meta) == ["bad", "img2img", "inpaint", "late", "text-0", "text-1"]
    assert meta["img2img"]["mode"] == "img2img" and meta["inpaint"]["mode"] == "inpaint"
    assert json.loads(meta["img2img"]["stage1_params"])["strength"] == 0.6
    assert json.loads(meta["text-1"]["upscale_params"])["noise_level"] == 50
    assert meta["text-0"]["seed"] != meta["text-1"]["seed"] and meta["text-0"]["sha256"] != meta["text-1"]["sha256"]
    assert meta["inpaint"]["nsfw_detected"] is False and meta["inpaint"]["watermarked"] is True
    assert "owl.png not found" in meta["late"]["error"] and "stage2_noise_level" in meta["bad"]["error"]
    for name in ("000000.jpg", "000001.jpg", "job.jpg"):
        assert Image.open(out / "contact" / name).size[0] >= 128

    # The missing image appears; a retry renders just that row as the shard's next attempt.
    (tmp_path / "owl.png").write_bytes(png((60, 60, 60)))
    summary = run(manifest, retry_errors=True, progress=False)
    assert (summary.rows, summary.ok) == (1, 1)  # "late" now renders; "bad" is not retried
    assert summary.not_retryable == 1 and "row id 'bad'" in summary.not_retryable_examples[0]
    after = metadata()
    assert after["late"]["status"] == "ok" and after["late"]["mode"] == "img2img"
    assert {k: v["sha256"] for k, v in after.items() if k != "late"} == {
        k: v["sha256"] for k, v in meta.items() if k != "late"
    }
    # Every image, the first attempt's and the retry's, carries valid Content Credentials.
    from tests.workers.test_provenance import read_credentials

    for row in (r for r in after.values() if r["status"] == "ok"):
        found = read_credentials(
            (out / row["image_key"]).read_bytes(), "image/jpeg" if row["image_key"].endswith(".jpg") else "image/png"
        )
        assert found["validation_state"] == "Valid" and found["active_manifest"] == row["c2pa"], row["id"]
        assert hashlib.sha256((out / row["image_key"]).read_bytes()).hexdigest() == row["sha256"]
    # Every ok row of every mode, first attempt and retry, is scored; a failed row has no scores.
    for row in after.values():
        scores = [row[s] for s in ("clip_score", "aesthetic_score", "nsfw_score", "watermark_score")]
        if row["status"] == "ok":
            assert all(v is not None and math.isfinite(v) for v in scores), row
            assert (
                re.fullmatch(r"[0-9a-f]{16}", row["phash"]) and json.loads(row["score_params"])["embeddings"] is False
            )
        else:
            assert scores == [None] * 4 and row["phash"] is None
    assert after["late"]["clip_score"] is not None and after["text-0"]["clip_score"] == meta["text-0"]["clip_score"]


@pytest.mark.slow
def test_a_mixed_file_renders_every_good_row_at_its_own_size(ray_local, tmp_path, tiny_manifest):
    import csv

    from tests.workers.test_sizes import png_of

    files = tmp_path / "files"  # the data files and their images: a folder reads only its data files
    files.mkdir()
    (files / "wide.png").write_bytes(png_of(768, 512))  # the guides' init image
    (files / "tall.png").write_bytes(png_of(512, 768))
    (files / "tall-mask.png").write_bytes(png_of(512, 768, mask=True))
    (files / "corrupt.png").write_bytes(png_of(32, 32)[:30])
    records = [
        {"id": "square", "prompt": "a fox"},
        {"id": "wide", "prompt": 'a 12" pizza on a table', "width": 24, "height": 16},
        {"id": "tall916", "prompt": "a tower", "width": 72, "height": 128},
        {"id": "img2img", "prompt": "a fox", "image": "wide.png"},
        {"id": "inpaint", "prompt": "a fox", "image": "tall.png", "mask_image": "tall-mask.png"},
        {"id": "corrupt", "prompt": "a fox", "image": "corrupt.png"},
        {"id": "badsize", "prompt": "a fox", "width": 20, "height": 16},
    ]
    # Sizes at last_stage=stage1 (the tiny stage I renders 16 px): each row its own.
    expected = {"square": (16, 16), "wide": (24, 16), "tall916": (72, 128), "img2img": (24, 16), "inpaint": (16, 24)}
    # Both files in one folder, one render: each file's shards are its own, so each is checked alone.
    (files / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    columns = ["id", "prompt", "width", "height", "image", "mask_image"]
    with open(files / "mixed.csv", "w", newline="", encoding="utf-8-sig") as f:  # with a BOM
        writer = csv.writer(f, quoting=csv.QUOTE_NONE, escapechar=None, quotechar="\x07")
        writer.writerow(columns)
        writer.writerows([[r.get(c, "") for c in columns] for r in records])  # the inch mark unquoted
    assert b'a 12" pizza' in (files / "mixed.csv").read_bytes()
    out = tmp_path / "out"
    m = tiny_manifest(f"input.path={files}", "input.shard_size=3", "last_stage=stage1", output=str(out))
    summary = run(m, progress=False)
    assert (summary.ok, summary.error) == (2 * 5, 2 * 2), summary.errors
    rendered = pq.read_table(out / "data").to_pylist()
    for name in ("mixed.jsonl", "mixed.csv"):
        by_id = {r["id"]: r for r in rendered if r["source_file"].endswith(name)}
        assert len(by_id) == len(records), name
        for row_id, (width, height) in expected.items():
            assert (by_id[row_id]["width"], by_id[row_id]["height"]) == (width, height), (name, row_id)
            assert Image.open(out / by_id[row_id]["image_key"]).size == (width, height)
        assert by_id["wide"]["prompt"] == 'a 12" pizza on a table'
        assert "not a readable image" in by_id["corrupt"]["error"]
        assert "Nearest valid: 16x16 or 24x16" in by_id["badsize"]["error"]
