"""Published prompt datasets end to end on a local Ray with tiny models: a TSV prompt set, a
LAION-style Parquet through a stop, a resume and a retry, and a label list with a template. What
readers get back is checked through DuckDB over data/*.parquet, datasets.load_dataset(OUT) and
the WebDataset JSON."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.output.commits import list_commits
from jobs.render import run
from tests.helpers import SIGNED, png
from workers.errors import ChangedInputError

PARTI_ROWS = [
    ('"A photo" of a corgi', "Animals", "Basic", ""),
    ('a sign that says "hello, world"', "Writing", "Quantity", "quotes inside"),
    ("un café à Paris, l'été", "Places", "Basic", "non-ASCII"),
    ("'single' quotes and a \\ backslash", "Abstract", "", ""),
    ("a fox in the snow", "Animals", "Basic", "last"),
]


def duckdb_rows(out: str, columns: str) -> list[tuple]:
    import duckdb

    return duckdb.sql(f"SELECT {columns} FROM read_parquet('{out}/data/*.parquet') ORDER BY row").fetchall()


@pytest.mark.slow
def test_a_partiprompts_tsv_renders_every_row_with_its_columns_beside_it(ray_local, tmp_path, tiny_manifest):
    path = tmp_path / "PartiPrompts.tsv"
    lines = ["Prompt\tCategory\tChallenge\tNote"] + ["\t".join(r) for r in PARTI_ROWS]
    path.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r\n").encode())
    out = str(tmp_path / "parti")
    manifest = tiny_manifest(
        f"input.path={path}",
        "input.columns.prompt=Prompt",
        "input.shard_size=2",
        "last_stage=stage1",
        "output.webdataset=true",
        output=out,
    )
    summary = run(manifest, progress=False)
    assert (summary.rows, summary.ok) == (5, 5)
    assert duckdb_rows(out, "prompt, Category, Challenge, Note") == PARTI_ROWS

    import datasets

    loaded = datasets.load_dataset(out, split="train").sort("row")
    assert [tuple(r[c] for c in ("prompt", "Category", "Challenge", "Note")) for r in loaded] == PARTI_ROWS
    samples = {}
    for tar in sorted((tmp_path / "parti" / "webdataset").glob("*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(".json"):
                    sample = json.loads(t.extractfile(member).read())
                    samples[sample["row"]] = (sample["prompt"], sample["Category"], sample["Challenge"], sample["Note"])
    assert [samples[i] for i in sorted(samples)] == PARTI_ROWS
    record = json.loads((tmp_path / "parti" / "job.json").read_text())
    assert record["kept_columns"]["fields"] == [["Category", "string"], ["Challenge", "string"], ["Note", "string"]]


def laion(n: int) -> pa.Table:
    return pa.table(
        {
            "TEXT": [f"a photo of object {i}" for i in range(n)],
            "key": [f"{i:09d}" for i in range(n)],
            "similarity": [0.3 + i / 100 for i in range(n)],
            "tags": [[f"t{i}", "x"] if i % 3 else [] for i in range(n)],
            "meta": [{"width": 640 + i, "url": f"https://example.com/{i}.jpg"} for i in range(n)],
            # A seed no row can render with: those rows fail, and stay failed (and whole) through a retry.
            "seed": [-1 if i % 4 == 2 else None for i in range(n)],
            # An init image not there yet: those rows fail, and a retry renders them with their columns.
            "image": [f"late{i}.png" if i % 4 == 0 else None for i in range(n)],
        }
    )


@pytest.mark.slow
def test_a_laion_parquet_keeps_its_types_through_a_stop_a_resume_and_a_retry(ray_local, tmp_path, tiny_manifest):
    table = laion(8)
    path = tmp_path / "laion.parquet"
    pq.write_table(table, path, row_group_size=3)
    out = str(tmp_path / "laion")
    sets = [f"input.path={path}", "input.columns={prompt: TEXT, id: key}", "input.shard_size=2", "last_stage=stage1"]
    sets += SIGNED  # every image signed, through the stop, the resume and the retry
    # The first chunk only: what a killed or stopped run leaves.
    first = run(tiny_manifest(*sets, "ray.chunk_shards=1", output=out), progress=False, stop_after_s=0)
    assert first.stopped and len(list_commits(out)) == 1
    run(tiny_manifest(*sets, output=out), progress=False)
    assert len(list_commits(out)) == 4
    for i in (0, 4):
        (tmp_path / f"late{i}.png").write_bytes(png((9 * i, 90, 20)))
    run(tiny_manifest(*sets, output=out), retry_errors=True, progress=False)
    # Rows 0 and 4 (their images now there) render as their shards' next attempt; rows 2 and 6
    # (bad seeds) would fail again, so their shards stay as they were.
    assert {s: c.attempt for s, c in list_commits(out).items()} == {0: 1, 1: 0, 2: 1, 3: 0}

    schemas = {pq.read_schema(f).remove_metadata() for f in (tmp_path / "laion" / "data").glob("*.parquet")}
    assert len(schemas) == 1  # one schema across first runs, resumes and retries
    schema = schemas.pop()
    for name in ("similarity", "tags", "meta"):
        assert schema.field(name).type == table.schema.field(name).type
    found = duckdb_rows(out, "id, status, similarity, tags, meta")
    expected = table.to_pylist()
    assert [r[0] for r in found] == table.column("key").to_pylist()  # ids are the keys
    assert [r[1] for r in found] == ["error" if r["seed"] == -1 else "ok" for r in expected]
    assert [(r[2], r[3], r[4]) for r in found] == [(e["similarity"], e["tags"], e["meta"]) for e in expected]
    signed = duckdb_rows(out, "image_key, c2pa")
    from tests.workers.test_provenance import read_credentials

    for key, label in (r for r in signed if r[0]):
        credentials = read_credentials((tmp_path / "laion" / key).read_bytes())
        assert credentials["validation_state"] == "Valid" and credentials["active_manifest"] == label, key
    assert sum(1 for r in signed if r[0]) == 6  # the first chunk's, the resume's and the retry's images

    # The input loses a column: the output's shards keep theirs, so the resume is refused.
    pq.write_table(table.drop_columns(["similarity"]), path)
    with pytest.raises(ChangedInputError, match=r"keep the input columns \['similarity: double'"):
        run(tiny_manifest(*sets, output=out), progress=False)


@pytest.mark.slow
def test_a_label_list_with_a_template_renders_n_images_per_label(ray_local, tmp_path, tiny_manifest):
    path = tmp_path / "labels.csv"
    path.write_text("label,style,class_id\ntabby cat,oil,0\ncorgi,,1\nred fox,ink,2\n")
    out = str(tmp_path / "labels")
    manifest = tiny_manifest(
        f"input.path={path}",
        "input.prompt_template='a {style} painting of a {label}'",
        "num_images=2",
        "last_stage=stage1",
        "output.embed_images=true",
        output=out,
    )
    summary = run(manifest, progress=False)
    assert (summary.ok, summary.error) == (4, 1)
    found = duckdb_rows(out, "id, prompt, status, error, label, class_id")
    ok = [r for r in found if r[2] == "ok"]
    assert [(r[1], r[4], r[5]) for r in ok] == [
        ("a oil painting of a tabby cat", "tabby cat", "0"),
        ("a oil painting of a tabby cat", "tabby cat", "0"),
        ("a ink painting of a red fox", "red fox", "2"),
        ("a ink painting of a red fox", "red fox", "2"),
    ]
    failed = [r for r in found if r[2] == "error"]
    assert len(failed) == 1 and failed[0][3].startswith("style: the template") and failed[0][4] == "corgi"

    import datasets  # the embedded Parquet: the image decodes, and the label stands beside it

    loaded = datasets.load_dataset(out, split="train").sort("row")
    assert loaded.features["label"] == datasets.Value("string") and isinstance(loaded.features["image"], datasets.Image)
    assert [(r["label"], r["image"] is not None) for r in loaded] == [
        ("tabby cat", True),
        ("tabby cat", True),
        ("corgi", False),
        ("red fox", True),
        ("red fox", True),
    ]
    assert loaded[0]["image"].size == (loaded[0]["width"], loaded[0]["height"])
