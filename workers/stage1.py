"""stage1: T5 embeddings in; IF stage I image `stage1_image` (B, 3, 64, 64) in [-1, 1] out."""

from __future__ import annotations

import numpy as np
import torch

from workers.common import Batch, StageWorker, row_generators, to_numpy
from workers.models import DTYPES, load_stage1_pipeline


class Stage1Worker(StageWorker):
    stage = "stage1"
    needs = ("seed", "prompt_embeds", "negative_prompt_embeds")

    def __init__(self, cfg, drop: tuple[str, ...] = ()) -> None:
        super().__init__(
            cfg,
            {
                "num_inference_steps": cfg.num_inference_steps,
                "timesteps": cfg.timesteps,
                "guidance_scale": cfg.guidance_scale,
            },
            drop,
        )
        self.pipe = load_stage1_pipeline(cfg, self.device)
        self.size = self.pipe.unet.config.sample_size
        self.pipe.set_progress_bar_config(disable=True)

    @torch.inference_mode()
    def run(self, batch: Batch, rows: np.ndarray) -> Batch:
        from diffusers.pipelines.deepfloyd_if import timesteps as presets

        dtype = DTYPES[self.cfg.dtype]
        images = self.pipe(
            prompt_embeds=torch.from_numpy(batch["prompt_embeds"][rows]).to(self.device, dtype),
            negative_prompt_embeds=torch.from_numpy(batch["negative_prompt_embeds"][rows]).to(self.device, dtype),
            num_inference_steps=self.cfg.num_inference_steps,
            timesteps=getattr(presets, self.cfg.timesteps) if self.cfg.timesteps else None,
            guidance_scale=self.cfg.guidance_scale,
            height=self.size,
            width=self.size,
            generator=row_generators(batch["seed"][rows], self.stage),
            output_type="pt",
        ).images
        return {"stage1_image": to_numpy(images.float())}

    def blank(self, batch: Batch, n: int) -> Batch:
        return {"stage1_image": np.zeros((n, 3, self.size, self.size), dtype=np.float32)}
