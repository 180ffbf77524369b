"""Manifests: every shipped one loads; typos, bad values and bad overrides are named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from jobs.manifest import MANIFESTS_DIR, ManifestError, load_manifest
from tests.helpers import PER_STAGE_POOLS


@pytest.mark.parametrize("path", sorted(MANIFESTS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_loads(path):
    manifest = load_manifest(path)
    assert manifest.stages()[0] == "encode"
    assert manifest.input.path


def test_typo_key_is_rejected_with_its_path(tmp_path):
    text = (
        (MANIFESTS_DIR / "local-tiny.yaml")
        .read_text()
        .replace("  num_inference_steps: 10", "  num_inference_step: 10", 1)
    )
    bad = tmp_path / "typo.yaml"
    bad.write_text(text)
    with pytest.raises(ManifestError) as err:
        load_manifest(bad)
    message = str(err.value)
    assert str(bad) in message
    assert "stage1.num_inference_step: unknown field" in message


def test_bad_value_names_file_field_and_value(tmp_path):
    with pytest.raises(ManifestError) as err:
        load_manifest(None, ["stage2.batch_size=0"])
    assert "local-tiny.yaml" in str(err.value)
    assert "stage2.batch_size" in str(err.value) and "found 0" in str(err.value)


def test_set_overrides_typed_values():
    manifest = load_manifest(
        None,
        [*PER_STAGE_POOLS, "stage1.batch_size=8", "stage1.timesteps=smart27", "last_stage=stage2", "ray.address=auto"],
    )
    assert manifest.stage1.batch_size == 8
    assert manifest.stage1.timesteps == "smart27"
    assert manifest.stages() == ("encode", "stage1", "stage2", "score")  # local-tiny scores its last images
    assert manifest.ray.address == "auto"
    assert load_manifest(None, ["last_stage=stage1", "score.enabled=false"]).stages() == (
        "encode",
        "stage1",
    )
    # auto is the preflight's to decide (it sees the weights); until then no score stage is planned
    assert load_manifest(None, ["score.enabled=auto"]).stages() == (
        "encode",
        "stage1",
        "stage2",
        "upscale",
    )


@pytest.mark.parametrize("assignment", ["stage1.batch_size", "=3", "seed.x=1"])
def test_malformed_overrides_are_explained(assignment):
    with pytest.raises(ManifestError, match="--set"):
        load_manifest(None, [assignment])


def test_unknown_timestep_preset_is_rejected():
    with pytest.raises(ManifestError, match="stage1.timesteps"):
        load_manifest(None, ["stage1.timesteps=smart999"])


def test_missing_manifest_file():
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(Path("/nonexistent/job.yaml"))


def test_relative_input_path_is_relative_to_the_manifest():
    manifest = load_manifest(None)
    assert Path(manifest.input.path).is_file()


def test_every_field_is_described():
    from pydantic import BaseModel

    from jobs.manifest import Manifest

    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from walk(field.annotation, f"{prefix}{name}.")
            yield name

    assert len(list(walk(Manifest, ""))) > 50


def test_paths_template_the_run_date_and_run_id(tmp_path):
    m = load_manifest(None, ["output.path=s3://renders/nightly/{run_date}/{run_id}"], "2026-11-22", "night-7")
    assert m.output.path == "s3://renders/nightly/2026-11-22/night-7"
    # Without --run-id, {run_id} is an error that says how to give it; {run_date} defaults to today.
    with pytest.raises(ManifestError, match=r"output.path .* placeholder \{run_id\} .* --run-id"):
        load_manifest(None, ["output.path=/out/{run_id}"])
    with pytest.raises(ManifestError, match=r"placeholder \{date\}.*use \{run_date\} or \{run_id\}"):
        load_manifest(None, ["output.path=/out/{date}"], "2026-11-22")
    with pytest.raises(ManifestError, match=r"--run-date '22/11/2026': expected a date as YYYY-MM-DD"):
        load_manifest(None, ["output.path=/out/{run_date}"], "22/11/2026")


def test_pool_resources_are_runtime_settings_not_part_of_the_images(tmp_path):
    from jobs.output.job_record import fingerprint

    plain = load_manifest(None, ["output.path=/o"])
    steered = load_manifest(None, [*PER_STAGE_POOLS, "output.path=/o", "stage1.resources={ifrender_heavy: 1}"])
    assert steered.stage1.resources == {"ifrender_heavy": 1.0}
    assert fingerprint(plain) == fingerprint(steered)  # moving a pool to other nodes resumes the job


def test_a_relative_output_is_made_absolute_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_manifest(None, ["output.path=out/x"]).output.path == str(tmp_path / "out" / "x")
    assert load_manifest(None, ["output.path=s3://b/p"]).output.path == "s3://b/p"


def test_a_gpu_share_above_one_must_be_whole():
    assert load_manifest(None, [*PER_STAGE_POOLS, "stage1.num_gpus=2"]).stage1.num_gpus == 2
    with pytest.raises(ManifestError) as err:
        load_manifest(None, [*PER_STAGE_POOLS, "stage1.num_gpus=1.5"])
    assert "stage1.num_gpus" in str(err.value) and "whole number of GPUs, found 1.5" in str(err.value)


def test_a_job_size_must_fit_the_cascade_and_each_stage_limit():
    m = load_manifest(None, ["width=1536", "height=1024"])
    assert (m.width, m.height) == (1536, 1024)
    with pytest.raises(ManifestError, match="1000x600 at upscale is 62.5x37.5 at stage I.*896x512 or 1024x640"):
        load_manifest(None, ["width=1000", "height=600"])
    with pytest.raises(ManifestError, match="width and height: expected both or neither"):
        load_manifest(None, ["width=1024"])
    with pytest.raises(ManifestError, match="makes upscale render 33554432 pixels, over upscale.max_pixels=16777216"):
        load_manifest(None, ["width=8192", "height=4096", "stage1.max_pixels=200000", "stage2.max_pixels=3000000"])
    with pytest.raises(
        ManifestError, match=r"makes stage1 render 131072 pixels, over stage1.max_pixels=65536\. Fix"
    ) as err:
        load_manifest(None, ["width=8192", "height=4096"])
    assert "found {" not in str(err.value)  # a whole-manifest check does not print the whole manifest


def test_a_job_record_from_before_encode_lost_its_unused_settings_still_loads(tmp_path):
    from jobs.output.job_record import recorded_manifest

    manifest = load_manifest(None, [f"output.path={tmp_path}"]).model_dump(mode="json")
    manifest["encode"] |= {"offload": "none", "attention": "sdpa", "compile": False}  # as older outputs hold
    loaded = recorded_manifest({"manifest": manifest})
    assert loaded.encode.model == manifest["encode"]["model"] and not hasattr(loaded.encode, "offload")


def test_a_job_record_of_grouped_stages_reads_back_as_the_manifest_it_was(tmp_path):
    from jobs.output.job_record import recorded_manifest

    # The record holds every field: a grouped stage's pool defaults too, which it may not set.
    for sets in ([], ["groups=[{stages: [encode, stage1], batch_size: 3}]"]):
        manifest = load_manifest(None, [f"output.path={tmp_path}", *sets])
        assert manifest.groups
        assert recorded_manifest({"manifest": manifest.model_dump(mode="json")}) == manifest


def test_a_job_record_from_before_the_score_stage_is_still_ifrenders_and_resumes(tmp_path):
    from jobs.output.job_record import FORMAT, VERSION, fingerprint, is_job_record, recorded_manifest

    manifest = load_manifest(None, [*PER_STAGE_POOLS, f"output.path={tmp_path}", "score.enabled=auto"])
    old = {"manifest": manifest.model_dump(mode="json"), "fingerprint": fingerprint(manifest)}
    for part in old.values():
        del part["score"]
    assert is_job_record(json.dumps(old | {"format": FORMAT, "version": VERSION}).encode())
    from workers.config import ScoreConfig

    assert recorded_manifest(old).score == ScoreConfig()  # read back at today's default


@pytest.mark.parametrize(
    "sets, pool",
    [
        ([], "encode+stage1+stage2+upscale+score"),
        (["last_stage=stage1"], "encode+stage1+score"),
        (["score.enabled=false"], "encode+stage1+stage2+upscale"),
        (["last_stage=stage2", "score.enabled=false"], "encode+stage1+stage2"),
        (["score.enabled=auto"], "encode+stage1+stage2+upscale"),  # until the preflight finds the weights
    ],
)
def test_a_group_of_all_stages_is_one_replica_of_whatever_the_job_runs(sets, pool):
    manifest = load_manifest(None, sets)  # local-tiny: groups [{stages: all}]
    assert manifest.layout == "replicas" and list(manifest.model_pools()) == [pool]
    assert manifest.stage_config("stage1").batch_size == manifest.groups[0].batch_size
    if "score.enabled=auto" in sets:  # the preflight turns it on: the score stage joins the replica
        on = manifest.model_copy(update={"score": manifest.score.model_copy(update={"enabled": True})})
        assert list(on.model_pools()) == ["encode+stage1+stage2+upscale+score"]


def test_a_group_of_all_stages_stands_alone_and_takes_every_stages_pool_settings():
    with pytest.raises(ManifestError, match=r"groups\[0\].stages: all .* beside 1 other group"):
        load_manifest(None, ["groups=[{stages: all}, {stages: [stage2, upscale]}]"])
    # score may join at the preflight (auto): its own pool settings would be ignored, so refused now
    with pytest.raises(ManifestError, match=r"score.batch_size: score runs in groups\[0\]"):
        load_manifest(None, ["score.enabled=auto", "score.batch_size=2"])
    assert load_manifest(None, ["score.enabled=false", "score.batch_size=2"]).layout == "replicas"


def test_layouts_are_named_and_their_pools_listed_in_cascade_order():
    from jobs.plan.layouts import with_groups

    assert load_manifest().layout == "replicas"  # the local default: one copy of the whole cascade
    manifest = load_manifest(None, list(PER_STAGE_POOLS))
    assert manifest.layout == "pipeline" and list(manifest.model_pools()) == list(manifest.stages())
    replicas = with_groups(manifest, [{"stages": list(manifest.stages()), "pool_size": 3}])
    assert replicas.layout == "replicas"
    assert {n: (s, p.pool_size) for n, (s, p) in replicas.model_pools().items()} == {
        "encode+stage1+stage2+upscale+score": (manifest.stages(), 3)
    }
    # a grouped stage's worker takes the group's pool settings and keeps its own micro_batch
    assert replicas.stage_config("stage2").pool_size == 3
    assert replicas.stage_config("stage2").micro_batch == manifest.stage2.micro_batch
    fused = with_groups(manifest, [{"stages": ["stage2", "upscale"], "num_gpus": 0}])
    assert fused.layout == "fused" and list(fused.model_pools()) == ["encode", "stage1", "stage2+upscale", "score"]
    # the score stage fuses with the last image stage like any neighbour, whichever that is
    scored = with_groups(load_manifest(None, ["groups=[]", "last_stage=stage2"]), [{"stages": ["stage2", "score"]}])
    assert list(scored.model_pools()) == ["encode", "stage1", "stage2+score"]


@pytest.mark.parametrize(
    "groups, expected",
    [
        ("[{stages: [encode, stage2]}]", "not consecutive stages"),
        ("[{stages: [encode, stage1]}, {stages: [stage1, stage2]}]", "stage1 is in groups[0] too"),
        ("[{stages: [stage2, upscale]}]", "not run by this job (last_stage=stage2)"),
        ("[{stages: [stage1]}]", "at least 2 items"),
        ("[{stages: [stage1, stage9]}]", "groups.0.stages.1"),
        ("[{stages: [stage2, score]}]", "not consecutive stages"),  # upscale sits between them
    ],
)
def test_a_bad_group_is_refused_naming_it(tmp_path, groups, expected):
    extra = ["last_stage=stage2"] if "last_stage" in expected else []
    with pytest.raises(ManifestError, match=re.escape(expected)):
        load_manifest(None, [f"groups={groups}", *extra])


def test_a_grouped_stages_own_pool_settings_are_refused_not_ignored():
    with pytest.raises(ManifestError, match=r"encode.num_cpus: encode runs in groups\[0\] \(encode\+stage1\)"):
        load_manifest(None, [*PER_STAGE_POOLS, "groups=[{stages: [encode, stage1]}]"])
    # The local default runs one replica: a stage's own pool setting there is refused the same way.
    with pytest.raises(
        ManifestError, match=r"stage1.batch_size: stage1 runs in groups\[0\] .*Fix: set them on groups\[0\]"
    ):
        load_manifest(None, ["stage1.batch_size=8"])


def _laughs(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs": each level an anchor holding `width` aliases of the one before."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nname: *l{levels - 1}\n"


def test_a_manifest_of_aliases_cannot_exhaust_memory_or_the_terminal(tmp_path):
    """9^9 (387 million) values in under 500 bytes: refused at load, in a bounded message, in seconds."""
    import resource
    import subprocess
    import sys
    import time

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_laughs())
    assert len(bomb.read_bytes()) < 500
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "validate", str(bomb)], capture_output=True, text=True, timeout=120
    )
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    printed = len(child.stdout) + len(child.stderr)
    print(f"alias bomb: exit {child.returncode}, {seconds:.1f} s, {printed} bytes printed, child peak {peak_mb:.0f} MB")
    assert child.returncode == 1
    assert "bomb.yaml: not valid YAML" in child.stderr and "aliases" in child.stderr
    assert printed < 4000 and seconds < 60 and peak_mb < 1500
    # The same through --set.
    with pytest.raises(ManifestError, match=r"--set .*not valid YAML.*aliases") as err:
        load_manifest(None, ["name={" + _laughs().replace("\n", ", ").rstrip(", ") + "}"])
    assert len(str(err.value)) < 2000


def test_an_error_quotes_a_bounded_prefix_of_a_big_value(tmp_path):
    """Below the alias bound a value can still be big: the message quotes a prefix of it."""
    big = tmp_path / "big.yaml"
    big.write_text(_laughs(levels=4, width=20))  # 160,000 strings: over the bound
    with pytest.raises(ManifestError, match="aliases"):
        load_manifest(big)
    wide = tmp_path / "wide.yaml"
    wide.write_text("name: [" + ", ".join(f"word{i}" for i in range(50_000)) + "]\n")
    with pytest.raises(ManifestError, match=r"name: .*found \['word0'") as err:
        load_manifest(wide)
    assert len(str(err.value)) < 2000


@pytest.mark.parametrize(
    ("source", "output"),
    [
        ("{tmp}/prompts", "{tmp}/prompts/out"),  # the output inside the input's folder
        ("{tmp}/out/prompts.jsonl", "{tmp}/out"),  # the input inside the output
        ("{tmp}/same", "{tmp}/same"),
        ("s3://bucket/in", "s3://bucket/in/out"),
        ("s3://bucket/out/p.jsonl", "s3://bucket/out/"),
    ],
)
def test_an_output_inside_the_input_or_the_reverse_is_refused_at_load_naming_both(tmp_path, source, output):
    source, output = source.format(tmp=tmp_path), output.format(tmp=tmp_path)
    with pytest.raises(ManifestError, match=r"input.path .* and output.path .*one inside the other") as err:
        load_manifest(None, [f"input.path={source}", f"output.path={output}"])
    assert source in str(err.value) and output.rstrip("/") in str(err.value)


def test_inputs_and_outputs_side_by_side_are_fine(tmp_path):
    for source, output in [
        (f"{tmp_path}/prompts.jsonl", f"{tmp_path}/out"),
        (f"{tmp_path}/in", f"{tmp_path}/input-rendered"),  # a shared name prefix is not a folder
        ("s3://bucket/in", "s3://bucket/in-out"),
        ("s3://a/x", "s3://b/x"),
    ]:
        load_manifest(None, [f"input.path={source}", f"output.path={output}"])


def test_the_readmes_input_shapes_are_valid_manifest_lines():
    """The README's three real dataset shapes parse as the manifest's input section."""
    import yaml

    from jobs.manifest import InputConfig

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## The first hour") : readme.index("## Commands")]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)[1]
    shapes = [yaml.safe_load(line)["input"] for line in block.splitlines() if line.startswith("input:")]
    assert len(shapes) == 3
    parsed = [InputConfig(**shape) for shape in shapes]
    assert parsed[0].columns == {"prompt": "Prompt"} and parsed[1].columns == {"prompt": "TEXT", "id": "key"}
    assert parsed[2].prompt_template == "a {style} photo of a {label}"


def test_a_relative_path_is_relative_to_where_it_was_given(tmp_path, monkeypatch):
    """In the file: to the file (the manifest and its prompts travel together). With --set: to the
    working directory, where the command was typed."""
    from jobs.manifest import DEFAULT_MANIFEST, load_manifest

    monkeypatch.chdir(tmp_path)
    assert load_manifest(DEFAULT_MANIFEST).input.path == str(DEFAULT_MANIFEST.parent / "prompts" / "local-tiny.txt")
    given = load_manifest(DEFAULT_MANIFEST, ["input.path=mine/p.txt", "input.image_roots=[pics]"])
    assert given.input.path == str(tmp_path / "mine" / "p.txt")
    assert given.input.image_roots == [str(tmp_path / "pics")]
    assert load_manifest(DEFAULT_MANIFEST, ["output.path=out/x"]).output.path == str(tmp_path / "out" / "x")
