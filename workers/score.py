"""score: the final image and its prompt in; per row `clip_score`, `aesthetic_score` and, with
score.embeddings, `clip_embedding` out. No payload column: the image goes on to the writer.

One CLIP model (ViT-L/14 by default) is loaded once per actor and serves both scores:
- clip_score is torchmetrics' CLIPScore: max(100 * cos(image embedding, text embedding), 0), the
  prompt tokenized by CLIP's own tokenizer (cut at its 77 tokens with the end token kept);
- aesthetic_score is LAION's aesthetic predictor v2: a stack of linear layers on the
  L2-normalised image embedding, about 1-10 (higher: rated more pleasing).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from workers.base import StageWorker
from workers.batch import Batch, pixels
from workers.stages import IMAGE_STAGES, STAGES

EMBEDDING = "clip_embedding"  # float16 bytes per row between the actors, a list<float16> column in the output


class AestheticHead(torch.nn.Module):
    """LAION's improved aesthetic predictor (v2), layer for layer as released (its dropouts do
    nothing at inference; it has no activations), so its state dict loads unchanged."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Scores of L2-normalised image embeddings (B, dim): (B,)."""
        return self.layers(embeds).squeeze(-1)

    @classmethod
    def load(cls, path: str) -> AestheticHead:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no pickled code runs
        head = cls(state["layers.0.weight"].shape[1])
        head.load_state_dict(state)
        return head.eval()


def newest_image(batch: Batch) -> str:
    """The batch's image column of the latest stage: the job's last image stage's, by the time
    the score stage runs (the stages before drop theirs)."""
    columns = [STAGES[s].image_column for s in IMAGE_STAGES]
    found = [c for c in columns if c in batch]
    if not found:
        raise KeyError(f"score: the batch has no image column (expected one of {columns})")
    return found[-1]


class ScoreWorker(StageWorker):
    stage = "score"

    def __init__(self, cfg: Any, drop: tuple[str, ...] = ()) -> None:
        from workers.models import aesthetic_weights, load_clip

        recorded = {"aesthetic_model": cfg.aesthetic_model, "embeddings": cfg.embeddings}
        super().__init__(cfg, recorded, drop)
        self.clip, self.processor = load_clip(cfg, self.device)
        self.head = AestheticHead.load(aesthetic_weights(cfg.aesthetic_model)).to(self.device)
        self.max_tokens = self.clip.config.text_config.max_position_embeddings
        self.report("loaded")

    def __call__(self, batch: Batch) -> Batch:
        self.image_column = newest_image(batch)
        return super().__call__(batch)

    def embed(self, images: list[np.ndarray], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised CLIP embeddings of (H, W, 3) uint8 images and of their prompts."""
        dtype = self.clip.dtype
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        # A fixed text length: every call has one shape, so a row's score does not depend on the
        # longest prompt beside it.
        text = self.processor(
            text=prompts, return_tensors="pt", padding="max_length", truncation=True, max_length=self.max_tokens
        )
        image = self.clip.get_image_features(pixel_values=pixel_values.to(self.device, dtype)).pooler_output
        words = self.clip.get_text_features(
            input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device)
        ).pooler_output
        image, words = image.float(), words.float()
        return image / image.norm(p=2, dim=-1, keepdim=True), words / words.norm(p=2, dim=-1, keepdim=True)

    @torch.inference_mode()
    def run(self, batch: Batch, rows: np.ndarray, settings: dict[str, Any]) -> Batch:
        images = [pixels(batch[self.image_column][r]) for r in rows]
        image, words = self.embed(images, [str(p) for p in batch["prompt"][rows]])
        clip_score = torch.clamp(100 * (image * words).sum(dim=-1), min=0)
        aesthetic = self.head(image)  # fp32, as the embeddings
        values = {
            "clip_score": clip_score.cpu().numpy().astype(np.float32),
            "aesthetic_score": aesthetic.cpu().numpy().astype(np.float32),
        }
        if self.cfg.embeddings:
            halves = image.to(torch.float16).cpu().numpy()
            values[EMBEDDING] = np.array([h.tobytes() for h in halves], dtype=object)
        return values

    def blank(self, batch: Batch, n: int) -> Batch:
        # NaN, not 0: the commit records a row the scorer did not score as null.
        values = {name: np.full(n, np.nan, dtype=np.float32) for name in ("clip_score", "aesthetic_score")}
        if self.cfg.embeddings:
            values[EMBEDDING] = np.full(n, b"", dtype=object)
        return values
