"""upscale: `stage2_image` and `prompt` in; x4 upscaler image `upscale_image` (B, 1024, 1024, 3) uint8 out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workers.common import Batch, StageWorker, row_generators
from workers.models import load_pipeline
from workers.params import stage_params


class UpscaleWorker(StageWorker):
    stage = "upscale"
    needs = ("seed", "prompt", "negative_prompt", "stage2_image")

    def __init__(self, cfg, drop: tuple[str, ...] = (), safety: Any = None) -> None:
        super().__init__(cfg, {}, drop, safety)
        from diffusers import StableDiffusionUpscalePipeline

        self.pipe = load_pipeline(self.stage, StableDiffusionUpscalePipeline, cfg, self.device)

    def row_params(self, batch: Batch, row: int) -> dict:
        params = stage_params(self.stage, self.cfg, batch["params"][row] if "params" in batch else "", "text2img")
        params.pop("mode")  # the upscaler has one mode
        return params

    @torch.inference_mode()
    def run(self, batch: Batch, rows: np.ndarray, params: dict) -> Batch:
        low_res = self.tensor(batch, "stage2_image", rows)
        images = self.pipe(
            prompt=[str(p) for p in batch["prompt"][rows]],
            negative_prompt=[str(p or "") for p in batch["negative_prompt"][rows]],
            # The upscaler picks its input scaling from the whole batch's minimum, so one image's
            # result would depend on its neighbours: hand it [0, 1] images always.
            image=(low_res / 2 + 0.5).clamp(0, 1),
            num_inference_steps=params["num_inference_steps"],
            guidance_scale=params["guidance_scale"],
            noise_level=params["noise_level"],
            generator=row_generators(batch["seed"][rows], self.stage),
            num_images_per_prompt=1,  # more than one mispairs prompts and images in diffusers 0.42
            output_type="np",
        ).images
        return {"upscale_image": np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)}

    def blank(self, batch: Batch, n: int) -> Batch:
        _, _, h, w = batch["stage2_image"].shape
        return {"upscale_image": np.zeros((n, 4 * h, 4 * w, 3), dtype=np.uint8)}
