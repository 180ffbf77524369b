"""The last image stage's finish, as the IF pipelines do it for PIL output: IF's safety checker
(a CLIP vision model with NSFW and watermark heads) and IF's watermarker, from the IF-I repo.
Whichever stage is last calls `Safety.finish` on its images. Verdicts are recorded per row; a
flagged image is blanked (the pipelines' behaviour) or fails its row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from workers.batch import to_uint8_hwc
from workers.errors import ModelLoadError


def load_checker(cls: Any, source: str) -> Any:
    """IFSafetyChecker by hand: its from_pretrained fails under transformers 5 (the class never
    calls post_init), so build it from its config and load the weights file ourselves."""
    from pathlib import Path

    from transformers import CLIPConfig

    folder = Path(source) / "safety_checker"
    config = CLIPConfig.from_pretrained(folder, local_files_only=True)
    model = cls(config)
    for name in ("model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin"):
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
            if missing:
                raise ValueError(f"{path}: weights missing for {sorted(missing)[:5]}")
            return model
    raise OSError(f"no weights file in {folder}")


@dataclass
class Safety:
    cfg: Any
    device: torch.device
    checker: Any = None
    processor: Any = None
    watermarker: Any = None

    @classmethod
    def load(cls, cfg: Any, device: torch.device) -> Safety:
        """Components from `cfg.model`; with auto, those the checkpoint lacks are left out."""
        from diffusers.pipelines.deepfloyd_if.safety_checker import IFSafetyChecker
        from diffusers.pipelines.deepfloyd_if.watermark import IFWatermarker
        from transformers import CLIPImageProcessor

        from workers.models import local_source, quiet_progress_bars

        quiet_progress_bars()
        source = local_source(cfg.model)
        found = cls(cfg, device)

        def load(want: bool | str, what: str, loader):
            if want is False:
                return None
            try:
                return loader()
            except (OSError, ValueError) as err:
                if want == "auto":
                    return None
                raise ModelLoadError(
                    f"safety.{what}: {cfg.model} has no usable {what} ({err}). Fix: point safety.model at the "
                    f"IF-I checkpoint (it carries safety_checker/, feature_extractor/, watermarker/), or set "
                    f"safety.{'checker' if what != 'watermarker' else 'watermark'}: false."
                ) from err

        kw = dict(local_files_only=True)
        found.checker = load(cfg.checker, "safety_checker", lambda: load_checker(IFSafetyChecker, source))
        if found.checker is not None:
            found.checker = found.checker.to(device).eval()
            found.processor = load(
                cfg.checker,
                "feature_extractor",
                lambda: CLIPImageProcessor.from_pretrained(source, subfolder="feature_extractor", **kw),
            )
        found.watermarker = load(
            cfg.watermark, "watermarker", lambda: IFWatermarker.from_pretrained(source, subfolder="watermarker", **kw)
        )
        return found

    def blank(self, n: int) -> dict[str, np.ndarray]:
        return {
            "nsfw_detected": np.full(n, None, dtype=object),
            "watermark_detected": np.full(n, None, dtype=object),
            "nsfw_score": np.full(n, np.nan, dtype=np.float32),
            "watermark_score": np.full(n, np.nan, dtype=np.float32),
            "watermarked": np.zeros(n, dtype=bool),
        }

    @torch.inference_mode()
    def finish(self, values: dict[str, np.ndarray], column: str) -> dict[str, np.ndarray]:
        images = values[column]
        as_float = images.dtype != np.uint8  # stage I/II: (B, 3, H, W) in [-1, 1]
        pixels = to_uint8_hwc(images) if as_float else images.copy()
        n = len(pixels)
        out = self.blank(n)
        flagged = [""] * n
        if self.checker is not None and self.processor is not None:
            pil = [Image.fromarray(p) for p in pixels]
            clip_input = self.processor(pil, return_tensors="pt").pixel_values
            clip_input = clip_input.to(self.device, next(self.checker.parameters()).dtype)
            # IFSafetyChecker.forward, with its heads' values kept: they are the scores its
            # thresholds apply to (compared as they are, no sigmoid), so a row can be filtered
            # at any threshold later.
            embeds = self.checker.vision_model(clip_input)[0]
            p_score = self.checker.p_head(embeds).flatten().float().cpu().numpy()
            w_score = self.checker.w_head(embeds).flatten().float().cpu().numpy()
            nsfw = (p_score > self.cfg.nsfw_threshold).tolist()
            marked = (w_score > self.cfg.watermark_threshold).tolist()
            out["nsfw_score"][:], out["watermark_score"][:] = p_score, w_score
            out["nsfw_detected"][:] = [bool(x) for x in nsfw]
            out["watermark_detected"][:] = [bool(x) for x in marked]
            for i, (a, b) in enumerate(zip(nsfw, marked)):
                if a or b:
                    reason = " and ".join(r for r, hit in (("NSFW", a), ("watermark", b)) if hit)
                    flagged[i] = f"safety checker: {reason} detected (on_flagged=error)"
                    pixels[i] = 0  # blanked as the IF pipelines return it
        # IF's mark is 62 px at 1024x1024, scaled with the image: below ~17 px it would vanish
        # (and PIL refuses a 0 px resize), so images that small stay unmarked, and say so.
        if self.watermarker is not None and int(62 * (pixels.shape[1] * pixels.shape[2]) ** 0.5 / 1024) >= 1:
            pil = [Image.fromarray(p) for p in pixels]
            self.watermarker.apply_watermark(pil)
            pixels = np.stack([np.asarray(p) for p in pil])
            out["watermarked"][:] = True
        if as_float:
            pixels = pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255 * 2 - 1
        values = dict(values) | out | {column: pixels.astype(images.dtype)}
        if self.cfg.on_flagged == "error":
            values["flagged"] = np.array(flagged, dtype=object)
        return values
