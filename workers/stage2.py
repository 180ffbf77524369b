"""stage2: `stage1_image` and T5 embeddings (plus `image`/`mask_image` for img2img/inpainting
rows) in; IF stage II image `stage2_image` (3, 4H, 4W) per row in [-1, 1] out: the stage I image's
aspect ratio, 256 x 256 by default."""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.batch import Batch
from workers.if_stage import IFStageWorker
from workers.sizes import SCALE


class Stage2Worker(IFStageWorker):
    stage = "stage2"
    pipelines = ("IFSuperResolutionPipeline", "IFImg2ImgSuperResolutionPipeline", "IFInpaintingSuperResolutionPipeline")
    init_image_arg = "original_image"  # the super-resolution pipelines' `image` is the stage I image

    def output_size(self, batch: Batch, row: int, mode: str) -> tuple[int, int]:
        _, height, width = batch["stage1_image"][row].shape
        return SCALE * width, SCALE * height

    def inputs(self, batch: Batch, rows: np.ndarray, settings: dict[str, Any]) -> dict[str, Any]:
        return {"image": self.tensor(batch, "stage1_image", rows), "noise_level": settings["noise_level"]}
