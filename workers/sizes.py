"""Image sizes through the cascade: stage I renders sides that are multiples of 8 (its UNet
halves them three times); stage II and the upscaler each enlarge 4x, keeping the aspect ratio.
A job or a row asks for its final size at `last_stage`; the stage I size follows from it."""

from __future__ import annotations

from dataclasses import dataclass

from workers.stages import MODEL_STAGES

STEP = 8  # stage I sides are multiples of this
SCALE = 4  # what stage II and the upscaler each multiply the sides by


def factor(last_stage: str) -> int:
    """How many times larger the final image is than stage I's (1, 4 or 16)."""
    return SCALE ** (MODEL_STAGES.index(last_stage) - MODEL_STAGES.index("stage1"))


def stage1_size(width: int, height: int, last_stage: str) -> tuple[int, int, str]:
    """(stage I width, height, problem) for a final size at `last_stage`."""
    f = factor(last_stage)
    unit = f * STEP
    if width % unit == 0 and height % unit == 0 and width > 0 and height > 0:
        return width // f, height // f, ""

    def around(v: int) -> tuple[int, int]:
        low = max(unit, v // unit * unit)
        return low, low + unit if low < v else low

    (w0, w1), (h0, h1) = around(width), around(height)
    nearest = sorted({(w0, h0), (w1, h1)})
    return (
        0,
        0,
        f"width/height: {width}x{height} at {last_stage} is {width / f:g}x{height / f:g} at stage I; expected sides "
        f"that are multiples of {unit} (stage I renders multiples of {STEP}, each later stage x{SCALE}). "
        f"Nearest valid: {' or '.join(f'{w}x{h}' for w, h in nearest)}",
    )


def init_image_size(width: int, height: int, sample_size: int) -> tuple[int, int]:
    """Where IF's img2img and inpainting pipelines resize an init image (diffusers'
    pipeline_if_img2img.resize): the short side becomes the UNet's sample size, the long side
    the nearest multiple of 8 that keeps the aspect ratio."""
    ratio = width / height
    if ratio >= 1:
        return int(round(sample_size / 8 * ratio) * 8), sample_size
    return sample_size, int(round(sample_size / 8 / ratio) * 8)


@dataclass(frozen=True)
class JobSize:
    """A job's final size for text-to-image rows (None: the checkpoints' own square size)."""

    width: int | None = None
    height: int | None = None
    last_stage: str = "upscale"


NATIVE = JobSize()
