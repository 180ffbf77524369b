"""upscale: `stage2_image` and `prompt` in; x4 upscaler image `upscale_image` (4H, 4W, 3) uint8 per
row out: 1024 x 1024 by default, the stage II image's aspect ratio."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workers.base import Batch, StageWorker, row_generators
from workers.if_stage import row_overrides
from workers.models import Schedulers, load_pipeline, recorded_settings
from workers.overrides import effective_settings
from workers.safety import Safety
from workers.sizes import SCALE


class UpscaleWorker(StageWorker):
    stage = "upscale"

    def __init__(self, cfg: Any, drop: tuple[str, ...] = (), safety: Any = None) -> None:
        super().__init__(cfg, recorded_settings(cfg), drop)
        from diffusers import StableDiffusionUpscalePipeline

        self.pipe = load_pipeline(self.stage, StableDiffusionUpscalePipeline, cfg, self.device)
        self.schedulers = Schedulers(self.pipe.scheduler)
        # The 1024 px decode is the upscaler's memory peak: one image at a time, or in tiles.
        if cfg.vae_slicing:
            self.pipe.vae.enable_slicing()
        if cfg.vae_tiling:
            self.pipe.vae.enable_tiling()
        # The last stage finishes its images as the IF pipelines do: checker, watermark.
        self.safety = Safety.load(safety, self.device) if safety is not None else None

    def row_settings(self, batch: Batch, row: int) -> dict[str, Any]:
        settings = effective_settings(self.stage, self.cfg, row_overrides(batch, row), "text2img")
        settings.pop("mode")  # the upscaler has one mode
        _, height, width = batch["stage2_image"][row].shape
        settings["width"], settings["height"] = SCALE * width, SCALE * height  # rows of one size run together
        return settings

    @torch.inference_mode()
    def run(self, batch: Batch, rows: np.ndarray, settings: dict[str, Any]) -> Batch:
        self.check_size(settings)
        low_res = self.tensor(batch, "stage2_image", rows)
        self.pipe.scheduler = self.schedulers[settings["scheduler"]]
        images = self.pipe(
            prompt=[str(p) for p in batch["prompt"][rows]],
            negative_prompt=[str(p or "") for p in batch["negative_prompt"][rows]],
            # The upscaler picks its input scaling from the whole batch's minimum, so one image's
            # result would depend on its neighbours: hand it [0, 1] images always.
            image=(low_res / 2 + 0.5).clamp(0, 1),
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"],
            noise_level=settings["noise_level"],
            generator=row_generators(batch["seed"][rows], self.stage),
            num_images_per_prompt=1,  # more than one mispairs prompts and images in diffusers 0.42
            output_type="np",
        ).images
        values = {"upscale_image": np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)}
        return self.safety.finish(values, "upscale_image") if self.safety else values

    def blank(self, batch: Batch, n: int) -> Batch:
        column = np.empty(n, dtype=object)
        for i, low_res in enumerate(batch["stage2_image"]):
            _, h, w = low_res.shape
            column[i] = np.zeros((SCALE * h, SCALE * w, 3), dtype=np.uint8)
        values = {"upscale_image": column}
        return values | (self.safety.blank(n) if self.safety else {})
