"""What readers load before and after publishing: an output claimed by its job but with no
shard committed yet (a run killed early) already reads as zero rows with the output's columns."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.input.shards import plan_input
from jobs.manifest import load_manifest
from jobs.output.job_record import check_job
from jobs.output.layout import SCHEMA, Derived
from jobs.output.publish import write_schema
from tests.helpers import readme_recipes
from workers.columns import METADATA_SCHEMA


@pytest.mark.parametrize("embed", [False, True])
def test_every_readme_recipe_reads_an_output_with_no_shard_yet(ray_local, tmp_path, embed):
    data = tmp_path / "in.parquet"
    pq.write_table(pa.table({"TEXT": ["a fox"], "label": ["fox"], "score": [0.5]}), data)
    out = tmp_path / "out"
    manifest = load_manifest(
        None, [f"input.path={data}", "input.columns.prompt=TEXT", f"output.path={out}", f"output.embed_images={embed}"]
    )
    plan = plan_input(manifest.input)
    # What run() does before any model work: claim the output (job.json, the schema), nothing committed.
    check_job(str(out), manifest, False, plan.columns.kept)
    write_schema(str(out), plan.columns.kept, Derived.of(manifest))
    schema = pq.read_schema(out / SCHEMA)
    assert schema.names == METADATA_SCHEMA.names + ["label", "score"] + (["image"] if embed else [])
    recipes = readme_recipes()
    for name in ("duckdb", "pyarrow", "ray"):
        scope = {"OUT": str(out), "HF_HOME": str(tmp_path / "hf")}
        exec(recipes[name], scope)  # noqa: S102 - the README's own code, run as a user would
        assert list(scope["ids"]) == [], name
    # `datasets` refuses a split with no rows at all, whatever the files: the README says so.
    with pytest.raises(ValueError, match="corresponds to no data"):
        exec(recipes["datasets"], {"OUT": str(out), "HF_HOME": str(tmp_path / "hf")})  # noqa: S102
