"""stage1: T5 embeddings in; IF stage I image `stage1_image` (B, 3, 64, 64) in [-1, 1] out."""

from __future__ import annotations

import numpy as np
import torch

from workers.common import Batch, StageWorker, row_generators, to_numpy
from workers.models import load_pipeline, preset_timesteps


class Stage1Worker(StageWorker):
    stage = "stage1"
    needs = ("seed", "prompt_embeds", "negative_prompt_embeds")

    def __init__(self, cfg, drop: tuple[str, ...] = ()) -> None:
        params = {
            "num_inference_steps": cfg.num_inference_steps,
            "timesteps": cfg.timesteps,
            "guidance_scale": cfg.guidance_scale,
        }
        super().__init__(cfg, params, drop)
        from diffusers import IFPipeline

        self.pipe = load_pipeline(self.stage, IFPipeline, cfg, self.device, text_encoder=None, tokenizer=None)
        self.size = self.pipe.unet.config.sample_size

    @torch.inference_mode()
    def run(self, batch: Batch, rows: np.ndarray) -> Batch:
        images = self.pipe(
            prompt_embeds=self.tensor(batch, "prompt_embeds", rows),
            negative_prompt_embeds=self.tensor(batch, "negative_prompt_embeds", rows),
            num_inference_steps=self.cfg.num_inference_steps,
            timesteps=preset_timesteps(self.cfg.timesteps),
            guidance_scale=self.cfg.guidance_scale,
            height=self.size,
            width=self.size,
            generator=row_generators(batch["seed"][rows], self.stage),
            output_type="pt",
        ).images
        return {"stage1_image": to_numpy(images.float())}

    def blank(self, batch: Batch, n: int) -> Batch:
        return {"stage1_image": np.zeros((n, 3, self.size, self.size), dtype=np.float32)}
