"""The job manifest: YAML file (plus --set overrides) in, validated `Manifest` out.

A manifest is the job's own sections (input, output, ray) and the stage configs that live beside
their workers (workers/config.py)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from jobs.manifest_help import nearest
from jobs.manifest_io import InputConfig, OutputConfig, template_fields  # noqa: F401 - the sections' home
from jobs.manifest_yaml import apply_override, cut, fill_paths, quote, safe_load, template_values
from workers.config import (
    POOL_FIELDS,
    EncodeConfig,
    PoolConfig,
    SafetyConfig,
    ScoreConfig,
    Stage1Config,
    Stage2Config,
    Strict,
    UpscaleConfig,
    WriteConfig,
)
from workers.errors import ManifestError
from workers.keys import MAX_IMAGES
from workers.sizes import SCALE, stage1_size
from workers.stages import IMAGE_STAGES, MODEL_STAGES, group_name, stages_to

ModelStage = Literal[MODEL_STAGES]  # type: ignore[valid-type]
WHOLE_CASCADE = "all"  # a group's stages: every stage the job runs, whatever last_stage and score
UNION_TAGS = ("list", WHOLE_CASCADE)  # GroupConfig.stages' alternatives, which pydantic puts in an error's place

MANIFESTS_DIR = Path(__file__).resolve().parent.parent / "manifests"
DEFAULT_MANIFEST = MANIFESTS_DIR / "local-tiny.yaml"


class RayConfig(Strict):
    address: str | None = Field(None, description="Ray cluster to join (or set RAY_ADDRESS); none starts a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="Logical CPUs of a local Ray; default: enough for every pool.")
    num_gpus: int | None = Field(
        None,
        ge=0,
        description="GPUs of a local Ray; default: the CUDA devices this machine has. "
        "More than it has declares logical GPUs (scheduling tests with device=cpu).",
    )
    block_rows: int | None = Field(
        None,
        ge=1,
        description="Rows per block into the first stage; default: the smallest batch size. Blocks "
        "are re-cut before any pool whose batch is smaller than the blocks arriving.",
    )
    mps: bool = Field(
        False,
        description="The GPU nodes run NVIDIA MPS: each actor with a GPU share runs on that share of the "
        "SMs (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), beside its neighbours. Off: co-located actors "
        "time-slice the GPU, whatever their shares. The planner models whichever is set.",
    )
    chunk_shards: int | None = Field(
        None,
        ge=1,
        description="Shards per chunk. The job runs its shards chunk by chunk, and before each chunk sizes "
        "the pools with a max_pool_size to the cluster as it is then: a node that joined takes work "
        "from the next chunk, and a chunk that lost its blocks with a node is run again once. None: "
        "all shards in one chunk.",
    )
    no_progress_timeout_s: float = Field(
        600,
        gt=0,
        description="End the run when Ray Data sees no block move through any stage for this long (its "
        "execution_no_progress_timeout_s): the message names the stalled stage, its queued rows and its "
        "actors' state; committed shards stay committed and the same command resumes (exit code 4). Keep "
        "it above the longest model load: a pool loading its weights moves no block.",
    )
    stop_grace_s: float = Field(
        20,
        ge=0,
        description="On the first SIGTERM or SIGINT (a pod or spot node going, Ctrl-C) the run starts no "
        "new chunk and goes on committing the shards whose rows come in for this long, then publishes what "
        "committed and exits 4 (run again); a second signal stops at once. Keep it under the pod's "
        "terminationGracePeriodSeconds.",
    )
    gpu_hour_usd: float = Field(
        2.0, ge=0, description="Price of one GPU-hour in USD, for the GPU-hours and cost in the run report."
    )
    reserve_timeout_s: float = Field(
        600,
        gt=0,
        description="Seconds to wait for the cluster to have room for the pools with fractional GPU "
        "shares, which are reserved (largest share first) before any model loads.",
    )


class GroupConfig(PoolConfig):
    """Consecutive model stages fused into one actor pool: each actor loads every stage of the
    group and takes each batch through them in turn, on one device."""

    # Tagged: a list is checked as a list of stages, so a typo gets one error, not one per alternative.
    stages: Annotated[
        Annotated[list[ModelStage], Field(min_length=2), Tag("list")]
        | Annotated[Literal[WHOLE_CASCADE], Tag(WHOLE_CASCADE)],  # type: ignore[valid-type]
        Discriminator(lambda v: WHOLE_CASCADE if isinstance(v, str) else "list"),
    ] = Field(
        description="The stages fused, consecutive in the cascade, e.g. [encode, stage1]. `all`: every "
        "stage the job runs (to last_stage, then score when it runs), whole-cascade replicas that follow "
        "last_stage and score.enabled.",
    )


class Manifest(Strict):
    name: str = Field(description="Job name, used in logs and the output's job.json.")
    seed: int = Field(
        0, ge=0, lt=2**63, description="Job seed; rows without a seed derive theirs from it and the row id."
    )
    last_stage: Literal[IMAGE_STAGES] = Field(  # type: ignore[valid-type]
        "upscale", description="Stop the cascade after this stage and write its images."
    )
    input: InputConfig = Field(description="Where prompts come from.")
    output: OutputConfig = Field(description="Where images and metadata go.")
    encode: EncodeConfig = Field(description="T5-XXL text encoder (from the IF-I repo).")
    stage1: Stage1Config = Field(description="IF stage I: text to 64 px.")
    stage2: Stage2Config = Field(description="IF stage II: 64 px to 256 px.")
    upscale: UpscaleConfig = Field(description="Stable Diffusion x4 upscaler: 256 px to 1024 px.")
    score: ScoreConfig = Field(
        default_factory=ScoreConfig,
        description="CLIP and aesthetic scores of each final image, after last_stage (clip_score, aesthetic_score).",
    )
    num_images: int = Field(
        1,
        ge=1,
        le=MAX_IMAGES,
        description="Images per prompt row (a row's num_images column overrides it): each is its "
        "own output row, id ID-N, with its own seed.",
    )
    width: int | None = Field(
        None,
        ge=8,
        description="Final image width in px at last_stage, for text-to-image rows (a row's width "
        "column overrides it); with height. Stage I renders width / 16 at upscale (/ 4 at stage2), a "
        "multiple of 8. None: the checkpoints' own square size. img2img and inpainting rows follow "
        "their init image's aspect ratio.",
    )
    height: int | None = Field(None, ge=8, description="Final image height in px at last_stage; see width.")
    safety: SafetyConfig = Field(default_factory=SafetyConfig, description="Safety checker and watermark.")
    contact_sheets: bool = Field(
        True, description="Write contact/NNNNNN.jpg per shard and contact/job.jpg: thumbnails with ids."
    )
    groups: list[GroupConfig] = Field(
        default_factory=list,
        description="The layout: stages fused into one actor pool each (their pool settings are the "
        "group's). None: the pipeline, one pool per stage. One group of every stage: replicas, copies of "
        "the whole cascade. Others: fused. `ifrender plan` compares them for a cluster.",
    )
    write: WriteConfig = Field(default_factory=WriteConfig, description="Image encoding and storage.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster settings.")

    def stages(self) -> tuple[str, ...]:
        """The model stages this job runs, in order: the cascade to last_stage, then the score
        stage where score.enabled is true (`auto` is decided by the preflight, which sees the
        weights: jobs/run/preflight.py resolve_score)."""
        return stages_to(self.last_stage, self.score.enabled is True)

    def group_stages(self, group: GroupConfig) -> tuple[str, ...]:
        """A group's stages, `all` resolved to the stages this job runs."""
        return self.stages() if group.stages == WHOLE_CASCADE else tuple(group.stages)

    @property
    def layout(self) -> str:
        if not self.groups:
            return "pipeline"
        return "replicas" if len(self.groups) == 1 and self.group_stages(self.groups[0]) == self.stages() else "fused"

    def model_pools(self) -> dict[str, tuple[tuple[str, ...], PoolConfig]]:
        """The model actor pools in cascade order: {name: (its stages, its pool settings)}; a stage
        in no group is a pool of its own, named as the stage."""
        grouped = {self.group_stages(g)[0]: g for g in self.groups}
        out: dict[str, tuple[tuple[str, ...], PoolConfig]] = {}
        stages = list(self.stages())
        while stages:
            group = grouped.get(stages[0])
            members = self.group_stages(group) if group else (stages[0],)
            out[group_name(members)] = (members, group or getattr(self, stages[0]))
            stages = stages[len(members) :]
        return out

    def stage_config(self, stage: str):
        """A stage's settings as its worker gets them: in a group, with the group's pool settings."""
        for group in self.groups:
            if stage in self.group_stages(group):
                pool = {k: getattr(group, k) for k in POOL_FIELDS}
                return getattr(self, stage).model_copy(update=pool)
        return getattr(self, stage)

    @model_validator(mode="after")
    def _groups_are_runs_of_the_cascade(self):
        stages = self.stages()
        seen: dict[str, int] = {}
        for i, group in enumerate(self.groups):
            where = f"groups[{i}].stages"
            if group.stages == WHOLE_CASCADE and len(self.groups) > 1:
                raise ValueError(
                    f"{where}: all (every stage of the job) beside {len(self.groups) - 1} other group(s); a stage "
                    f"runs in one pool. Fix: the one group `stages: all`, or list each group's stages"
                )
            members = self.group_stages(group)
            missing = [s for s in members if s not in stages]
            if missing:
                raise ValueError(
                    f"{where}: {missing} not run by this job (last_stage={self.last_stage}); expected stages of "
                    f"{list(stages)}. Fix: drop them from the group"
                )
            first = stages.index(members[0])
            if list(members) != list(stages[first : first + len(members)]):
                raise ValueError(
                    f"{where}: {list(members)} are not consecutive stages of the cascade {list(stages)}; a batch "
                    f"passes an actor pool once. Fix: fuse a run of neighbours, e.g. {list(stages[first : first + 2])}"
                )
            # `all` takes in the score stage when `auto` finds its weights: its settings are checked too.
            joins = stages_to(self.last_stage, self.score.enabled is not False) if group.stages == WHOLE_CASCADE else ()
            for stage in dict.fromkeys((*members, *joins)):
                if stage in seen:
                    raise ValueError(f"{where}: {stage} is in groups[{seen[stage]}] too. Fix: one group per stage")
                seen[stage] = i
                own = sorted(set(POOL_FIELDS) & getattr(self, stage).model_fields_set)
                if own:
                    raise ValueError(
                        f"{stage}.{own[0]}: {stage} runs in groups[{i}] ({group_name(members)}), whose "
                        f"actors take the group's pool settings ({', '.join(POOL_FIELDS)}); found {stage} "
                        f"setting {', '.join(own)}. Fix: set them on groups[{i}], or take {stage} out of the group"
                    )
        return self

    @model_validator(mode="after")
    def _size_fits_the_cascade(self):
        if (self.width is None) != (self.height is None):
            raise ValueError("width and height: expected both or neither; found only one. Fix: set the other too")
        if self.width is not None:
            width, height, problem = stage1_size(self.width, self.height, self.last_stage)
            if problem:
                raise ValueError(problem)
            for i, stage in enumerate(stages_to(self.last_stage)[1:]):  # stage1, stage2, upscale: each x4
                area = width * height * SCALE ** (2 * i)
                if area > getattr(self, stage).max_pixels:
                    raise ValueError(
                        f"width/height: {self.width}x{self.height} makes {stage} render {area} pixels, over "
                        f"{stage}.max_pixels={getattr(self, stage).max_pixels}. Fix: a smaller size, or raise "
                        f"{stage}.max_pixels if its GPU has the memory"
                    )
        return self

    @model_validator(mode="after")
    def _input_and_output_apart(self):
        """An output inside the input would be read back as prompts by the next run (its Parquet
        files are data files), and an input inside the output is deleted by --overwrite."""
        source, out = _location(self.input.path), _location(self.output.path)
        if source == out or source in out.parents or out in source.parents:
            raise ValueError(
                f"input.path {self.input.path} and output.path {self.output.path}: expected two places apart, "
                f"found one inside the other (a run would read its own output as prompts, or --overwrite "
                f"delete its input). Fix: point output.path outside the input's folder"
            )
        return self


def drop_grouped_pool_settings(data: dict) -> dict:
    """Manifest data with each grouped stage's own pool settings left out (in place): its group's
    are the ones its actors take, and a grouped stage may not set its own. For data that holds
    every field (a job record) or another layout's groups (the planner's)."""
    for group in data.get("groups", []):
        for stage in MODEL_STAGES if group["stages"] == WHOLE_CASCADE else group["stages"]:
            if stage in data:  # a record from before the score stage has no score section
                data[stage] = {k: v for k, v in data[stage].items() if k not in POOL_FIELDS}
    return data


def _location(path: str) -> PurePosixPath:
    """A path or s3:// URI as a comparable path: s3://bucket/key becomes /s3:/bucket/key."""
    if "://" in path:
        scheme, _, rest = path.partition("://")
        return PurePosixPath(f"/{scheme}:", *[p for p in rest.split("/") if p])
    return PurePosixPath(os.path.normpath(os.path.abspath(os.path.expanduser(path))))


def _format_errors(source: str, err: ValidationError, overrides: dict[str, str]) -> str:
    """One line per problem, each blamed on where its value came from: the file, or the --set
    that replaced it."""
    lines = [f"{source}: invalid manifest ({err.error_count()} problem(s)):"]
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"] if p not in UNION_TAGS)
        where = ".".join(loc) or "(top level)"
        given = next((a for k, a in overrides.items() if where == k or where.startswith(k + ".")), None)
        blame = f" (from --set {quote(given)}, not the file)" if given else ""
        if e["type"] == "extra_forbidden":
            close = nearest(Manifest, loc[:-1], loc[-1])
            hint = (
                f"did you mean {' or '.join('.'.join([*loc[:-1], c]) for c in close)}?"
                if close
                else "check its spelling"
            )
            lines.append(
                f"  {where}: unknown field{blame}; {hint} (`ifrender validate --explain {'.'.join(loc[:-1]) or 'FIELD'}` lists the fields there)"
            )
        elif e["type"] == "missing":
            lines.append(
                f"  {where}: required and missing. Fix: add it (`ifrender validate --explain {where}` says what it holds)"
            )
        elif not e["loc"]:  # a check of the whole manifest: its message names the fields
            lines.append(f"  {cut(e['msg'].removeprefix('Value error, '))}")
        else:
            lines.append(f"  {where}: {cut(e['msg'])} (found {quote(e.get('input'))}){blame}")
    return "\n".join(lines)


def _yaml_error(path: Path, err: yaml.YAMLError) -> str:
    """A YAML error as path, line and column, then what the parser expected."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    started = getattr(err, "context_mark", None)
    within = f" ({context} started at line {started.line + 1})" if context and started else ""
    return (
        f"{where}: not valid YAML: {cut(problem)}{within}. Fix: correct the YAML there (indentation, quotes, brackets)"
    )


def load_manifest(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    run_date: str | None = None,
    run_id: str | None = None,
) -> Manifest:
    """Read, override and validate a manifest; fill {run_date}/{run_id} in paths; local input
    paths become absolute. A relative path in the file is relative to the file (the manifest and
    its prompts travel together); one given with --set, to the working directory (where the
    command is typed); output.path always to the working directory."""
    path = Path(path) if path else DEFAULT_MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found. Fix: pass an existing YAML file, e.g. {DEFAULT_MANIFEST}")
    try:
        data = safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ManifestError(_yaml_error(path, err)) from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping of fields at the top level, found {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment)
    fill_paths(str(path), data, template_values(run_date, run_id))
    # A relative local output is relative to the working directory: fix it now, so every later
    # comparison of object paths (cleanup of stale files) sees one absolute form.
    out = data.get("output")
    if isinstance(out, dict) and isinstance(out.get("path"), str) and "://" not in out["path"]:
        out["path"] = str(Path(out["path"]).expanduser().resolve())
    given = {a.partition("=")[0] for a in overrides}

    def base(key: str) -> Path:
        return Path.cwd() if key in given or "input" in given else path.parent

    source_path = data.get("input", {}).get("path") if isinstance(data.get("input"), dict) else None
    if isinstance(source_path, str) and "://" not in source_path and not Path(source_path).expanduser().is_absolute():
        data["input"]["path"] = str((base("input.path") / source_path).resolve())
    roots = data.get("input", {}).get("image_roots") if isinstance(data.get("input"), dict) else None
    if isinstance(roots, list):  # local roots, like the input, are relative to where they were given
        data["input"]["image_roots"] = [
            r
            if not isinstance(r, str) or "://" in r
            else str((base("input.image_roots") / Path(r).expanduser()).resolve())
            for r in roots
        ]
    try:
        return Manifest.model_validate(data)
    except ValidationError as err:
        given = {a.partition("=")[0]: a for a in overrides}
        raise ManifestError(_format_errors(str(path), err, given)) from None
