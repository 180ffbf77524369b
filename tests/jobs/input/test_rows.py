"""The shard plan and row reading: every format, sharding, seeds, bad rows as error rows, images
from paths, S3, bytes and datasets columns."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.input.rows import read_shards
from jobs.input.shards import plan_shards, shard_items
from jobs.manifest import InputConfig, load_manifest
from tests.helpers import (
    png,
)
from workers.errors import InputError
from workers.keys import derive_seed

PROMPTS = [
    "a red fox",
    "a lighthouse, in a storm",
    'a sign that says "hi"',
    "two\nlines",
    "a corgi",
    "a robot",
    "a castle",
]


def read_all(cfg: InputConfig, job_seed: int = 0) -> list[dict]:
    rows = []
    for item in shard_items(plan_shards(cfg)):
        out = read_shards({k: np.array([v], dtype=object) for k, v in item.items()}, job_seed, cfg)
        rows += [dict(zip(out, values)) for values in zip(*out.values())]
    return rows


def write_dataset(tmp_path, fmt: str, prompts=PROMPTS):
    path = tmp_path / f"prompts.{ {'text': 'txt'}.get(fmt, fmt) }"
    if fmt == "parquet":
        pq.write_table(pa.table({"prompt": prompts}), path, row_group_size=2)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts) + "\n")
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt"])
            w.writerows([p] for p in prompts)
    else:
        path.write_text("\n".join(p.replace("\n", " ") for p in prompts) + "\n\n")
    return path


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "text"])
@pytest.mark.parametrize("shard_size", [1, 3, 100])
def test_every_format_reads_every_row_once_in_order(tmp_path, fmt, shard_size):
    path = write_dataset(tmp_path, fmt)
    rows = read_all(InputConfig(path=str(path), shard_size=shard_size))
    expected = [p.replace("\n", " ") for p in PROMPTS] if fmt == "text" else PROMPTS
    assert [r["prompt"] for r in rows] == expected
    assert [r["id"] for r in rows] == [f"{i:09d}" for i in range(len(PROMPTS))]
    assert all(r["status"] == "ok" for r in rows)
    assert len({r["shard"] for r in rows}) == -(-len(PROMPTS) // shard_size)


def test_seeds_derive_from_job_seed_and_id_whatever_the_sharding(tmp_path):
    path = write_dataset(tmp_path, "jsonl")
    a = read_all(InputConfig(path=str(path), shard_size=2), job_seed=7)
    b = read_all(InputConfig(path=str(path), shard_size=5), job_seed=7)
    assert [r["seed"] for r in a] == [r["seed"] for r in b] == [derive_seed(7, r["id"]) for r in a]
    assert len({r["seed"] for r in a}) == len(a)
    assert [r["seed"] for r in read_all(InputConfig(path=str(path)), job_seed=8)] != [r["seed"] for r in a]


def test_source_rows_point_back_to_input_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c"}\n')
    rows = read_all(InputConfig(path=str(path), shard_size=2))
    assert [r["source_row"] for r in rows] == [1, 3, 4]


def test_directory_input_concatenates_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("third\n")
    (tmp_path / "a.txt").write_text("first\nsecond\n")
    rows = read_all(InputConfig(path=str(tmp_path), shard_size=2))
    assert [r["prompt"] for r in rows] == ["first", "second", "third"]
    assert [r["id"] for r in rows] == ["000000000", "000000001", "000000002"]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_missing_prompt_column_fails_at_once_naming_the_file(tmp_path, fmt):
    path = tmp_path / f"x.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"text": ["a"]}), path)
    elif fmt == "jsonl":
        path.write_text('{"text": "a"}\n')
    else:
        path.write_text("text\na\n")
    with pytest.raises(InputError, match=f"{path}: no 'prompt' column.*found \\['text'\\]"):
        plan_shards(InputConfig(path=str(path)))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_dataset_fails_at_once(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(InputError, match="no rows"):
        plan_shards(InputConfig(path=str(path)))


def test_missing_path_fails_at_once(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        plan_shards(InputConfig(path=str(tmp_path / "nope.jsonl")))


BAD_ROWS = [
    ({"prompt": "fine"}, None),
    ({"prompt": None}, "prompt: expected non-empty text, found None"),
    ({"prompt": ""}, "prompt: expected non-empty text"),
    ({"prompt": "   \t"}, "prompt: expected non-empty text"),
    ({"prompt": 42}, "prompt: expected non-empty text, found 42"),
    ({"prompt": ["a list"]}, "prompt: expected non-empty text"),
    ({"text": "no prompt key"}, "prompt: expected non-empty text, found None"),
    ({"prompt": "ok", "seed": "abc"}, "seed: expected an integer"),
    ({"prompt": "ok", "seed": -1}, "seed: expected an integer"),
    ({"prompt": "ok", "seed": 1.5}, "seed: expected an integer"),
    ({"prompt": "ok", "seed": True}, "seed: expected an integer"),
    ({"prompt": "ok", "seed": 2**64}, "seed: expected an integer"),
    ({"prompt": "ok", "seed": 3.0}, None),
    ({"prompt": "ok", "seed": 2**63 - 1}, None),
    ({"prompt": "ok", "negative_prompt": 5}, "negative_prompt: expected text or null"),
    ("not json at all", "is not valid JSON"),
    ([1, 2], "expected a JSON object, found list"),
    ({"prompt": "x" * 100_000}, None),
]


def test_malformed_rows_become_error_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [raw if isinstance(raw, str) else json.dumps(raw) for raw, _ in BAD_ROWS]
    path.write_text("\n".join(lines) + "\n")
    rows = read_all(InputConfig(path=str(path), shard_size=4))
    assert len(rows) == len(BAD_ROWS)
    for row, (raw, expected) in zip(rows, BAD_ROWS):
        if expected is None:
            assert row["status"] == "ok" and row["error"] == "", (raw, row["error"])
        else:
            assert row["status"] == "error" and expected in row["error"], (raw, row["error"])
    assert rows[12]["seed"] == 3


def test_invalid_utf8_line_is_an_error_row(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"good\n\xff\xfebad\nalso good\n")
    rows = read_all(InputConfig(path=str(path)))
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert "line 2" in rows[1]["error"] and "UTF-8" in rows[1]["error"]


def test_given_ids_and_seeds_are_kept(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('id,prompt,seed,negative_prompt\nfox-1,a fox,12,blurry\n,"multi\nline",,\n')
    rows = read_all(InputConfig(path=str(path)))
    assert [(r["id"], r["seed"], r["negative_prompt"]) for r in rows][0] == ("fox-1", 12, "blurry")
    assert rows[1]["id"] == "000000001" and rows[1]["prompt"] == "multi\nline" and rows[1]["negative_prompt"] == ""


def test_s3_input_streams_from_a_real_s3_server(s3_server, tmp_path):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="inputs")
    path = write_dataset(tmp_path, "jsonl")
    s3.put_object(Bucket="inputs", Key="prompts/part-0.jsonl", Body=path.read_bytes())
    s3.put_object(Bucket="inputs", Key="prompts/part-1.txt", Body=b"one more\n")
    rows = read_all(InputConfig(path="s3://inputs/prompts", shard_size=3))
    assert [r["prompt"] for r in rows] == PROMPTS + ["one more"]
    assert rows[-1]["source_file"] == "s3://inputs/prompts/part-1.txt"


def test_explicit_format_overrides_the_extension(tmp_path):
    path = tmp_path / "prompts.dat"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    with pytest.raises(InputError, match="cannot tell the format from the extension.*set input.format"):
        plan_shards(InputConfig(path=str(path)))
    assert [r["prompt"] for r in read_all(InputConfig(path=str(path), format="jsonl"))] == ["a", "b"]


def read(tmp_path: Path, records: list[dict], num_images: int = 1) -> dict:
    """The reader's rows for JSON records, through the real plan and read-task code."""
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = load_manifest(None, ["output.path=/o", f"input.path={path}"]).input
    batch = {
        k: np.array([s[k] for s in shard_items(plan_shards(cfg))], dtype=object)
        for k in shard_items(plan_shards(cfg))[0]
    }
    return read_shards(batch, job_seed=7, cfg=cfg, num_images=num_images)


def test_every_invalid_row_value_becomes_an_error_row_naming_it(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = {
        "stage1_guidance_scale": -1,
        "stage1_num_inference_steps": 0,
        "stage2_num_inference_steps": True,
        "stage1_timesteps": "fast99",
        "stage2_noise_level": 5000,
        "upscale_noise_level": 400,
        "strength": 0,
        "stage2_strength": 1.5,
        "num_images": 0,
        "stage1_guidence_scale": 5,
        "image": "missing.png",
        "image ": None,
    }
    records = [{"id": f"b{i}", "prompt": "p", k: v} for i, (k, v) in enumerate(bad.items())]
    records += [
        {"id": "corrupt", "prompt": "p", "image": "broken.png"},
        {"id": "mask-only", "prompt": "p", "mask_image": "m.png"},
        {"id": "fine", "prompt": "p", "stage1_guidance_scale": "5.5", "upscale_noise_level": 20},
    ]
    (tmp_path / "m.png").write_bytes(png(0, mask=True))
    out = read(tmp_path, records)
    errors = dict(zip(out["id"], out["error"]))
    status = dict(zip(out["id"], out["status"]))
    for i, field in enumerate(bad):
        if field == "image ":
            assert status[f"b{i}"] == "ok"  # not a setting: other columns are the dataset's own
            continue
        assert status[f"b{i}"] == "error", field
        assert errors[f"b{i}"].startswith(field.strip()), (field, errors[f"b{i}"])
    assert "stage1_guidence_scale: unknown per-row setting; expected one of stage1_guidance_scale" in errors["b9"]
    assert "missing.png not found" in errors["b10"]
    assert "is not a readable image" in errors["corrupt"]
    assert errors["mask-only"].startswith("mask_image: given without image")
    assert status["fine"] == "ok"
    fine = list(out["id"]).index("fine")
    assert json.loads(out["overrides"][fine]) == {"stage1_guidance_scale": 5.5, "upscale_noise_level": 20}


def test_num_images_expands_rows_with_distinct_reproducible_seeds(tmp_path):
    records = [{"id": "fox", "prompt": "a fox", "seed": 11, "num_images": 3}, {"id": "owl", "prompt": "an owl"}]
    out = read(tmp_path, records, num_images=2)
    assert list(out["id"]) == ["fox-0", "fox-1", "fox-2", "owl-0", "owl-1"]
    assert list(out["image_index"]) == [0, 1, 2, 0, 1]
    assert out["seed"][0] == 11 and len(set(out["seed"])) == 5  # image 0 keeps the row's seed
    assert len(set(out["item"])) == 5 and set(out["shard_items"]) == {5}
    again = read(tmp_path, records, num_images=2)
    assert list(again["seed"]) == list(out["seed"])


def read_parquet(path: Path, table: pa.Table, *overrides: str) -> dict:
    pq.write_table(table, path)
    cfg = load_manifest(None, ["output.path=/o", f"input.path={path}", *overrides]).input
    items = shard_items(plan_shards(cfg))
    return read_shards({k: np.array([s[k] for s in items], dtype=object) for k in items[0]}, job_seed=1, cfg=cfg)


def test_images_come_from_paths_s3_bytes_and_datasets_columns(tmp_path, s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket="inits")
    boto3.client("s3").put_object(Bucket="inits", Key="a.png", Body=png((200, 0, 0)))
    (tmp_path / "b.png").write_bytes(png((0, 200, 0)))
    uris = pa.table({"prompt": ["s3 init", "relative path", "text"], "image": ["s3://inits/a.png", "b.png", None]})
    # The images' bucket is an image root beside the input's own directory.
    out = read_parquet(tmp_path / "uris.parquet", uris, f"input.image_roots=[{tmp_path}, s3://inits]")
    assert list(out["mode"]) == ["img2img", "img2img", "text2img"], out["error"]
    assert out["image"][0] == png((200, 0, 0)) and out["image"][1] == png((0, 200, 0))
    # Raw bytes, and the {bytes, path} struct of a datasets Image column.
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [{"bytes": png((0, 0, 200)), "path": None}, {"bytes": png((9, 9, 9)), "path": "x.png"}, None]
    out = read_parquet(
        tmp_path / "s.parquet", pa.table({"prompt": ["a", "b", "c"], "image": pa.array(images, image_type)})
    )
    assert list(out["mode"]) == ["img2img", "img2img", "text2img"], out["error"]
    raw = pa.table({"prompt": ["a", "b"], "image": pa.array([png((1, 2, 3)), b"not an image"], pa.binary())})
    out = read_parquet(tmp_path / "raw.parquet", raw)
    assert out["image"][0] == png((1, 2, 3)) and out["status"][1] == "error"
    assert "the row's bytes is not a readable image" in out["error"][1]


# ---- hardened input --------------------------------------------------------------------------


def read_file(path, *overrides: str) -> dict:
    cfg = load_manifest(None, ["output.path=/o", f"input.path={path}", *overrides]).input
    items = shard_items(plan_shards(cfg))
    return read_shards({k: np.array([s[k] for s in items], dtype=object) for k in items[0]}, job_seed=1, cfg=cfg)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_csv_with_inch_marks_quoted_newlines_any_line_ending_and_a_bom(tmp_path, newline):
    lines = [b"id,prompt,seed", b'c1,a 12" pizza on a table,1', b'c2,"two' + newline + b'lines",2', b"c3,plain,3"]
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbf" + newline.join(lines) + newline)
    out = read_file(path, "input.shard_size=1")
    assert list(out["status"]) == ["ok"] * 3, out["error"]
    assert list(out["id"]) == ["c1", "c2", "c3"]  # the BOM did not rename the first column
    assert out["prompt"][0] == 'a 12" pizza on a table' and out["prompt"][1] == "two" + newline.decode() + "lines"
    assert list(out["seed"]) == [1, 2, 3] and list(out["source_row"]) == [2, 3, 5]  # c2 spans lines 3-4


def test_boms_in_jsonl_and_text_and_over_long_records_fail_alone(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\n{"prompt": "' + b"x" * 300 + b'"}\n')
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfsecond\nthird\n")
    out = read_file(tmp_path, "input.max_record_bytes=200")
    assert list(out["prompt"][[0, 2, 3]]) == ["first", "second", "third"]
    assert out["status"][1] == "error" and "longer than input.max_record_bytes=200" in out["error"][1]
    assert out["error"][1].startswith("line 2 of ")


def test_a_csv_row_with_more_fields_than_the_header_is_an_error_row(tmp_path):
    (tmp_path / "p.csv").write_text("id,prompt\na,a fox, in snow\nb,an owl\n")
    out = read_file(tmp_path / "p.csv")
    assert list(out["status"]) == ["error", "ok"]
    assert out["error"][0].startswith("line 2 of ") and "3 fields, but the header names 2" in out["error"][0]


def test_float_seeds_must_be_exact_integers(tmp_path):
    seeds = [3.0, 2.0**53, 2.0**60, 1.5, 2**62]
    out = read(tmp_path, [{"prompt": "p", "seed": s} for s in seeds])
    assert list(out["status"]) == ["ok", "ok", "error", "error", "ok"]
    assert out["seed"][1] == 2**53 and out["seed"][4] == 2**62
    assert "an exact one up to 2**53" in out["error"][2]


def test_a_directory_reads_only_its_data_files(tmp_path):
    (tmp_path / "part-0.jsonl").write_text('{"prompt": "a fox"}\n')
    (tmp_path / "README.txt").write_text("This dataset holds prompts.\n")
    (tmp_path / "dataset_info.json").write_text('{"prompt": "not a row"}\n')
    (tmp_path / "notes.md").write_text("# notes\n")
    assert [r["prompt"] for r in read_all(InputConfig(path=str(tmp_path)))] == ["a fox"]
    picked = read_all(InputConfig(path=str(tmp_path), pattern="*.json"))
    assert [r["prompt"] for r in picked] == ["not a row"]
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.txt").write_text("only documentation here\n")
    with pytest.raises(InputError, match=r"none of its 1 files is a data file.*Fix: set input.pattern"):
        read_all(InputConfig(path=str(tmp_path / "docs")))


def test_image_paths_stay_inside_the_image_roots_and_refusals_do_not_reveal_existence(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(png((1, 1, 1)))
    (data / "link.png").symlink_to(outside / "secret.png")
    (data / "ok.png").write_bytes(png((2, 2, 2)))
    records = [
        {"prompt": "p", "image": "ok.png"},
        {"prompt": "p", "image": "../outside/secret.png"},  # exists
        {"prompt": "p", "image": "../outside/nothing.png"},  # does not
        {"prompt": "p", "image": str(outside / "secret.png")},
        {"prompt": "p", "image": "link.png"},  # a link out of the root
        {"prompt": "p", "image": "s3://someone-elses-bucket/x.png"},
    ]
    out = read(data, records)
    assert list(out["status"]) == ["ok"] + ["error"] * 5
    refusals = [e.split(" lies outside", 1)[1] for e in out["error"][1:]]
    assert len(set(refusals)) == 1 and "input.image_roots" in refusals[0]
    # Listing the other folder as a root allows exactly those paths.
    path = data / "allowed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[1:4]))
    assert list(read_file(path, f"input.image_roots=[{data}, {outside}]")["status"]) == ["ok", "error", "ok"]


def test_image_files_are_checked_before_they_are_read_or_decoded(tmp_path):
    import os

    from PIL import Image

    Image.new("L", (2000, 2000)).save(tmp_path / "big.png")  # tiny file, many pixels
    (tmp_path / "heavy.png").write_bytes(png((3, 3, 3)) + b"\0" * 5000)
    os.mkfifo(tmp_path / "fifo.png")  # reading it would block forever
    records = [{"prompt": "p", "image": name} for name in ("big.png", "heavy.png", "fifo.png")]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = read_file(path, "input.max_image_pixels=1000000", "input.max_image_bytes=4000")
    assert list(out["status"]) == ["error"] * 3
    assert "2000x2000 pixels, over input.max_image_pixels=1000000" in out["error"][0]
    assert "bytes, over input.max_image_bytes=4000" in out["error"][1]
    assert "not a regular file" in out["error"][2]


def test_repeated_ids_across_shards_render_both_rows_into_their_own_shards(tmp_path):
    # The policy: ids are unique per shard (a repeat there fails); across shards both render,
    # each into its own shard's image directory, with the same derived seed.
    out = read(tmp_path, [{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}, {"prompt": "c", "id": "x"}])
    assert list(out["status"]) == ["ok", "error", "error"] and "is also the id of row 0" in out["error"][1]
    path = tmp_path / "rows.jsonl"
    split = read_file(path, "input.shard_size=1")
    assert list(split["status"]) == ["ok", "ok", "ok"] and len(set(split["seed"])) == 1
    assert len(set(split["shard"])) == 3


def test_row_sizes_become_stage_one_targets_or_errors_naming_the_nearest_valid_sizes(tmp_path):
    (tmp_path / "i.png").write_bytes(png((1, 2, 3)))
    records = [
        {"prompt": "native"},
        {"prompt": "3:2", "width": 1536, "height": 1024},
        {"prompt": "odd", "width": 1000, "height": 600},
        {"prompt": "half", "width": 1024},
        {"prompt": "img2img", "image": "i.png", "width": 1024, "height": 1024},
    ]
    out = read(tmp_path, records)
    assert list(out["status"]) == ["ok", "ok", "error", "error", "error"]
    assert [(w, h) for w, h in zip(out["stage1_width"], out["stage1_height"])][:2] == [(0, 0), (96, 64)]
    assert "Nearest valid: 896x512 or 1024x640" in out["error"][2]
    assert "expected both or neither" in out["error"][3]
    assert "set on an img2img row, whose size follows its init image" in out["error"][4]
