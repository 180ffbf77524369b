"""Stand-in stage workers for simulation: each holds its (logical) GPU share for the time its
stage takes per batch in a profile, and hands on tensors of the real sizes, so a cluster's
scheduling, pools, object store traffic and backpressure can be measured without the models.
What each stage produces and drops is the stage registry's (workers/stages.py)."""

from __future__ import annotations

import time

import numpy as np

from workers.stages import STAGES, drops

# The size of each payload column a stage produces, per row at full size.
SHAPES = {
    "prompt_embeds": ((77, 4096), np.float16),
    "negative_prompt_embeds": ((77, 4096), np.float16),
    "stage1_image": ((3, 64, 64), np.float32),
    "stage2_image": ((3, 256, 256), np.float32),
    "upscale_image": ((1024, 1024, 3), np.uint8),
}


class SimulatedStage:
    """`seconds_per_image` of one whole GPU; an actor with share f of a GPU takes 1/f as long
    (co-located actors time-slice the GPU), scaled by `time_scale`."""

    def __init__(self, stage: str, seconds_per_image: float, gpu_share: float, time_scale: float = 1.0) -> None:
        import os

        self.stage = stage
        self.drop = drops("upscale")[stage]
        self.seconds = seconds_per_image / gpu_share * time_scale
        self.pid = os.getpid()  # names the actor in the results: busy fraction per actor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        start = time.time()
        time.sleep(self.seconds * n)
        out = {k: v for k, v in batch.items() if k not in self.drop}
        for column in STAGES[self.stage].produces:
            shape, dtype = SHAPES[column]
            out[column] = np.zeros((n, *shape), dtype=dtype)
        out[f"{self.stage}_started"] = np.full(n, start)
        out[f"{self.stage}_finished"] = np.full(n, time.time())
        out[f"{self.stage}_actor"] = np.full(n, self.pid)
        return out


def sink(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The writer's place: the final image stops here, as it goes to storage, not to the driver."""
    return {k: v for k, v in batch.items() if k != STAGES["upscale"].image_column}
