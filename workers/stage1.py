"""stage1: T5 embeddings (and, for img2img/inpainting rows, `image`/`mask_image`) in; IF stage I
image `stage1_image` (B, 3, 64, 64) in [-1, 1] out."""

from __future__ import annotations

from workers.if_stage import IFStageWorker


class Stage1Worker(IFStageWorker):
    stage = "stage1"
    pipelines = ("IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline")
    init_image_arg = "image"
