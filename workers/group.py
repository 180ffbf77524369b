"""A group of model stages fused into one actor: every stage of the group loaded in this process,
each batch taken through them in turn. One actor holding the whole cascade is a replica.

Each stage runs as its own worker would in a pool of its own (same micro-batches, seeds and
columns), so a row's pixels do not depend on the layout.
"""

from __future__ import annotations

from typing import Any

from workers.batch import Batch
from workers.stages import STAGES


class GroupWorker:
    def __init__(self, stages: list[dict[str, Any]]) -> None:
        """`stages`: per stage in cascade order, {"stage", "cfg", "drop"} and, for the job's last
        stage, "safety"."""
        self.workers = [
            STAGES[s["stage"]].worker_class()(**{k: v for k, v in s.items() if k != "stage"}) for s in stages
        ]

    def __call__(self, batch: Batch) -> Batch:
        for worker in self.workers:
            batch = worker(batch)
        return batch
