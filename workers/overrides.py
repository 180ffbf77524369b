"""Per-row overrides: the columns a row may carry to change the job's settings for itself.

Names and bounds come from the stage configs (`ROW_SETTINGS` in workers/config.py): a row's
`stage1_guidance_scale` is checked exactly as the manifest's `stage1.guidance_scale` is. The
reader validates them (a bad value fails its row) and hands them on as one JSON column,
`overrides`; each stage merges them into its *effective settings* for the row, which it records
in the `<stage>_params` column.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic.fields import FieldInfo

from workers.config import Stage1Config, Stage2Config, UpscaleConfig
from workers.keys import MAX_IMAGES

# The stages whose settings a row may override, by their column prefix.
STAGE_CONFIGS = {"stage1": Stage1Config, "stage2": Stage2Config, "upscale": UpscaleConfig}
STAGE_PREFIXES = tuple(f"{stage}_" for stage in STAGE_CONFIGS)

# diffusers' defaults, recorded explicitly so the metadata says what ran.
DEFAULT_STRENGTH = {
    ("stage1", "img2img"): 0.7,
    ("stage1", "inpaint"): 1.0,
    ("stage2", "img2img"): 0.8,
    ("stage2", "inpaint"): 0.8,
}


class _RowBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools(cls, value: Any) -> Any:
        if isinstance(value, bool):  # True is not a step count
            raise ValueError("expected a number, found a boolean")
        return value


def _optional(field) -> tuple[Any, Any]:
    """A stage config field as an optional row column with the same type and bounds."""
    return field.annotation | None, FieldInfo.merge_field_infos(field, default=None)


def _row_model() -> type[BaseModel]:
    fields: dict[str, tuple[Any, Any]] = {
        "num_images": (int | None, Field(None, ge=1, le=MAX_IMAGES)),
        # The row's final size at last_stage (text-to-image rows; workers/sizes.py).
        "width": (int | None, Field(None, ge=8, le=16384)),
        "height": (int | None, Field(None, ge=8, le=16384)),
        # One strength for both IF stages; stage1_strength / stage2_strength win over it.
        "strength": (float | None, Field(None, gt=0, le=1)),
    }
    for stage, cfg in STAGE_CONFIGS.items():
        for name in cfg.ROW_SETTINGS:
            fields[f"{stage}_{name}"] = _optional(cfg.model_fields[name])
    return create_model("RowOverrides", __base__=_RowBase, **fields)


RowOverrides = _row_model()
OVERRIDE_COLUMNS = tuple(RowOverrides.model_fields)


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


def effective_settings(stage: str, cfg: Any, overrides: str | None, mode: str) -> dict[str, Any]:
    """A stage's settings for one row: the job's, overridden by the row's `overrides` JSON."""
    row = json.loads(overrides) if overrides else {}
    settings: dict[str, Any] = {"mode": mode}
    for name in STAGE_CONFIGS[stage].ROW_SETTINGS:
        value = row.get(f"{stage}_{name}", getattr(cfg, name))
        if name == "strength":
            if mode == "text2img":
                continue  # text-to-image has no strength
            value = row.get(f"{stage}_strength", row.get("strength", getattr(cfg, name)))
            if value is None:
                value = DEFAULT_STRENGTH[(stage, mode)]
        settings[name] = value
    if settings.get("timesteps") is not None:
        settings.pop("num_inference_steps")  # a preset fixes the steps
    return settings


def row_mode(image: Any, mask: Any) -> str:
    """text2img, img2img or inpaint from a row's image bytes (absent values may arrive as None,
    empty bytes or NaN after a trip through Arrow)."""

    def present(value: Any) -> bool:
        return isinstance(value, (bytes, bytearray)) and len(value) > 0

    if not present(image):
        return "text2img"
    return "inpaint" if present(mask) else "img2img"
