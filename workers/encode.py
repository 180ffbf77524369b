"""encode: `prompt`, `negative_prompt` in; T5-XXL `prompt_embeds`, `negative_prompt_embeds` out,
plus `prompt_tokens` / `prompt_truncated` (what the model saw of the prompt: IF's encoder cuts it
at T5_TOKENS) and `encode_texts` / `encode_encoded` per row: what deduplication saved."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workers.base import StageWorker, to_numpy
from workers.batch import Batch
from workers.models import load_encode_pipeline

T5_TOKENS = 77  # IF's encode_prompt pads and truncates every text to this many tokens


def check_caption_cleaning() -> None:
    """diffusers quietly skips IF's caption cleaning without bs4 and ftfy: refuse instead."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    missing = [name for name, ok in (("beautifulsoup4", is_bs4_available()), ("ftfy", is_ftfy_available())) if not ok]
    if missing:
        raise RuntimeError(
            f"encode.clean_caption is on but {', '.join(missing)} is not installed, so IF's caption cleaning "
            f"would be skipped. Fix: pip install {' '.join(missing)}, or set encode.clean_caption=false."
        )


class EncodeWorker(StageWorker):
    stage = "encode"

    def __init__(self, cfg: Any, drop: tuple[str, ...] = ()) -> None:
        super().__init__(cfg, {"load_in_8bit": cfg.load_in_8bit, "clean_caption": cfg.clean_caption}, drop)
        if cfg.clean_caption:
            check_caption_cleaning()
        self.pipe = load_encode_pipeline(cfg, self.device)
        # The default negative prompt is "": encode it once per actor, not once per row.
        self.empty = self._encode([""] * cfg.micro_batch)[0]
        self.report("loaded")

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> np.ndarray:
        embeds, _ = self.pipe.encode_prompt(
            texts, do_classifier_free_guidance=False, device=self.device, clean_caption=self.cfg.clean_caption
        )
        return to_numpy(embeds)

    def _run_micro_batches(self, batch: Batch, rows: np.ndarray, settings: dict[str, Any]) -> Batch:
        return self.run(batch, rows, settings)  # run() makes its own fixed-shape encoder calls

    def run(self, batch: Batch, rows: np.ndarray, settings: dict[str, Any]) -> Batch:
        """Each distinct text of the batch (prompts and negatives together) is encoded once, in
        calls of exactly `micro_batch` texts (padded with ""), so a text's embedding never depends
        on its neighbours; "" comes from the actor's cached embedding."""
        prompts = [str(p) for p in batch["prompt"][rows]]
        negatives = [str(p or "") for p in batch["negative_prompt"][rows]]
        distinct = sorted({t for t in prompts + negatives if t})
        table = {"": self.empty}
        mb = self.micro_batch
        for i in range(0, len(distinct), mb):
            chunk = distinct[i : i + mb]
            table.update(zip(chunk, self._encode(chunk + [""] * (mb - len(chunk)))))
        n = len(rows)
        tokens = {t: self._tokens(t) for t in set(prompts)}
        return {
            "prompt_tokens": np.array([tokens[t] for t in prompts], dtype=np.int32),
            "prompt_truncated": np.array([tokens[t] > T5_TOKENS for t in prompts]),
            "prompt_embeds": np.stack([table[t] for t in prompts]),
            "negative_prompt_embeds": np.stack([table[t] for t in negatives]),
            "encode_texts": np.full(n, 2, dtype=np.int64),
            "encode_encoded": np.full(n, len(distinct) / n),
        }

    def _tokens(self, text: str) -> int:
        """The prompt's T5 tokens as IF's encode_prompt counts them (its caption cleaning first,
        the end-of-sequence token included), before it truncates them to T5_TOKENS."""
        cleaned = self.pipe._text_preprocessing(text, clean_caption=self.cfg.clean_caption)[0]
        return len(self.pipe.tokenizer(cleaned, add_special_tokens=True)["input_ids"])

    def blank(self, batch: Batch, n: int) -> Batch:
        return {
            "prompt_tokens": np.zeros(n, dtype=np.int32),
            "prompt_truncated": np.zeros(n, dtype=bool),
            "prompt_embeds": np.zeros((n, *self.empty.shape), dtype=self.empty.dtype),
            "negative_prompt_embeds": np.zeros((n, *self.empty.shape), dtype=self.empty.dtype),
            "encode_texts": np.zeros(n, dtype=np.int64),
            "encode_encoded": np.zeros(n),
        }
