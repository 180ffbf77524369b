"""The libraries' known warnings that say nothing to an ifrender user, each named with why, and
dropped where it is logged (a filter on its own logger): every other warning still shows, and
--verbose (IFRENDER_VERBOSE=1, which a run's workers inherit) shows these too.

Installing the filters imports none of the libraries, so it runs first in every process that
imports `workers` (an actor, the driver), before the import that would warn."""

from __future__ import annotations

import logging
import os

VERBOSE = "IFRENDER_VERBOSE"

_IF_PIPELINES = ("pipeline_if", "pipeline_if_superresolution", "pipeline_if_img2img",
                 "pipeline_if_img2img_superresolution", "pipeline_if_inpainting",
                 "pipeline_if_inpainting_superresolution")  # fmt: skip

# (logger, the message's start, why it is noise here)
NOISE: tuple[tuple[str, str, str], ...] = (
    (
        (
            "transformers.utils.import_utils",
            "`CLIPImageProcessor` requires torchvision",
            "IF's pipelines import CLIP's image processor; ifrender's images need no torchvision, the PIL one serves",
        ),
        (
            "bitsandbytes.backends.cpu.ops",
            "Failed to load CPU gemm_4bit_forward",
            "an optional CPU kernel for 4-bit weights; ifrender's T5 is 8-bit or unquantised",
        ),
    )
    + tuple(
        (
            f"diffusers.pipelines.deepfloyd_if.{module}",
            "You have disabled the safety checker",
            "ifrender runs IF's safety checker itself (safety.*) and states the licence once at the start",
        )
        for module in _IF_PIPELINES
    )
    + (
        (
            "diffusers.pipelines.deepfloyd_if.pipeline_if",
            "The following part of your input was truncated",
            "each row records prompt_tokens and prompt_truncated, and the summary counts them",
        ),
    )
)


class _Drop(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def quiet_known_noise() -> None:
    """Install NOISE's filters (once per process), unless IFRENDER_VERBOSE=1."""
    if os.environ.get(VERBOSE) == "1":
        return
    for name, start, _why in NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.start == start for f in logger.filters):
            logger.addFilter(_Drop(start))
