"""The stage registry: one table of what each stage is, read by the chain, the profiler, the
bench and the simulation.

Per stage: its worker class, its config class, the columns it needs (and those it reads when a
row has them), and the columns it produces. What a stage drops is derived: the payload columns
(tensors and init images) no later stage reads leave the object store as early as they can.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from workers.config import EncodeConfig, ModelStageConfig, ScoreConfig, Stage1Config, Stage2Config, UpscaleConfig

EMBEDS = ("prompt_embeds", "negative_prompt_embeds")
INIT_IMAGES = ("image", "mask_image")  # img2img and inpainting rows' inputs, from the reader


@dataclass(frozen=True)
class Stage:
    name: str
    worker: str  # "module:Class" under workers/, imported on use: torch stays out of the driver's start-up
    config: type[ModelStageConfig]
    needs: tuple[str, ...]
    optional: tuple[str, ...]  # read when present (img2img and inpainting rows)
    produces: tuple[str, ...]  # payload columns only; every stage also records <stage>_model, _params, ...

    def worker_class(self) -> type:
        module, _, name = self.worker.partition(":")
        return getattr(importlib.import_module(f"workers.{module}"), name)

    @property
    def image_column(self) -> str:
        return f"{self.name}_image"


STAGES = {
    s.name: s
    for s in (
        Stage("encode", "encode:EncodeWorker", EncodeConfig, ("prompt", "negative_prompt"), (), EMBEDS),
        Stage("stage1", "stage1:Stage1Worker", Stage1Config, ("seed", *EMBEDS), INIT_IMAGES, ("stage1_image",)),
        Stage(
            "stage2",
            "stage2:Stage2Worker",
            Stage2Config,
            ("seed", *EMBEDS, "stage1_image"),
            INIT_IMAGES,
            ("stage2_image",),
        ),
        Stage(
            "upscale",
            "upscale:UpscaleWorker",
            UpscaleConfig,
            ("seed", "prompt", "negative_prompt", "stage2_image"),
            (),
            ("upscale_image",),
        ),
        # After the job's last image stage, whichever it is: it reads that stage's image (the only
        # image column left in the batch by then) and adds scalar columns, no payload.
        Stage("score", "score:ScoreWorker", ScoreConfig, ("prompt",), (), ()),
    )
}
# Every model stage in order: the cascade, then the score stage; one name per stage everywhere
# (manifest key, module, worker, columns).
MODEL_STAGES = tuple(STAGES)
SCORE = "score"
IMAGE_STAGES = tuple(s for s in MODEL_STAGES if s not in ("encode", SCORE))  # each ends in <stage>_image


WRITE = "write"  # the writer's pool: after the last model stage in every chain


def chain_stages(stages: tuple[str, ...] = MODEL_STAGES) -> tuple[str, ...]:
    """Every stage of a job's chain in order, each with a pool of its own or a group's: its model
    stages (a job's `Manifest.stages()`), then the writer."""
    return (*stages, WRITE)


def group_name(stages: tuple[str, ...]) -> str:
    """The name of an actor pool running these stages: the stage's own, or theirs joined by '+'."""
    return "+".join(stages)


def stages_to(last_stage: str, score: bool = False) -> tuple[str, ...]:
    """The model stages a job with this last image stage runs, in order: the cascade up to it,
    then the score stage if it scores."""
    return MODEL_STAGES[: MODEL_STAGES.index(last_stage) + 1] + ((SCORE,) if score else ())


def last_image_stage(stages: tuple[str, ...]) -> str:
    return [s for s in stages if s in IMAGE_STAGES][-1]


def drops(stages: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Per stage of a job's `stages`, the payload columns it drops: those no later stage reads
    and the writer does not write (the last image stage's image)."""
    present = list(INIT_IMAGES)
    out = {}
    for i, stage in enumerate(stages):
        later = {c for s in stages[i + 1 :] for c in STAGES[s].needs + STAGES[s].optional}
        later.add(STAGES[last_image_stage(stages)].image_column)
        present += STAGES[stage].produces
        out[stage] = tuple(c for c in present if c not in later)
        present = [c for c in present if c in later]
    return out
