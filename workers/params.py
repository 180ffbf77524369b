"""Per-row generation settings: the columns a row may carry to override the job's, checked by the
reader (a bad value fails its row) and merged by each stage worker.

A row's overrides travel as one JSON column, `params`. Stage settings are named STAGE_FIELD
(stage1_guidance_scale, stage2_noise_level, upscale_num_inference_steps, ...); `strength`
applies to stages I and II, `num_images` expands the row.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jobs.manifest import TIMESTEP_PRESETS

MAX_IMAGES = 64  # per row; also the stride of item keys (row * MAX_IMAGES + image index)

Preset = Literal[TIMESTEP_PRESETS]  # type: ignore[valid-type]


class RowOverrides(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_images: int | None = Field(None, ge=1, le=MAX_IMAGES)
    strength: float | None = Field(None, gt=0, le=1)
    stage1_guidance_scale: float | None = Field(None, ge=0, le=100)
    stage1_num_inference_steps: int | None = Field(None, ge=1, le=1000)
    stage1_timesteps: Preset | None = None
    stage1_strength: float | None = Field(None, gt=0, le=1)
    stage2_guidance_scale: float | None = Field(None, ge=0, le=100)
    stage2_num_inference_steps: int | None = Field(None, ge=1, le=1000)
    stage2_timesteps: Preset | None = None
    stage2_noise_level: int | None = Field(None, ge=0, le=1000)
    stage2_strength: float | None = Field(None, gt=0, le=1)
    upscale_guidance_scale: float | None = Field(None, ge=0, le=100)
    upscale_num_inference_steps: int | None = Field(None, ge=1, le=1000)
    upscale_noise_level: int | None = Field(None, ge=0, le=350)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        if isinstance(value, bool):  # True is not a step count
            raise ValueError("expected a number, found a boolean")
        return value


OVERRIDE_COLUMNS = tuple(RowOverrides.model_fields)
STAGE_PREFIXES = ("stage1_", "stage2_", "upscale_")


def parse_overrides(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the row's overrides, problems) from a record's columns; empty values mean 'job default'."""
    given = {k: v for k, v in record.items() if k in OVERRIDE_COLUMNS and v is not None and v != ""}
    problems = [
        f"{k}: unknown per-row setting; expected one of {', '.join(c for c in OVERRIDE_COLUMNS if c.startswith(k.split('_')[0]))}"
        for k in record
        if k.startswith(STAGE_PREFIXES) and k not in OVERRIDE_COLUMNS
    ]
    try:
        parsed = RowOverrides.model_validate(given).model_dump(exclude_none=True)
    except ValidationError as err:
        for e in err.errors():
            field = ".".join(str(p) for p in e["loc"])
            problems.append(f"{field}: {e['msg']} (found {e.get('input')!r})")
        parsed = {}
    return parsed, problems


def stage_params(stage: str, cfg: Any, row_params: str | None, mode: str) -> dict[str, Any]:
    """A stage's effective settings for one row: the job's, overridden by the row's."""
    row = json.loads(row_params) if row_params else {}
    names = {
        "stage1": ("num_inference_steps", "timesteps", "guidance_scale", "strength"),
        "stage2": ("num_inference_steps", "timesteps", "guidance_scale", "noise_level", "strength"),
        "upscale": ("num_inference_steps", "guidance_scale", "noise_level"),
    }[stage]
    params: dict[str, Any] = {"mode": mode}
    for name in names:
        value = row.get(f"{stage}_{name}", getattr(cfg, name))
        if name == "strength":
            if mode == "text2img":
                continue  # text-to-image has no strength
            value = row.get(f"{stage}_strength", row.get("strength", getattr(cfg, name)))
            if value is None:
                value = DEFAULT_STRENGTH[(stage, mode)]
        params[name] = value
    if params.get("timesteps") is not None:
        params.pop("num_inference_steps")  # a preset fixes the steps
    return params


# diffusers' defaults, recorded explicitly so the metadata says what ran.
DEFAULT_STRENGTH = {
    ("stage1", "img2img"): 0.7,
    ("stage1", "inpaint"): 1.0,
    ("stage2", "img2img"): 0.8,
    ("stage2", "inpaint"): 0.8,
}


def row_mode(image: Any, mask: Any) -> str:
    """text2img, img2img or inpaint from a row's image bytes (absent values may arrive as None,
    empty bytes or NaN after a trip through Arrow)."""

    def present(value: Any) -> bool:
        return isinstance(value, (bytes, bytearray)) and len(value) > 0

    if not present(image):
        return "text2img"
    return "inpaint" if present(mask) else "img2img"
