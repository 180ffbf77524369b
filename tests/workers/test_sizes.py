"""Any size and aspect ratio through the cascade: text rows at their own size, img2img and
inpainting rows at their init image's aspect ratio, rows of several shapes in one batch, each
rendering the same pixels as alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.helpers import rows, take
from workers.encode import EncodeWorker
from workers.sizes import init_image_size, stage1_size
from workers.stage1 import Stage1Worker
from workers.stage2 import Stage2Worker
from workers.upscale import UpscaleWorker


def png_of(width: int, height: int, mask: bool = False) -> bytes:
    img = Image.new("L" if mask else "RGB", (width, height), 255 if mask else (180, 60, 20))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cascade(tiny_manifest):
    m = tiny_manifest(*[f"{s}.micro_batch=2" for s in ("encode", "stage1", "stage2", "upscale")])
    workers = [EncodeWorker(m.encode), Stage1Worker(m.stage1), Stage2Worker(m.stage2), UpscaleWorker(m.upscale)]

    def run(batch):
        for worker in workers:
            batch = worker(batch)
        return batch

    return run


# (stage I width, height) a text row asks for, or an init image (and mask) of an aspect ratio.
ROWS = [
    ("square text", (0, 0), None, None),
    ("3:2 text", (24, 16), None, None),
    ("1:2 text", (8, 16), None, None),
    ("3:2 img2img", (0, 0), png_of(48, 32), None),  # the guides' 768 x 512, at 1/16
    ("2:3 inpaint", (0, 0), png_of(32, 48), png_of(32, 48, mask=True)),
    ("another 3:2 text", (24, 16), None, None),
]
EXPECTED_STAGE1 = [(16, 16), (24, 16), (8, 16), (24, 16), (16, 24), (24, 16)]  # (width, height)


def mixed_batch():
    return rows(
        [r[0] for r in ROWS],
        stage1_width=np.array([r[1][0] for r in ROWS]),
        stage1_height=np.array([r[1][1] for r in ROWS]),
        image=np.array([r[2] for r in ROWS], dtype=object),
        mask_image=np.array([r[3] for r in ROWS], dtype=object),
    )


def test_rows_of_every_shape_render_at_their_own_size_and_as_they_would_alone(cascade):
    out = cascade(mixed_batch())
    assert list(out["status"]) == ["ok"] * len(ROWS), out["error"]
    for i, (width, height) in enumerate(EXPECTED_STAGE1):
        assert out["upscale_image"][i].shape == (16 * height, 16 * width, 3), ROWS[i][0]
    for i in range(len(ROWS)):  # alone, in a batch of 1: the same pixels
        alone = cascade(take(mixed_batch(), [i]))
        np.testing.assert_array_equal(alone["upscale_image"][0], out["upscale_image"][i], err_msg=ROWS[i][0])


def test_img2img_sizes_are_diffusers_own_and_final_sizes_map_to_stage_one():
    assert init_image_size(768, 512, 64) == (96, 64) and init_image_size(512, 768, 64) == (64, 96)
    assert stage1_size(1536, 1024, "upscale")[:2] == (96, 64) and stage1_size(96, 64, "stage1")[:2] == (96, 64)
    problem = stage1_size(1000, 600, "upscale")[2]
    assert "1000x600 at upscale is 62.5x37.5 at stage I" in problem and "Nearest valid: 896x512 or 1024x640" in problem


def test_a_row_over_a_stage_size_limit_fails_with_the_sizes(tiny_manifest):
    m = tiny_manifest("stage1.max_pixels=200", "upscale.max_pixels=1000")
    embeds = np.zeros((1, 77, 32), dtype=np.float32)
    out = Stage1Worker(m.stage1)(rows(["a fox"], prompt_embeds=embeds, negative_prompt_embeds=embeds))
    assert out["status"][0] == "error" and "16x16 is 256 pixels, over stage1.max_pixels=200" in out["error"][0]
    low_res = {"stage2_image": np.zeros((1, 3, 16, 16), dtype=np.float32)}
    up = UpscaleWorker(m.upscale)(rows(["a fox"], **low_res))
    assert up["status"][0] == "error" and "64x64 is 4096 pixels, over upscale.max_pixels=1000" in up["error"][0]
