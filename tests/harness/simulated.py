"""Stand-in workers for simulation: an actor of a pool (one stage, a fused group, or a whole
replica) that takes, per image, each of its stages' profiled seconds of one whole GPU, and hands
on tensors of the real sizes, so a cluster's scheduling, pools, object store traffic and
backpressure can be measured without the models. What each stage produces and drops is the
stage registry's (workers/stages.py).

The GPU is time-sliced as a real one is without MPS: the busy stand-ins on one logical GPU
share its time equally (each progresses at 1/k of the GPU's speed while k are busy, times the
profile's time-slicing efficiency), and an idle one gives its time away. Ray's share labels
decide only which stand-ins meet on a GPU.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from workers.stages import STAGES, drops, stages_to

# The size of each payload column a stage produces, per row at full size.
SHAPES = {
    "prompt_embeds": ((77, 4096), np.float16),
    "negative_prompt_embeds": ((77, 4096), np.float16),
    "stage1_image": ((3, 64, 64), np.float16),
    "stage2_image": ((3, 256, 256), np.float16),
    "upscale_image": ((1024, 1024, 3), np.uint8),
}
TICK = 0.004  # seconds between looks at who else is busy on the GPU


class TimeSlicedGPU:
    """The logical GPU(s) Ray gave this process, shared with the other stand-ins on them through
    one directory per GPU that holds a file per busy process."""

    def __init__(self, root: str, efficiency: float) -> None:
        import ray

        ids = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        self.dirs = [Path(root) / f"gpu-{g}" for g in ids]
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
        self.efficiency = efficiency
        self.me = str(os.getpid())

    def run(self, seconds: float) -> None:
        """Take `seconds` of the whole GPU's time, at the pace its other busy users allow."""
        if not self.dirs:  # no GPU: a CPU stand-in runs at its own pace
            time.sleep(seconds)
            return
        for d in self.dirs:
            (d / self.me).touch()
        try:
            done, last = 0.0, time.monotonic()
            while done < seconds:
                busy = max(len(os.listdir(d)) for d in self.dirs)
                pace = 1.0 if busy == 1 else self.efficiency / busy
                time.sleep(min(TICK, (seconds - done) / pace))
                now = time.monotonic()  # the time that passed, not the time asked for: sleeps overrun
                done += (now - last) * pace
                last = now
        finally:
            for d in self.dirs:
                (d / self.me).unlink(missing_ok=True)


class SimulatedPool:
    """An actor of a pool running `stages` in turn: `seconds_per_image[stage]` of one whole GPU
    each, scaled by `time_scale`."""

    def __init__(
        self,
        stages: list[str],
        seconds_per_image: dict[str, float],
        last_stage: str,
        gpu_root: str,
        time_scale: float = 1.0,
        efficiency: float = 1.0,
    ) -> None:
        self.stages = stages
        self.drop = drops(stages_to(last_stage))
        self.seconds = {s: seconds_per_image[s] * time_scale for s in stages}
        self.gpu = TimeSlicedGPU(gpu_root, efficiency)
        self.pid = os.getpid()  # names the actor in the results: busy fraction per actor

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        out = dict(batch)
        for stage in self.stages:
            start = time.time()
            self.gpu.run(self.seconds[stage] * n)
            out = {k: v for k, v in out.items() if k not in self.drop[stage]}
            for column in STAGES[stage].produces:
                if column not in self.drop[stage]:
                    shape, dtype = SHAPES[column]
                    out[column] = np.zeros((n, *shape), dtype=dtype)
            out[f"{stage}_started"] = np.full(n, start)
            out[f"{stage}_finished"] = np.full(n, time.time())
            out[f"{stage}_actor"] = np.full(n, self.pid)
        return out


def sink(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The writer's place: the final image stops here, as it goes to storage, not to the driver."""
    return {k: v for k, v in batch.items() if k != STAGES["upscale"].image_column}
