"""Datasets as published: mapped column names, TSV and Arrow files, kept columns with their types,
and prompt templates, through the real plan and read-task code."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.input.columns import Columns
from jobs.input.rows import read_shards
from jobs.input.shards import plan_input, shard_items
from jobs.manifest import InputConfig
from workers.columns import decode_kept
from workers.errors import InputError

PARTI = (
    "Prompt\tCategory\tChallenge\tNote\r\n"
    '"A photo" of a cat\tAnimals\tBasic\t\r\n'
    'a sign that says "hello"\tWriting\tQuantity\tquotes inside\r\n'
    "un café à Paris\tPlaces\tBasic\tnon-ASCII\r\n"
    "too\tmany\tfields\there\tand more\r\n"
    "a fox\tAnimals\t\t\r\n"
)


def read_all(cfg: InputConfig) -> tuple[list[dict], Columns]:
    """Every output row of the input, with its kept columns decoded beside it."""
    plan = plan_input(cfg)
    items = shard_items(plan.shards)
    rows = []
    for item in items:
        batch = {k: np.array([item[k]], dtype=object) for k in item}
        out = read_shards(batch, job_seed=1, cfg=cfg, columns=plan.columns)
        kept = decode_kept(list(out["kept"]), plan.columns.kept).to_pylist()
        kept = kept or [{}] * len(out["id"])  # no kept columns: no table rows either
        rows += [{k: out[k][i] for k in out if k != "kept"} | {"kept": kept[i]} for i in range(len(out["id"]))]
    return rows, plan.columns


def test_a_partiprompts_tsv_reads_every_field_as_written(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_bytes(b"\xef\xbb\xbf" + PARTI.encode())
    rows, columns = read_all(InputConfig(path=str(path), columns={"prompt": "Prompt"}, shard_size=2))
    assert columns.kept.names == ["Category", "Challenge", "Note"]
    assert all(f.type == pa.string() for f in columns.kept)
    assert [r["prompt"] for r in rows if r["status"] == "ok"] == [
        '"A photo" of a cat',
        'a sign that says "hello"',
        "un café à Paris",
        "a fox",
    ]
    first = rows[0]["kept"]
    assert first == {"Category": "Animals", "Challenge": "Basic", "Note": ""}  # an empty last field stays empty
    bad = rows[3]
    assert bad["status"] == "error" and "line 5" in bad["error"] and "5 fields" in bad["error"]
    assert "cannot hold a tab" in bad["error"]


def test_tsv_records_over_the_cap_are_error_rows(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("prompt\tnote\nshort\tx\n" + "y" * 500 + "\tz\nlast\tw\n")
    rows, _ = read_all(InputConfig(path=str(path), max_record_bytes=100))
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert "max_record_bytes=100" in rows[1]["error"]


@pytest.mark.parametrize("name", ["Prompt", " prompt", "PROMPT "])
def test_a_prompt_column_in_other_case_gets_the_line_that_fixes_it(tmp_path, name):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({name: ["a fox"], "x": [1]}), path)
    with pytest.raises(InputError) as err:
        plan_input(InputConfig(path=str(path)))
    assert str(path) in str(err.value) and f"input.columns: {{prompt: {json.dumps(name)}}}" in str(err.value)
    rows, _ = read_all(InputConfig(path=str(path), columns={"prompt": name}))
    assert rows[0]["prompt"] == "a fox" and rows[0]["status"] == "ok"


def test_a_mapped_column_the_file_lacks_names_the_file_and_its_columns(tmp_path):
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"TEXT": ["a fox"], "key": ["000001"]}), path)
    with pytest.raises(InputError, match=r"laion.parquet: no column 'caption'.*\['TEXT', 'key'\].*prompt: \"TEXT\""):
        plan_input(InputConfig(path=str(path), columns={"prompt": "caption"}))
    with pytest.raises(InputError, match=r"no column 'uid' \(input.columns maps id to it\)"):
        plan_input(InputConfig(path=str(path), columns={"prompt": "TEXT", "id": "uid"}))


def laion_table(n: int = 7) -> pa.Table:
    return pa.table(
        {
            "TEXT": [f"caption {i}" for i in range(n)],
            "key": [f"{i:09d}" for i in range(n)],
            "similarity": [0.25 + i for i in range(n)],
            "half": pa.array([float(i) for i in range(n)], pa.float16()),
            "tags": [[i, i + 1] if i % 3 else None for i in range(n)],
            "meta": [{"w": i, "src": f"u{i}"} if i % 2 else None for i in range(n)],
            "when": pa.array([datetime.datetime(2024, 1, i + 1) for i in range(n)], pa.timestamp("us", tz="UTC")),
        }
    )


def write_stream(table: pa.Table, path, batch_rows: int) -> None:
    with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)


@pytest.mark.parametrize("kind", ["parquet", "feather", "stream", "save_to_disk"])
def test_table_files_keep_every_column_with_its_arrow_type(tmp_path, kind):
    table = laion_table()
    if kind == "parquet":
        path = tmp_path / "laion.parquet"
        pq.write_table(table, path, row_group_size=3)
    elif kind == "feather":
        path = tmp_path / "laion.feather"
        feather.write_feather(table, path, chunksize=2)
    elif kind == "stream":
        path = tmp_path / "laion.arrow"
        write_stream(table, path, 3)
    else:
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset(table).save_to_disk(str(path))
    rows, columns = read_all(InputConfig(path=str(path), columns={"prompt": "TEXT", "id": "key"}, shard_size=2))
    assert columns.kept.names == ["similarity", "half", "tags", "meta", "when"]
    assert columns.kept.field("half").type == pa.float16()
    assert columns.kept.field("when").type == pa.timestamp("us", tz="UTC")
    expected = table.drop_columns(["TEXT", "key"]).to_pylist()
    assert [r["id"] for r in rows] == table.column("key").to_pylist()
    assert [r["prompt"] for r in rows] == table.column("TEXT").to_pylist()
    assert [r["kept"] for r in rows] == expected


def test_a_dictionary_encoded_stream_reads_every_shard(tmp_path):
    table = pa.table({"prompt": pa.array([f"p{i % 3}" for i in range(10)]).dictionary_encode(), "n": list(range(10))})
    write_stream(table, tmp_path / "d.arrow", 3)
    rows, _ = read_all(InputConfig(path=str(tmp_path / "d.arrow"), shard_size=4))
    assert [r["prompt"] for r in rows] == [f"p{i % 3}" for i in range(10)]
    assert [r["kept"]["n"] for r in rows] == list(range(10))


def test_jsonl_columns_keep_their_json_type_where_it_is_one(tmp_path):
    path = tmp_path / "p.jsonl"
    records = [
        {"prompt": "a", "label": "cat", "n": 1, "x": 1.5, "mixed": 1, "obj": {"a": 1}, "flag": True},
        {"prompt": "b", "label": "dog", "n": 2, "x": 2, "mixed": "two", "obj": {"a": 2, "b": [1]}, "flag": None},
        {"prompt": "c", "n": 3, "mixed": [3], "big": 2**70},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    rows, columns = read_all(InputConfig(path=str(path)))
    types = dict(zip(columns.kept.names, columns.kept.types))
    assert types == {
        "label": pa.string(),
        "n": pa.int64(),
        "x": pa.float64(),
        "mixed": pa.string(),
        "obj": pa.struct([("a", pa.int64()), ("b", pa.list_(pa.int64()))]),
        "flag": pa.bool_(),
        "big": pa.string(),
    }
    assert set(columns.json_text) == {"mixed", "big"}
    assert [r["kept"]["mixed"] for r in rows] == ["1", '"two"', "[3]"]
    assert rows[2]["kept"]["big"] == str(2**70) and rows[1]["kept"]["obj"] == {"a": 2, "b": [1]}
    assert rows[1]["kept"]["x"] == 2.0 and rows[2]["kept"]["label"] is None


def test_keep_columns_none_a_list_and_names_that_clash(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"TEXT": ["a"], "prompt": ["old"], "status": ["done"], "url": ["u"], "w": [1]}), path)
    with pytest.raises(InputError) as err:
        plan_input(InputConfig(path=str(path), columns={"prompt": "TEXT"}))
    message = str(err.value)
    assert "'prompt' would stand beside ifrender's own 'prompt'" in message and "maps prompt to 'TEXT'" in message
    assert "'status'" in message and 'input.keep_columns: ["url", "w"]' in message
    _, columns = read_all(InputConfig(path=str(path), columns={"prompt": "TEXT"}, keep_columns=["url", "w"]))
    assert columns.kept.names == ["url", "w"]
    _, columns = read_all(InputConfig(path=str(path), columns={"prompt": "TEXT"}, keep_columns="none"))
    assert columns.kept.names == []
    with pytest.raises(InputError, match=r"keep_columns names \['nope'\].*\['TEXT', 'prompt'"):
        plan_input(InputConfig(path=str(path), columns={"prompt": "TEXT"}, keep_columns=["nope"]))
    with pytest.raises(InputError, match=r"keep_columns names \['TEXT'\], which ifrender reads"):
        plan_input(InputConfig(path=str(path), columns={"prompt": "TEXT"}, keep_columns=["TEXT"]))


def test_files_whose_types_unify_are_promoted_and_others_refused(tmp_path):
    pq.write_table(pa.table({"prompt": ["a"], "score": pa.array([1], pa.int32())}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"prompt": ["b"], "score": [0.5], "extra": ["x"]}), tmp_path / "b.parquet")
    rows, columns = read_all(InputConfig(path=str(tmp_path)))
    assert dict(zip(columns.kept.names, columns.kept.types)) == {"score": pa.float64(), "extra": pa.string()}
    assert [r["kept"] for r in rows] == [{"score": 1.0, "extra": None}, {"score": 0.5, "extra": "x"}]
    pq.write_table(pa.table({"prompt": ["c"], "score": ["high"]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match="'score' has types that do not unify"):
        plan_input(InputConfig(path=str(tmp_path)))


def test_a_template_builds_prompts_and_a_missing_field_fails_its_row_only(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("label,style\ntabby cat,oil\ncorgi,\nfox,ink\n")
    cfg = InputConfig(
        path=str(path), prompt_template="a {style} painting of a {label}", negative_prompt_template="{style}, blurry"
    )
    rows, columns = read_all(cfg)
    assert [r["prompt"] for r in rows] == ["a oil painting of a tabby cat", "", "a ink painting of a fox"]
    assert rows[0]["negative_prompt"] == "oil, blurry"
    assert [r["status"] for r in rows] == ["ok", "error", "ok"]
    assert rows[1]["error"].startswith("style: the template") and "found ''" in rows[1]["error"]
    assert [r["kept"]["label"] for r in rows] == ["tabby cat", "corgi", "fox"]  # the label stays beside its image
    assert "  prompt <- the template 'a {style} painting of a {label}'" in columns.describe()
    with pytest.raises(InputError, match=r"names \['breed'\].*\['label', 'style'\]"):
        plan_input(InputConfig(path=str(path), prompt_template="a {breed}"))
    with pytest.raises(InputError, match="expected one of the two"):
        plan_input(InputConfig(path=str(path), prompt_template="a {label}", columns={"prompt": "label"}))


def test_validate_describes_the_mapping_and_the_kept_columns(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(laion_table(2), path)
    described = plan_input(InputConfig(path=str(path), columns={"prompt": "TEXT", "id": "key"})).columns.describe()
    assert "  prompt <- TEXT" in described and "  id <- key" in described
    assert "  half: halffloat" in described


# ---- generated datasets: mapped names and kept columns round trip in every format ----------

# Text a TSV can hold (no tab, no line break) and any reader keeps byte for byte.
cell = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters="\t\n\r"), max_size=30
)
caption = cell.filter(lambda t: t.strip() != "")
dataset = st.lists(st.tuples(caption, cell, cell), min_size=40, max_size=60)  # 25 examples: at least 1,000 rows


def write_dataset(path, fmt: str, rows: list[tuple[str, str, str]]) -> None:
    """Columns Caption, key, Category, Note: the prompt and id under the dataset's own names."""
    records = [{"Caption": c, "key": f"k{i}", "Category": a, "Note": b} for i, (c, a, b) in enumerate(rows)]
    if fmt in ("parquet", "arrow"):
        table = pa.Table.from_pylist(records)
        if fmt == "parquet":
            pq.write_table(table, path, row_group_size=11)
        else:
            feather.write_feather(table, path, chunksize=11)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    else:
        lines = ["\t".join(records[0])] + ["\t".join(r.values()) for r in records]
        path.write_text("\r\n".join(lines) + "\r\n", newline="")


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet", "arrow"])
def test_generated_datasets_come_back_with_every_value_under_its_name(tmp_path, fmt):
    seen = {"rows": 0, "files": 0}

    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(dataset, st.integers(1, 9))
    def one(rows, shard_size):
        path = tmp_path / f"d{seen['files']}.{fmt}"
        write_dataset(path, fmt, rows)
        cfg = InputConfig(path=str(path), columns={"prompt": "Caption", "id": "key"}, shard_size=shard_size)
        out, columns = read_all(cfg)
        assert columns.kept.names == ["Category", "Note"]
        assert [r["status"] for r in out] == ["ok"] * len(rows)
        assert [(r["prompt"], r["id"]) for r in out] == [(c, f"k{i}") for i, (c, _, _) in enumerate(rows)]
        assert [(r["kept"]["Category"], r["kept"]["Note"]) for r in out] == [(a, b) for _, a, b in rows]
        seen["rows"] += len(rows)
        seen["files"] += 1

    one()
    print(f"{fmt}: {seen['files']} files, {seen['rows']} rows mapped and kept, 0 lost or changed")
    assert seen["rows"] >= 1000


def test_tsv_and_arrow_stream_from_a_real_s3_server_with_their_columns(s3_server, tmp_path):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="published")
    s3.put_object(Bucket="published", Key="parti/PartiPrompts.tsv", Body=PARTI.encode())
    stream = tmp_path / "laion.arrow"
    write_stream(laion_table(9), stream, 2)
    s3.put_object(Bucket="published", Key="laion/part-0.arrow", Body=stream.read_bytes())
    rows, _ = read_all(InputConfig(path="s3://published/parti", columns={"prompt": "Prompt"}, shard_size=2))
    assert [r["kept"]["Category"] for r in rows] == ["Animals", "Writing", "Places", None, "Animals"]
    cfg = InputConfig(path="s3://published/laion", columns={"prompt": "TEXT", "id": "key"}, shard_size=4)
    rows, _ = read_all(cfg)
    assert [r["id"] for r in rows] == [f"{i:09d}" for i in range(9)]
    assert [r["kept"] for r in rows] == laion_table(9).drop_columns(["TEXT", "key"]).to_pylist()


@pytest.mark.parametrize("name,data", [("empty.parquet", b""), ("cut.parquet", b"PAR1 garbage"), ("empty.arrow", b"")])
def test_an_unreadable_table_file_is_named_before_any_work(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(InputError, match=rf"{name}: not a readable .* file \({len(data)} bytes: .*upload it again"):
        plan_input(InputConfig(path=str(tmp_path / name)))
