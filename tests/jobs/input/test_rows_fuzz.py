"""Generated hostile input in every format through the real plan and read-task code: the read
stage never raises, every input record comes out once (ok or error), and every error names its
row's problem by field or line. Also one end-to-end job over a generated mixed file."""

from __future__ import annotations

import csv
import io
import itertools
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from jobs.input.rows import read_shards
from jobs.input.shards import plan_shards, shard_items
from jobs.manifest import load_manifest
from jobs.render import run
from tests.helpers import png
from workers.overrides import OVERRIDE_COLUMNS

ROWS_PER_FILE = 40
EXAMPLES = 30  # 1,200 generated rows per format
# Where an error may start: a field the reader checks, or the line/row of a record it could not parse.
ERROR_STARTS = ("prompt", "negative_prompt", "seed", "image", "mask_image", "id", "line ", "row ")
ERROR_STARTS += OVERRIDE_COLUMNS + ("stage1_", "stage2_", "upscale_")
counter = itertools.count()

hostile_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(['a 12" pizza on a table', "bell\x07 null\x00 esc\x1b[31m", "   ", "", "x" * 5000, "tab\tcomma,"]),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=20),
)
json_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    hostile_text,
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
image_value = st.sampled_from(
    [
        "good.png",
        "mask.png",
        "corrupt.png",
        "missing.png",
        "../escape.png",
        "/etc/passwd",
        "sub",
        "s3://other/x.png",
        "",
    ]
)
good_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=60)
record = st.fixed_dictionaries(
    {"prompt": st.one_of(good_text, good_text, hostile_text, json_value)},
    optional={
        "id": st.one_of(hostile_text, st.integers()),
        "seed": st.one_of(st.integers(0, 2**63 - 1), json_value),
        "negative_prompt": st.one_of(good_text, json_value),
        "image": image_value,
        "mask_image": image_value,
        "num_images": st.one_of(st.integers(-1, 3), json_value),
    },
)
settings_columns = st.dictionaries(
    st.sampled_from(OVERRIDE_COLUMNS + ("stage1_guidence_scale",)), json_value, max_size=2
)
record = st.tuples(record, settings_columns).map(lambda pair: pair[1] | pair[0])
files = st.tuples(
    st.lists(record, min_size=ROWS_PER_FILE, max_size=2 * ROWS_PER_FILE),
    st.sampled_from(["\n", "\r\n", "\r"]),
    st.booleans(),  # a UTF-8 BOM
    st.integers(1, 7),  # shard size
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "good.png").write_bytes(png((10, 20, 30)))
    (root / "mask.png").write_bytes(png(255, mask=True))
    (root / "corrupt.png").write_bytes(png((1, 2, 3))[:40])  # a truncated file
    (root / "sub").mkdir()  # a directory where an image should be
    return root


def write(folder, fmt: str, records: list[dict], newline: str, bom: bool) -> tuple[str, int]:
    """The records as a file of `fmt`; returns its path and the number of records it holds."""
    path = folder / f"in-{next(counter)}.{ {'text': 'txt'}.get(fmt, fmt) }"
    if fmt in ("parquet", "arrow"):
        columns = sorted({k for r in records for k in r})
        # Tables have types: each column as text, JSON-encoded where the value is not text.
        table = pa.table(
            {c: [v if isinstance(v := r.get(c), str) or v is None else json.dumps(v) for r in records] for c in columns}
        )
        if fmt == "parquet":
            pq.write_table(table, path, row_group_size=7)
        else:  # an IPC stream, as datasets saves it, in batches of 7 rows
            with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
                for batch in table.to_batches(max_chunksize=7):
                    writer.write_batch(batch)
        return str(path), len(records)
    if fmt == "tsv":
        # No quoting: a field cannot hold a line break (made a space); a tab in one makes too many fields.
        columns = sorted({k for r in records for k in r})
        cell = lambda v: "" if v is None else str(v).replace("\r", " ").replace("\n", " ")  # noqa: E731
        lines = ["\t".join(columns)] + ["\t".join(cell(r.get(c)) for c in columns) for r in records]
        lines.append("\t".join('"quoted" at the start' if c == "prompt" else "" for c in columns))
        body = newline.join(lines) + newline
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8", "surrogatepass"))
        return str(path), sum(1 for line in lines[1:] if line.encode("utf-8", "surrogatepass").strip())
    lines = []
    if fmt == "jsonl":
        lines = [json.dumps(r) for r in records]
        lines[len(lines) // 2 : len(lines) // 2] = ["{broken json", "[1, 2]", b"\xff\xfe not utf-8".decode("latin-1")]
    elif fmt == "text":
        # One prompt a line: line breaks inside a prompt become spaces; blank lines are skipped.
        lines = [str(r["prompt"]).replace("\r", " ").replace("\n", " ") for r in records]
        lines = [line for line in lines if line.strip()] or ["a fox"]
    else:
        columns = sorted({k for r in records for k in r})
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator=newline)
        writer.writerow(columns)
        writer.writerows([["" if r.get(c) is None else r.get(c) for c in columns] for r in records])
        body = buf.getvalue()
        # An unquoted inch mark, as spreadsheets write it: the csv module reads it as text.
        mark = {"id": f"inch-{next(counter)}", "prompt": 'a 12" pizza on a table'}
        body += ",".join(mark.get(c, "") for c in columns) + newline
        data = body.encode("utf-8", "surrogatepass")
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
        rows = list(csv.reader(io.StringIO(body, newline="")))[1:]
        return str(path), sum(1 for r in rows if any(f.strip() for f in r))
    body = newline.join(lines) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + body.encode("utf-8", "surrogatepass"))
    return str(path), sum(1 for line in lines if line.strip())


def read_everything(path: str, shard_size: int) -> tuple[dict, int]:
    cfg = load_manifest(None, ["output.path=/o", f"input.path={path}", f"input.shard_size={shard_size}"]).input
    items = shard_items(plan_shards(cfg))
    out = read_shards({k: np.array([s[k] for s in items], dtype=object) for k in items[0]}, job_seed=3, cfg=cfg)
    return out, sum(s["num_rows"] for s in items)


def check(out: dict, expected: int) -> None:
    rows = sorted(set(out["row"].tolist()))
    assert rows == list(range(expected)), "every input record exactly once"
    for row in rows:
        mine = [i for i, r in enumerate(out["row"]) if r == row]
        statuses = {out["status"][i] for i in mine}
        assert statuses <= {"ok", "error"}
        if "error" in statuses and len(mine) == 1:
            error = out["error"][mine[0]]
            assert error.startswith(ERROR_STARTS), error
    assert len(set(out["item"].tolist())) == len(out["item"])  # no output twice
    ok = (out["status"] == "ok").sum()
    assert ok + (out["status"] == "error").sum() == len(out["status"])


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "text", "parquet", "arrow"])
def test_generated_hostile_files_never_fail_the_read(folder, fmt):
    seen = {"rows": 0, "files": 0, "errors": 0}
    started = time.perf_counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(files)
    def one_file(example):
        records, newline, bom, shard_size = example
        path, expected = write(folder, fmt, records, newline, bom)
        out, planned = read_everything(path, shard_size)
        assert planned == expected
        check(out, expected)
        seen["rows"] += expected
        seen["files"] += 1
        seen["errors"] += int((out["status"] == "error").sum())

    one_file()
    print(f"{fmt}: {seen['files']} files, {seen['rows']} rows, {seen['errors']} error rows, "
          f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    assert seen["rows"] >= 1000


@pytest.mark.slow
def test_a_generated_mixed_file_runs_end_to_end(ray_local, folder, tiny_manifest):
    records = [
        {"id": "fox", "prompt": "a fox"},
        {"id": "inch", "prompt": 'a 12" pizza on a table'},
        {"id": "img", "prompt": "a fox", "image": "good.png"},
        {"id": "inpaint", "prompt": "a fox", "image": "good.png", "mask_image": "mask.png"},
        {"id": "corrupt", "prompt": "a fox", "image": "corrupt.png"},
        {"id": "escape", "prompt": "a fox", "image": "../escape.png"},
        {"id": "seed", "prompt": "a fox", "seed": 2.0**60},
    ]

    # One generated file, no shrinking: each try is a whole job.
    @settings(
        max_examples=1,
        deadline=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(record, min_size=6, max_size=6))
    def job(generated):
        path, expected = write(folder, "csv", records + generated, "\r\n", True)
        out = folder / f"out-{next(counter)}"
        m = tiny_manifest(f"input.path={path}", "input.shard_size=4", "last_stage=stage1", output=str(out))
        summary = run(m, progress=False)
        rows = pq.read_table(out / "data").to_pylist()
        assert len({r["row"] for r in rows}) == expected and summary.rows == len(rows)
        by_id = {r["id"]: r for r in rows}
        assert {by_id[i]["status"] for i in ("fox", "inch", "img", "inpaint")} == {"ok"}
        assert by_id["inch"]["prompt"] == 'a 12" pizza on a table'
        assert "not a readable image" in by_id["corrupt"]["error"]
        assert "outside the image roots" in by_id["escape"]["error"]
        assert by_id["seed"]["error"].startswith("seed:")

    job()
