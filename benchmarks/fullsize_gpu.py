"""Full size on one GPU: the real architectures (jobs/perf/models.py's `full` preset, from the
reference configs) with random weights in fp16, no hub. Measures, in one run:

1. each stage's seconds per image and peak memory against batch size (`ifrender profile`);
2. end-to-end images/hour at 1024 px through the Ray pipeline and the sequential baseline
   (`ifrender bench`, same prompts, steps and batches);
3. model FLOP utilisation: achieved TFLOP/s from the FLOP counts of the steps used, against the
   GPU's peak dense fp16 TFLOP/s;

then feeds the measured profile to the planner and the simulation.

    python benchmarks/fullsize_gpu.py --root /tmp/ifrender-full [--images 128] [--peak-tflops 989]

Writes benchmarks/results/fullsize-*.json and prints the numbers for docs/benchmarks.md.
`--dry-run` goes through every step on a CPU with the tiny models (fp32, logical GPU shares, a
short simulation) and writes under /tmp/ifrender-dry-run instead: it checks the script, not
the numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def ifrender(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True)
    print(result.stdout)
    if result.returncode:
        raise SystemExit(result.stderr[-4000:])
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/tmp/ifrender-full")
    parser.add_argument("--images", type=int, default=128, help="per way; 4 of production's encode batches")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense fp16 TFLOP/s of the GPU (H100 SXM: 989)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--dry-run", action="store_true", help="every step on a CPU with the tiny models")
    args = parser.parse_args()

    import torch

    from jobs.perf.models import build_models

    if args.dry_run:
        from jobs.preflight import tiny_models_dir

        gpu, memory_gb, device, dtype = "cpu (dry run)", 80.0, "cpu", "fp32"
        repos = build_models(tiny_models_dir())
        out, docs = Path("/tmp/ifrender-dry-run"), Path("/tmp/ifrender-dry-run")
        args.batch_sizes, args.images = args.batch_sizes[:2], 12
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --dry-run)"
        gpu, device, dtype = torch.cuda.get_device_name(0), "cuda", "fp16"
        memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30
        started = time.time()
        repos = build_models(Path(args.root), preset="full")
        print(f"models ready in {time.time() - started:.0f} s on {gpu} ({memory_gb:.0f} GB)")
        out, docs = REPO / "benchmarks" / "results", REPO / "docs"
    out.mkdir(parents=True, exist_ok=True)

    # One GPU shared by the four pools; fp16 weights; safety off (random checkpoints carry none).
    sets = ["ray.num_gpus=1", "safety.checker=false", "safety.watermark=false", "contact_sheets=false"]
    shares = {"encode": 0.1, "stage1": 0.4, "stage2": 0.2, "upscale": 0.3}
    for stage, repo in (("encode", "stage1"), ("stage1", "stage1"), ("stage2", "stage2"), ("upscale", "upscale")):
        sets += [
            f"{stage}.model={repos[repo]}",
            f"{stage}.dtype={dtype}",
            f"{stage}.device={device}",
            f"{stage}.num_gpus={shares[stage]}",
            f"{stage}.pool_size=1",
        ]
        if not args.dry_run:
            sets.append(f"{stage}.variant=fp16")
    if args.dry_run:  # checks the steps, not the numbers: two denoising steps, batches of 4
        sets += [f"{s}.num_inference_steps=2" for s in ("stage1", "stage2", "upscale")]
        sets += [f"{s}.{k}=4" for s in ("encode", "stage1", "stage2", "upscale") for k in ("batch_size", "micro_batch")]
    overrides = [a for s in sets for a in ("--set", s)]
    manifest = str(REPO / "manifests" / "production.yaml")

    # 1. Per-stage throughput and memory against batch size.
    profile = out / "fullsize-profile.json"
    ifrender("profile", manifest, *overrides, "--batch-sizes", *map(str, args.batch_sizes), "--out", str(profile))

    # 2. Pipeline against the sequential baseline, same run.
    bench = out / "fullsize-bench.json"
    ifrender(
        "bench",
        manifest,
        *overrides,
        "--images",
        str(args.images),
        "--out",
        str(bench),
        "--workdir",
        str(out / "bench"),
    )
    result = json.loads(bench.read_text())

    # 3. Utilisation against the FLOP counts of the steps used.
    from jobs.manifest import load_manifest
    from jobs.perf.plan import flops_profile

    m = load_manifest(manifest, sets)
    tflop_per_image = sum(p.seconds_per_image for p in flops_profile(m, 1.0, 1.0).stages.values())
    for way in ("pipeline", "sequential"):
        rate = result[way]["images_per_second"]
        result[way]["images_per_hour"] = round(rate * 3600)
        result[way]["mfu"] = round(rate * tflop_per_image / args.peak_tflops, 3)
    result |= {"gpu": gpu, "tflop_per_image": round(tflop_per_image, 1), "peak_tflops": args.peak_tflops}
    bench.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("gpu", "tflop_per_image", "ratio")}, indent=1))
    for way in ("pipeline", "sequential"):
        print(f"{way}: {result[way]['images_per_hour']} images/hour, MFU {result[way]['mfu']:.1%}")

    # 4. The measured profile into the planner and the simulation.
    ifrender("plan", manifest, "--gpus", "8", "--gpu-memory", f"{memory_gb:.0f}", "--profile", str(profile))
    sweep = ["--gpus", "1", "--images", "24"] if args.dry_run else []
    subprocess.run(
        [sys.executable, "benchmarks/simulate.py", "--profile", str(profile), "--gpu-memory", f"{memory_gb:.0f}",
         "--out", str(out / "simulation-measured.json"), "--plot", str(docs / "simulation-measured.png"), *sweep],
        cwd=REPO, check=True,
    )  # fmt: skip


if __name__ == "__main__":
    main()
