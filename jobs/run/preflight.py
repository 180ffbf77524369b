"""Everything that fails before any model work: a manifest in, a manifest whose models are on
disk (or on their mirror), whose output can be written and whose pools fit the cluster, out.

The order matters: nothing is written or deleted before the manifest, the input and the output
location have been checked.
"""

from __future__ import annotations

from pathlib import Path

from jobs.manifest import Manifest
from jobs.output import layout
from jobs.output.formats import check_packages
from jobs.output.job_record import is_job_record
from jobs.output.probe import check_output_writable
from jobs.plan.packing import packs
from jobs.run.pools import cluster_address, job_pools, local_cpus, local_size
from workers.errors import ModelLoadError, StorageError
from workers.models import AESTHETIC_FILE, PIPELINE, TRANSFORMERS, cache_root, check_model_available
from workers.stages import SCORE
from workers.storage import join, list_prefix, read_bytes


def tiny_models_dir() -> Path:
    return cache_root() / "tiny-models"


# The score stage's two checkpoints: (field, the file that shows it is there).
SCORE_CHECKPOINTS = (("model", TRANSFORMERS), ("aesthetic_model", AESTHETIC_FILE))


def model_fields(manifest: Manifest) -> list[tuple[str, str, str]]:
    """(stage, field, marker) of every checkpoint the job's stages load: each stage's `model`, and
    the score stage's aesthetic head. The marker is the file that shows the checkpoint is there."""
    out = []
    for stage in manifest.stages():
        fields = SCORE_CHECKPOINTS if stage == SCORE else (("model", PIPELINE),)
        out += [(stage, field, marker) for field, marker in fields]
    return out


def tiny_name(stage: str, field: str, model: str) -> str | None:
    """The preset name of a `tiny:NAME` reference (None for any other), checked."""
    from jobs.plan.models import ALL_REPOS

    if not model.startswith("tiny:"):
        return None
    name = model[len("tiny:") :]
    if name not in ALL_REPOS:
        raise ValueError(f"{stage}.{field}: unknown tiny model '{name}'; expected one of {sorted(ALL_REPOS)}")
    return name


def resolve_tiny(manifest: Manifest) -> Manifest:
    """Turn `tiny:NAME` references into built local directories."""
    from jobs.plan.models import ALL_REPOS, build_models

    updates: dict[str, dict] = {}
    for stage, field, _ in model_fields(manifest):
        name = tiny_name(stage, field, getattr(getattr(manifest, stage), field))
        if name:
            build_models(tiny_models_dir(), preset=ALL_REPOS[name])
            updates.setdefault(stage, {})[field] = str(tiny_models_dir() / name)
    return manifest.model_copy(update={s: getattr(manifest, s).model_copy(update=u) for s, u in updates.items()})


def resolve_score(manifest: Manifest) -> Manifest:
    """score.enabled `auto` becomes true where both of its checkpoints are on this machine, at
    their mirror, or tiny names (built by the run), else false; `true` stays, and the model check
    then names what is missing."""
    cfg = manifest.score
    if cfg.enabled != "auto":
        return manifest
    try:
        for field, marker in SCORE_CHECKPOINTS:
            source = getattr(cfg, field)
            if not tiny_name(SCORE, field, source):
                check_model_available(f"{SCORE}.{field}", source, marker)
        found = True
    except (ModelLoadError, StorageError):
        found = False
    return manifest.model_copy(update={"score": cfg.model_copy(update={"enabled": found})})


def resolve_safety(manifest: Manifest) -> Manifest:
    """safety.model defaults to stage1's checkpoint (IF-I carries the checker and watermarker);
    where the driver can see that checkpoint, `auto` becomes on or off here, and a required
    component that is missing fails the job before any model work."""
    cfg = manifest.safety
    model = cfg.model or manifest.stage1.model
    if model.startswith("tiny:"):
        model = str(tiny_models_dir() / model[len("tiny:") :])
    updates: dict = {"model": model}
    path = Path(model).expanduser()
    if path.is_dir():
        for field, folder in (("checker", "safety_checker"), ("watermark", "watermarker")):
            have = (path / folder / "config.json").is_file()
            value = getattr(cfg, field)
            if value is True and not have:
                raise ModelLoadError(
                    f"safety.{field}: true, but {model} has no {folder}/. Fix: point safety.model at the IF-I "
                    f"checkpoint, stage it with its {folder}/ (ifrender stage-models), or set safety.{field}: false."
                )
            if value == "auto":
                updates[field] = have
    return manifest.model_copy(update={"safety": cfg.model_copy(update=updates)})


def resolve_models(manifest: Manifest) -> Manifest:
    """Build tiny models where named; check every model is on disk or on its S3 mirror."""
    manifest = resolve_safety(resolve_tiny(resolve_score(manifest)))
    check_models(manifest)
    return manifest


def check_models(manifest: Manifest) -> None:
    for stage, field, marker in model_fields(manifest):
        model = getattr(getattr(manifest, stage), field)
        # On a cluster the workers, not the driver, hold weights; a mirror is checked from anywhere.
        if not tiny_name(stage, field, model) and (not cluster_address(manifest) or model.startswith("s3://")):
            check_model_available(stage if field == "model" else f"{stage}.{field}", model, marker)


def ready_to_render(manifest: Manifest) -> Manifest:
    """What rendering needs beyond the output: every model on disk or at its mirror (tiny ones
    built), and the pools within what the local Ray has. Returns the manifest with its models resolved."""
    manifest = resolve_models(manifest)
    check_resources(manifest, local_resources(manifest))
    return manifest


def check_output(manifest: Manifest, overwrite: bool) -> list[str]:
    """The output can be claimed, checked before anything is written or deleted there: the
    formats it asks for have their packages, it can be written, none of ifrender's folders in it
    is a link, and it is new, empty or an ifrender output (its job.json says so). Returns the keys
    --overwrite deletes (none without it): an ifrender output's own files, never anything else
    there. Deletes nothing."""
    check_packages(manifest.output)
    if manifest.output.c2pa is not None:  # a certificate or key that cannot sign: named now, not per image
        from workers.provenance import Credentials

        Credentials(manifest.output.c2pa).check()
    out = manifest.output.path
    check_output_writable(out)
    found = list_prefix(out)  # a link is listed as itself, never followed
    linked = [k for k in found if k + "/" in layout.FOLDERS]
    if linked:
        raise StorageError(
            f"output.path {out}: {', '.join(k + '/' for k in linked)} is a link, not a folder; expected "
            f"ifrender's folders in its output to be its own, since it writes and deletes there. Nothing was "
            f"written or deleted. Fix: replace the link with a folder, or point output.path at a folder that "
            f"holds no link."
        )
    if not found:
        return []
    if not is_job_record(read_bytes(join(out, layout.JOB))):
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        what = (
            "--overwrite deletes an ifrender output only"
            if overwrite
            else "a run writes only into a new or empty folder or an ifrender output"
        )
        raise StorageError(
            f"output.path {out}: {what}, and this holds no job.json written by ifrender (found {shown}). "
            f"Nothing was written or deleted. Fix: point output.path at a new or empty location, or at an "
            f"ifrender output."
        )
    if not overwrite:
        return []
    ours = [k for k in found if k in layout.FILES or k.startswith(layout.FOLDERS)]
    # job.json goes last: an overwrite cut short still finds the output is ifrender's.
    return sorted(ours, key=lambda k: k == layout.JOB)


def local_resources(manifest: Manifest) -> dict[str, float]:
    """What the local Ray has, or will have once jobs.run.cluster.init_ray starts it: checked
    before anything is deleted, and before Ray starts."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    num_cpus, num_gpus = local_size(manifest)
    return {"CPU": num_cpus, "GPU": num_gpus}


def check_resources(manifest: Manifest, have: dict[str, float]) -> None:
    """Pools asking for more than this local Ray has would wait forever: fail now instead. (An
    autoscaling cluster adds nodes on demand, so a cluster is not checked.)"""
    if cluster_address(manifest):
        return
    gpus = have.get("GPU", 0)
    for stage, cfg in job_pools(manifest).items():
        if cfg.num_gpus > 0 and cfg.num_gpus > gpus:
            raise RuntimeError(
                f"{stage}: asks for {cfg.num_gpus:g} GPU(s) per actor but this local Ray has {gpus:g}. "
                f"Fix: --set {stage}.num_gpus=0 for a CPU run, or set ray.address to a GPU cluster."
            )
    for stage, cfg in job_pools(manifest).items():
        missing = {k: v for k, v in cfg.resources.items() if have.get(k, 0) < v}
        if missing:
            raise RuntimeError(
                f"{stage}.resources: asks for {missing} per actor but this local Ray has "
                f"{ {k: have.get(k, 0) for k in missing} }. Fix: remove {stage}.resources for a local run "
                f"(they steer pools to worker groups on a cluster), or set ray.address to that cluster."
            )
    wanted = sum(cfg.pool_size * cfg.num_gpus for cfg in job_pools(manifest).values())
    if wanted > gpus:
        raise RuntimeError(
            f"the stage pools ask for {wanted:g} GPUs in all but this local Ray has {gpus:g}. "
            f"Fix: lower pool_size or num_gpus per stage."
        )
    shares = [cfg.num_gpus for cfg in job_pools(manifest).values() if cfg.num_gpus > 0 for _ in range(cfg.pool_size)]
    if not packs(shares, int(gpus)):
        asked = ", ".join(
            f"{s} {c.pool_size} x {c.num_gpus:g}" for s, c in job_pools(manifest).items() if c.num_gpus > 0
        )
        raise RuntimeError(
            f"the stage pools' GPU shares ({asked}) add up to {wanted:g} but do not pack onto this local "
            f"Ray's {gpus:g} GPUs: an actor's share cannot span two GPUs. Fix: shares that fill whole GPUs "
            f"together (`ifrender plan MANIFEST --gpus {gpus:g}` finds some), or fewer actors."
        )


def checklist(manifest: Manifest, plan, overwrite: bool = False, allow_changed: bool = False) -> list[tuple[str, str]]:
    """`ifrender validate`: what `run` checks before it renders, past the input's plan, without
    starting Ray or loading a model (`run` builds tiny models, so a known tiny name passes).
    Returns (check, "ok: what was found" or "FAILED: the problem") per check; each runs whatever
    the others found. `run` would start rendering when none failed."""
    results: list[tuple[str, str]] = []

    def check(name: str, fn) -> None:
        try:
            results.append((name, "ok: " + fn()))
        except Exception as err:  # noqa: BLE001 - each check reports its own problem and the rest still run
            results.append((name, f"FAILED: {err}"))

    def first_rows() -> str:
        from jobs.input.rows import shard_rows
        from workers.sizes import JobSize

        size = JobSize(manifest.width, manifest.height, manifest.last_stage)
        shard = plan.shards[0]
        rows = shard_rows(shard, manifest.seed, manifest.input, manifest.num_images, size, plan.columns)
        bad = [r for r in rows if r["status"] != "ok"]
        if bad:
            shown = "; ".join(f"{shard.uri} row {r['source_row']}: {r['error']}" for r in bad[:3])
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(
                f"{len(bad)} of the first shard's {len(rows)} rows would be error rows: {shown}{more}. A run renders "
                f"the rest and records these as errors; fix them in the input to render them"
            )
        return f"the first shard's {len(rows)} rows parse"

    def models() -> str:
        resolve_safety(manifest)
        resolved = resolve_score(manifest)
        check_models(resolved)
        found = ", ".join(f"{s} {getattr(resolved, s).model}" for s in resolved.stages())
        if manifest.score.enabled == "auto" and not resolved.score.enabled:
            found += f"; no score stage (score.enabled auto: {manifest.score.model} or its aesthetic head not here)"
        return found

    def output() -> str:
        doomed = check_output(manifest, overwrite)
        existing = read_bytes(join(manifest.output.path, layout.JOB))
        if existing is None:
            return f"{manifest.output.path} is new or empty"
        if overwrite:
            return f"{manifest.output.path}: --overwrite deletes {len(doomed)} file(s) ifrender wrote there"
        from jobs.output.job_record import compare_job

        changed = compare_job(manifest.output.path, existing, manifest, allow_changed, plan.columns.kept)
        return f"{manifest.output.path}: resumes its job" + (
            f" with {len(changed)} changed setting(s)" if changed else ""
        )

    def pools() -> str:
        if cluster_address(manifest):
            return f"ray.address {cluster_address(manifest)}: an autoscaling cluster is not checked"
        gpus_needed = any(cfg.num_gpus > 0 for cfg in job_pools(manifest).values())
        cpus, gpus = local_size(manifest) if gpus_needed else (local_cpus(manifest), 0)
        check_resources(manifest, {"CPU": cpus, "GPU": gpus})
        return ", ".join(
            f"{s} {c.pool_size} x ({c.num_cpus:g} CPU, {c.num_gpus:g} GPU)" for s, c in job_pools(manifest).items()
        )

    check("rows", first_rows)
    check("models", models)
    check("output", output)
    check("pools", pools)
    return results
