"""The stage profiler: each stage's seconds per image and peak memory at a few batch sizes,
measured by running the real stage workers in this process, one stage after another.

The result is a profile for `ifrender plan --profile`: per stage, the numbers at the batch size
with the best seconds per image (among those measured) that fits.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from jobs.manifest import Manifest
from jobs.plan.costs import Profile, StageProfile
from workers.stages import STAGES

log = logging.getLogger(__name__)

PROMPTS = [
    "a red fox sitting in the snow at dawn",
    "an oil painting of a lighthouse in a storm",
    "a corgi riding a skateboard on the beach",
    "a bowl of ramen, studio lighting",
]


def prompt_rows(n: int) -> dict[str, np.ndarray]:
    """n rows as the reader hands them to the first stage: distinct prompts, seeds 0..n-1."""
    return {
        "id": np.array([f"p{i}" for i in range(n)], dtype=object),
        "prompt": np.array([f"{PROMPTS[i % len(PROMPTS)]} #{i}" for i in range(n)], dtype=object),
        "negative_prompt": np.array([""] * n, dtype=object),
        "seed": np.arange(n, dtype=np.int64),
        "status": np.array(["ok"] * n, dtype=object),
        "error": np.array([""] * n, dtype=object),
    }


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process high-water mark (CPU)


def profile_stages(manifest: Manifest, batch_sizes: list[int], repeats: int = 2) -> tuple[Profile, list[dict]]:
    """(the profile for planning, every measurement)."""
    import torch

    measurements = []
    for b in batch_sizes:
        batch = prompt_rows(b)
        for stage in manifest.stages():
            cfg = getattr(manifest, stage).model_copy(update={"micro_batch": b, "batch_size": b})
            worker = STAGES[stage].worker_class()(cfg)
            worker(batch)  # warm-up: kernels, allocator, lazy inits
            if worker.device.type == "cuda":
                torch.cuda.synchronize(worker.device)
                torch.cuda.reset_peak_memory_stats(worker.device)
            start = time.perf_counter()
            for _ in range(repeats):
                out = worker(batch)
            if worker.device.type == "cuda":
                torch.cuda.synchronize(worker.device)
            seconds = (time.perf_counter() - start) / repeats
            measurements.append(
                {
                    "stage": stage,
                    "batch_size": b,
                    "seconds_per_image": seconds / b,
                    "peak_gb": round(_peak_bytes(worker.device) / 2**30, 3),
                    "device": str(worker.device),
                }
            )
            log.info("profile: %s batch %d: %.4f s/image", stage, b, seconds / b)
            batch = out
            del worker
    stages = {}
    for stage in manifest.stages():
        mine = [m for m in measurements if m["stage"] == stage]
        best = min(mine, key=lambda m: m["seconds_per_image"])
        stages[stage] = StageProfile(best["seconds_per_image"], best["peak_gb"], best["batch_size"])
    device = measurements[0]["device"] if measurements else "none"
    if device.startswith("cuda"):
        device = torch.cuda.get_device_name(0)
    return Profile(f"measured by ifrender profile at batch sizes {batch_sizes}", device, stages), measurements
