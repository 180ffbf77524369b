"""stage1: T5 embeddings (and, for img2img/inpainting rows, `image`/`mask_image`) in; IF stage I
image `stage1_image` (3, H, W) per row in [-1, 1] out: 64 x 64 by default, the row's size when it
asks for one, its init image's aspect ratio for img2img and inpainting."""

from __future__ import annotations

import io

from PIL import Image

from workers.batch import Batch
from workers.if_stage import IFStageWorker
from workers.sizes import init_image_size


class Stage1Worker(IFStageWorker):
    stage = "stage1"
    pipelines = ("IFPipeline", "IFImg2ImgPipeline", "IFInpaintingPipeline")
    init_image_arg = "image"

    def output_size(self, batch: Batch, row: int, mode: str) -> tuple[int, int]:
        if mode != "text2img":  # the pipelines keep the init image's aspect ratio
            with Image.open(io.BytesIO(batch["image"][row])) as img:
                return init_image_size(*img.size, self.size)
        width = int(batch["stage1_width"][row]) if "stage1_width" in batch else 0
        height = int(batch["stage1_height"][row]) if "stage1_height" in batch else 0
        return (width, height) if width and height else (self.size, self.size)
