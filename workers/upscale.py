"""upscale: `stage2_image` and `prompt` in; x4 upscaler image `upscale_image` (4H, 4W, 3) uint8 per
row out: 1024 x 1024 by default, the stage II image's aspect ratio."""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch

from workers.base import StageWorker, row_generators
from workers.batch import Batch
from workers.guidance import guidance_interval
from workers.if_stage import row_overrides
from workers.models import Schedulers, load_pipeline, recorded_settings
from workers.overrides import effective_settings
from workers.safety import Safety
from workers.sizes import SCALE

log = logging.getLogger(__name__)


class UpscaleWorker(StageWorker):
    stage = "upscale"

    def __init__(self, cfg: Any, drop: tuple[str, ...] = (), safety: Any = None) -> None:
        super().__init__(cfg, recorded_settings(cfg), drop)
        from diffusers import StableDiffusionUpscalePipeline

        self.pipe = load_pipeline(self.stage, StableDiffusionUpscalePipeline, cfg, self.device)
        self.schedulers = Schedulers(self.pipe.scheduler)
        vae = self.pipe.vae
        if cfg.channels_last:
            vae.to(memory_format=torch.channels_last)
        # The decode in fp32 keeps its own fp32 VAE, rather than casting the weights up and back
        # on every call as the pipeline does.
        self.vae32 = vae if vae.dtype == torch.float32 else None
        if cfg.vae_decode == "fp32" and self.vae32 is None:
            self.vae32 = vae.to(torch.float32)
        # The 1024 px decode is the upscaler's memory peak: one image at a time, or in tiles.
        if cfg.vae_slicing:
            self.pipe.vae.enable_slicing()
        if cfg.vae_tiling:
            self.pipe.vae.enable_tiling()
        # The last stage finishes its images as the IF pipelines do: checker, watermark.
        self.safety = Safety.load(safety, self.device) if safety is not None else None
        self.report("loaded")

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
        with guidance_interval(self.pipe, settings["guidance_interval"], settings["guidance_scale"] > 1):
            images = self._upscale(batch, rows, settings, low_res)
        values = {"upscale_image": self.decode(images)}
        return self.safety.finish(values, "upscale_image") if self.safety else values

    def _upscale(self, batch: Batch, rows: np.ndarray, settings: dict[str, Any], low_res: torch.Tensor) -> torch.Tensor:
        return self.pipe(
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
            output_type="latent",
        ).images

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents to (B, H, W, 3) uint8 images, converted on the device so only bytes cross to
        the host; as the pipeline's own decode and post-processing, bit for bit in fp32."""
        vae = self.vae32 if self.cfg.vae_decode == "fp32" else self.pipe.vae
        images = self._decode(vae, latents)
        if vae.dtype != torch.float32:  # an overflow in half precision: that image again in fp32
            bad = ~torch.isfinite(images).flatten(1).all(dim=1)
            if bad.any():
                if self.vae32 is None:
                    self.vae32 = copy.deepcopy(vae).to(torch.float32)
                log.warning(
                    "upscale: %d image(s) overflowed the %s decode; decoded again in fp32", int(bad.sum()), vae.dtype
                )
                images[bad] = self._decode(self.vae32, latents[bad]).to(images.dtype)
        scaled = (images.float() / 2 + 0.5).clamp(0, 1) * 255
        return scaled.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    @staticmethod
    def _decode(vae, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(vae.dtype)
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]

    def blank(self, batch: Batch, n: int) -> Batch:
        column = np.empty(n, dtype=object)
        for i, low_res in enumerate(batch["stage2_image"]):
            _, h, w = low_res.shape
            column[i] = np.zeros((SCALE * h, SCALE * w, 3), dtype=np.uint8)
        values = {"upscale_image": column}
        return values | (self.safety.blank(n) if self.safety else {})
