"""stage2: `stage1_image` and T5 embeddings (plus `image`/`mask_image` for img2img/inpainting
rows) in; IF stage II image `stage2_image` (B, 3, 256, 256) in [-1, 1] out."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workers.common import Batch, StageWorker, row_generators, to_numpy
from workers.models import load_pipeline, preset_timesteps
from workers.params import stage_params
from workers.stage1 import mode_kwargs, mode_pipelines, modes_of


class Stage2Worker(StageWorker):
    stage = "stage2"
    needs = ("seed", "prompt_embeds", "negative_prompt_embeds", "stage1_image")

    def __init__(self, cfg, drop: tuple[str, ...] = (), safety: Any = None) -> None:
        super().__init__(cfg, {}, drop, safety)
        from diffusers import (
            IFImg2ImgSuperResolutionPipeline,
            IFInpaintingSuperResolutionPipeline,
            IFSuperResolutionPipeline,
        )

        self.pipe = load_pipeline(
            self.stage, IFSuperResolutionPipeline, cfg, self.device, text_encoder=None, tokenizer=None
        )
        self.pipes = mode_pipelines(self.pipe, IFImg2ImgSuperResolutionPipeline, IFInpaintingSuperResolutionPipeline)
        self.size = self.pipe.unet.config.sample_size

    def row_params(self, batch: Batch, row: int) -> dict:
        return stage_params(
            self.stage, self.cfg, batch["params"][row] if "params" in batch else "", modes_of(batch, row)
        )

    @torch.inference_mode()
    def run(self, batch: Batch, rows: np.ndarray, params: dict) -> Batch:
        mode = params["mode"]
        kwargs: dict[str, Any] = dict(
            image=self.tensor(batch, "stage1_image", rows),
            prompt_embeds=self.tensor(batch, "prompt_embeds", rows),
            negative_prompt_embeds=self.tensor(batch, "negative_prompt_embeds", rows),
            num_inference_steps=params.get("num_inference_steps", 50),
            timesteps=preset_timesteps(params.get("timesteps")),
            guidance_scale=params["guidance_scale"],
            noise_level=params["noise_level"],
            generator=row_generators(batch["seed"][rows], self.stage),
            output_type="pt",
        )
        kwargs |= mode_kwargs(batch, rows, params, "original_image", self.size)
        images = self.pipes[mode](**kwargs).images
        return {"stage2_image": to_numpy(images.float())}

    def blank(self, batch: Batch, n: int) -> Batch:
        return {"stage2_image": np.zeros((n, 3, self.size, self.size), dtype=np.float32)}
