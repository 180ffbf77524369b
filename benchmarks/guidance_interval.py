"""The guidance interval's saving per UNet stage, measured side by side in one run.

For each of stage1, stage2 and upscale: the same rows through the real stage worker at
guidance_interval [0, 1] (every step guided) and at a half interval [0, 0.5], same steps and
micro-batch, the two ways alternating on every repeat so a change in the machine's load falls on
both. The figure is the rows' own `<stage>_seconds` (the busy seconds the metadata records), the
median over repeats; beside it, the ratio the FLOP counts predict (2 / 1.5 UNet rows per step).

    .venv/bin/python benchmarks/guidance_interval.py [--preset bench] [--steps 20] [--rows 8] [--repeats 5]

Writes benchmarks/results/guidance-interval.json. The `bench` preset (the real block layouts at
widths where a step is compute, not Python) is the default; `tiny` is what the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from jobs.manifest import MANIFESTS_DIR, load_manifest
from jobs.run.preflight import resolve_tiny
from workers.encode import EncodeWorker
from workers.stage1 import Stage1Worker
from workers.stage2 import Stage2Worker
from workers.upscale import UpscaleWorker

WORKERS = {"stage1": Stage1Worker, "stage2": Stage2Worker, "upscale": UpscaleWorker}
WAYS = {"full [0, 1]": (0.0, 1.0), "half [0, 0.5]": (0.0, 0.5)}
PROMPTS = ["a red fox in the snow", "a lighthouse in a storm", "a corgi on a skateboard", "a bowl of ramen"]


def rows(n: int) -> dict[str, np.ndarray]:
    return {
        "id": np.array([f"r{i}" for i in range(n)], dtype=object),
        "prompt": np.array([PROMPTS[i % len(PROMPTS)] for i in range(n)], dtype=object),
        "negative_prompt": np.array([""] * n, dtype=object),
        "seed": np.arange(n, dtype=np.int64),
        "status": np.array(["ok"] * n, dtype=object),
        "error": np.array([""] * n, dtype=object),
    }


def measure(args: argparse.Namespace) -> dict:
    manifest_file = MANIFESTS_DIR / ("bench-tiny.yaml" if args.preset == "bench" else "local-tiny.yaml")
    steps = [f"{s}.num_inference_steps={args.steps}" for s in WORKERS]
    # groups=[]: each stage its own worker here, as in a pool per stage (local-tiny runs one replica)
    manifest = resolve_tiny(load_manifest(manifest_file, [*steps, "score.enabled=false", "groups=[]"]))
    n = args.rows
    batch = EncodeWorker(manifest.encode.model_copy(update={"micro_batch": n}))(rows(n))
    result: dict = {
        "preset": args.preset,
        "steps": args.steps,
        "rows": n,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "stages": {},
    }
    for stage, cls in WORKERS.items():
        cfg = getattr(manifest, stage).model_copy(update={"micro_batch": n, "batch_size": n})
        workers = {way: cls(cfg.model_copy(update={"guidance_interval": interval})) for way, interval in WAYS.items()}
        seconds: dict[str, list[float]] = {way: [] for way in WAYS}
        load = [os.getloadavg()[0]]
        out = None
        for _ in range(args.repeats + 1):  # the first round warms both up and is not counted
            for way, worker in workers.items():
                out = worker(dict(batch))
                seconds[way].append(float(np.mean(out[f"{stage}_seconds"])))
        load.append(os.getloadavg()[0])
        per_row = {way: statistics.median(s[1:]) for way, s in seconds.items()}
        full, half = per_row["full [0, 1]"], per_row["half [0, 0.5]"]
        result["stages"][stage] = {
            "seconds_per_row": per_row,
            "every_repeat": {way: s[1:] for way, s in seconds.items()},
            "measured_ratio": round(full / half, 3),
            "flop_ratio": round(2 / 1.5, 3),
            "load_average": load,
        }
        print(
            f"{stage:8s} full {full:.4f} s/row, half {half:.4f} s/row: {full / half:.2f}x fewer busy seconds "
            f"(FLOP counts: {2 / 1.5:.2f}x); load {load[0]:.1f} -> {load[1]:.1f}",
            flush=True,
        )
        batch = out  # the next stage's input: this stage's images at the half interval
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=8)  # production.yaml's micro_batch for stages I and II
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "guidance-interval.json"))
    args = parser.parse_args()
    started = time.time()
    result = measure(args)
    result["seconds"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
