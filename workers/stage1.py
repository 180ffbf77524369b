"""stage1: T5 embeddings (and, for img2img/inpainting rows, `image`/`mask_image`) in; IF stage I
image `stage1_image` (B, 3, 64, 64) in [-1, 1] out."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.common import Batch, StageWorker, row_generators, to_numpy
from workers.models import load_pipeline, preset_timesteps
from workers.params import row_mode, stage_params


def decode(batch: Batch, column: str, rows: np.ndarray, mode: str = "RGB") -> list[Image.Image]:
    """A row's init image or mask, from the bytes the reader checked."""
    return [Image.open(io.BytesIO(batch[column][r])).convert(mode) for r in rows]


def modes_of(batch: Batch, row: int) -> str:
    image = batch["image"][row] if "image" in batch else None
    mask = batch["mask_image"][row] if "mask_image" in batch else None
    return row_mode(image, mask)


def mode_kwargs(batch: Batch, rows: np.ndarray, params: dict, image_arg: str, size: int) -> dict[str, Any]:
    """The pipeline arguments a mode adds: the output size for text-to-image; the init image
    (`image` at stage I, `original_image` at stage II), strength and mask otherwise."""
    if params["mode"] == "text2img":
        return {"height": size, "width": size}
    extra = {image_arg: decode(batch, "image", rows), "strength": params["strength"]}
    if params["mode"] == "inpaint":
        extra["mask_image"] = decode(batch, "mask_image", rows, "L")
    return extra


def mode_pipelines(pipe, img2img_cls, inpaint_cls) -> dict:
    """{mode: pipeline}; img2img and inpainting run on the text-to-image pipeline's own modules,
    so the weights are in memory once."""
    shared = pipe.components | {"requires_safety_checker": False}
    pipes = {"text2img": pipe, "img2img": img2img_cls(**shared), "inpaint": inpaint_cls(**shared)}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


class Stage1Worker(StageWorker):
    stage = "stage1"
    needs = ("seed", "prompt_embeds", "negative_prompt_embeds")

    def __init__(self, cfg, drop: tuple[str, ...] = (), safety: Any = None) -> None:
        super().__init__(cfg, {}, drop, safety)
        from diffusers import IFImg2ImgPipeline, IFInpaintingPipeline, IFPipeline

        self.pipe = load_pipeline(self.stage, IFPipeline, cfg, self.device, text_encoder=None, tokenizer=None)
        self.pipes = mode_pipelines(self.pipe, IFImg2ImgPipeline, IFInpaintingPipeline)
        self.size = self.pipe.unet.config.sample_size

    def row_params(self, batch: Batch, row: int) -> dict:
        return stage_params(
            self.stage, self.cfg, batch["params"][row] if "params" in batch else "", modes_of(batch, row)
        )

    @torch.inference_mode()
    def run(self, batch: Batch, rows: np.ndarray, params: dict) -> Batch:
        mode = params["mode"]
        kwargs: dict[str, Any] = dict(
            prompt_embeds=self.tensor(batch, "prompt_embeds", rows),
            negative_prompt_embeds=self.tensor(batch, "negative_prompt_embeds", rows),
            num_inference_steps=params.get("num_inference_steps", 100),
            timesteps=preset_timesteps(params.get("timesteps")),
            guidance_scale=params["guidance_scale"],
            generator=row_generators(batch["seed"][rows], self.stage),
            output_type="pt",
        )
        kwargs |= mode_kwargs(batch, rows, params, "image", self.size)
        images = self.pipes[mode](**kwargs).images
        return {"stage1_image": to_numpy(images.float())}

    def blank(self, batch: Batch, n: int) -> Batch:
        return {"stage1_image": np.zeros((n, 3, self.size, self.size), dtype=np.float32)}
