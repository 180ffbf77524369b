"""encode: `prompt`, `negative_prompt` in; T5-XXL `prompt_embeds`, `negative_prompt_embeds` out."""

from __future__ import annotations

import numpy as np
import torch

from workers.common import Batch, StageWorker, to_numpy
from workers.models import load_encode_pipeline


class EncodeWorker(StageWorker):
    stage = "encode"
    needs = ("prompt", "negative_prompt")

    def __init__(self, cfg, drop: tuple[str, ...] = ()) -> None:
        super().__init__(cfg, {"load_in_8bit": cfg.load_in_8bit, "clean_caption": cfg.clean_caption}, drop)
        self.pipe = load_encode_pipeline(cfg, self.device)
        # The default negative prompt is "": encode it once per actor, not once per row.
        self.empty = self._encode([""])[0]
        self.shape = self.empty.shape

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> np.ndarray:
        embeds, _ = self.pipe.encode_prompt(
            texts, do_classifier_free_guidance=False, device=self.device, clean_caption=self.cfg.clean_caption
        )
        return to_numpy(embeds)

    def _encode_unique(self, texts: list[str]) -> np.ndarray:
        """Encode each distinct text once; "" comes from the cached embedding. The encoder always
        sees `micro_batch` texts (padded with ""), one shape whatever the mix of prompts."""
        distinct = sorted({t for t in texts if t})
        padded = distinct + [""] * (self.micro_batch - len(distinct))
        table = dict(zip(distinct, self._encode(padded))) if distinct else {}
        table[""] = self.empty
        return np.stack([table[t] for t in texts])

    def run(self, batch: Batch, rows: np.ndarray) -> Batch:
        prompts = [str(p) for p in batch["prompt"][rows]]
        negatives = [str(p or "") for p in batch["negative_prompt"][rows]]
        return {
            "prompt_embeds": self._encode_unique(prompts),
            "negative_prompt_embeds": self._encode_unique(negatives),
        }

    def blank(self, batch: Batch, n: int) -> Batch:
        return {
            name: np.zeros((n, *self.shape), dtype=self.empty.dtype)
            for name in ("prompt_embeds", "negative_prompt_embeds")
        }
