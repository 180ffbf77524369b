"""What IF stages I and II share: the three modes (text-to-image, img2img, inpainting) on one
set of weights, per-row settings, and the call into the mode's diffusers pipeline.

stage1.py and stage2.py say only what differs: their pipeline classes, the name under which the
pipeline takes a row's init image, and stage II's extra inputs (the stage I image, noise level).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.base import StageWorker, row_generators, to_numpy
from workers.batch import Batch, per_row
from workers.guidance import guidance_interval
from workers.models import Schedulers, load_pipeline, preset_timesteps, recorded_settings
from workers.overrides import effective_settings, row_mode
from workers.safety import Safety


def decode(batch: Batch, column: str, rows: np.ndarray, mode: str = "RGB") -> list[Image.Image]:
    """A row's init image or mask, from the bytes the reader checked."""
    return [Image.open(io.BytesIO(batch[column][r])).convert(mode) for r in rows]


def mode_of(batch: Batch, row: int) -> str:
    image = batch["image"][row] if "image" in batch else None
    mask = batch["mask_image"][row] if "mask_image" in batch else None
    return row_mode(image, mask)


def row_overrides(batch: Batch, row: int) -> str:
    """A row's `overrides` JSON ("" when it has none)."""
    return batch["overrides"][row] if "overrides" in batch else ""


def mode_pipelines(pipe: Any, img2img_cls: Any, inpaint_cls: Any) -> dict[str, Any]:
    """{mode: pipeline}; img2img and inpainting run on the text-to-image pipeline's own modules,
    so the weights are in memory once."""
    shared = pipe.components | {"requires_safety_checker": False}
    pipes = {"text2img": pipe, "img2img": img2img_cls(**shared), "inpaint": inpaint_cls(**shared)}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


class IFStageWorker(StageWorker):
    """Base of stages I and II. Subclasses set `pipelines` (diffusers class names for
    text2img, img2img, inpaint) and `init_image_arg`, and may add `inputs`."""

    pipelines: tuple[str, str, str] = ("", "", "")
    init_image_arg: str = "image"  # how the img2img/inpainting pipelines name the init image

    def __init__(self, cfg: Any, drop: tuple[str, ...] = (), safety: Any = None) -> None:
        super().__init__(cfg, recorded_settings(cfg), drop)
        import diffusers

        text2img, img2img, inpaint = (getattr(diffusers, name) for name in self.pipelines)
        self.pipe = load_pipeline(self.stage, text2img, cfg, self.device, text_encoder=None, tokenizer=None)
        self.pipes = mode_pipelines(self.pipe, img2img, inpaint)
        self.schedulers = Schedulers(self.pipe.scheduler)
        self.size = self.pipe.unet.config.sample_size
        self.column = f"{self.stage}_image"
        self.handover = np.float16 if cfg.dtype == "fp16" else np.float32
        # The last stage finishes its images as the IF pipelines do: checker, watermark.
        self.safety = Safety.load(safety, self.device) if safety is not None else None
        self.report("loaded")

    def row_settings(self, batch: Batch, row: int) -> dict[str, Any]:
        mode = mode_of(batch, row)
        settings = effective_settings(self.stage, self.cfg, row_overrides(batch, row), mode)
        settings["width"], settings["height"] = self.output_size(batch, row, mode)
        return settings

    def output_size(self, batch: Batch, row: int, mode: str) -> tuple[int, int]:
        """(width, height) this stage renders the row at; rows of one size run together."""
        raise NotImplementedError

    def inputs(self, batch: Batch, rows: np.ndarray, settings: dict[str, Any]) -> dict[str, Any]:
        """Pipeline arguments of this stage alone."""
        return {}

    def mode_inputs(self, batch: Batch, rows: np.ndarray, settings: dict[str, Any]) -> dict[str, Any]:
        """The arguments a mode adds: the output size for text-to-image; the init image, strength
        and mask otherwise."""
        if settings["mode"] == "text2img":
            return {"height": settings["height"], "width": settings["width"]}
        extra = {self.init_image_arg: decode(batch, "image", rows), "strength": settings["strength"]}
        if settings["mode"] == "inpaint":
            extra["mask_image"] = decode(batch, "mask_image", rows, "L")
        return extra

    @torch.inference_mode()
    def run(self, batch: Batch, rows: np.ndarray, settings: dict[str, Any]) -> Batch:
        self.check_size(settings)
        kwargs: dict[str, Any] = dict(
            prompt_embeds=self.tensor(batch, "prompt_embeds", rows),
            negative_prompt_embeds=self.tensor(batch, "negative_prompt_embeds", rows),
            num_inference_steps=settings.get("num_inference_steps", self.cfg.num_inference_steps),
            timesteps=preset_timesteps(settings.get("timesteps")),
            guidance_scale=settings["guidance_scale"],
            generator=row_generators(batch["seed"][rows], self.stage),
            output_type="pt",
        )
        kwargs |= self.inputs(batch, rows, settings) | self.mode_inputs(batch, rows, settings)
        pipe = self.pipes[settings["mode"]]
        pipe.scheduler = self.schedulers[settings["scheduler"]]
        with guidance_interval(pipe, settings["guidance_interval"], settings["guidance_scale"] > 1):
            images = pipe(**kwargs).images
        # Handed on in the stage's dtype (fp16 stays fp16: half the object store traffic of fp32,
        # and the next stage computes in its own dtype anyway); numpy has no bf16, so bf16 goes as fp32.
        values = {self.column: to_numpy(images).astype(self.handover, copy=False)}
        return self.safety.finish(values, self.column) if self.safety else values

    def blank(self, batch: Batch, n: int) -> Batch:
        values = {self.column: per_row(n, np.zeros((3, self.size, self.size), dtype=self.handover))}
        return values | (self.safety.blank(n) if self.safety else {})
