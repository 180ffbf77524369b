"""The GPU probe: what one GPU does with the full-size cascade, measured without Ray.

The models are built from the reference configs (jobs/perf/configs) straight on the GPU in fp16:
random weights, no CPU initialisation, no checkpoint files to fetch. Each section writes its
numbers to OUT/gpu-probe.json as soon as it ends, so a call cut short keeps what it measured:

  ceilings    the device's matmul (bf16, fp16) and device-to-device copy rates
  unets       each UNet's ms per denoising step (guidance doubles the batch), and per step outside
              a guidance interval (the conditional half alone), and MFU across batch sizes, NCHW
              against channels_last
  vae         the upscaler's 1024 px decode in fp32, bf16 and fp16 (finite or not), per attention
              backend, with peak memory
  t5          T5-XXL encoding of a 77-token batch
  host        the host's cost per scheduler step: noise drawn on the CPU per row, as the stages
              do, against none
  workers     the real stage workers (workers/) end to end at two step counts: fixed cost and cost
              per step, so seconds per image at the manifest's steps, and at guidance_interval
              [0, 0.5] side by side; checkpoints saved to local disk
  sharing     two processes on one GPU, each alone and both together: the GPU time-sliced or shared
  profile     the measured profile for `ifrender plan --profile` and the simulation

    python benchmarks/gpu_probe.py                # one call: every section but compile
    python benchmarks/gpu_probe.py --compile      # a second call: torch.compile, cold and warm cache
    python benchmarks/gpu_probe.py --dry-run      # the tiny models on a CPU: checks the script

On the device machine (no Ray, diffusers or pydantic there): `bash benchmarks/gpu_probe_wheels.sh`
here first, then carry `.whl` (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# IF-I at 64 px, IF-II at 256 px, the x4 UNet at a 256 px latent: batch-1 forward FLOPs.
from jobs.plan.costs import FORWARD_TFLOP, VAE_DECODE_TFLOP, step_costs  # noqa: E402

UNETS = ("stage1", "stage2", "upscale")


class Probe:
    """The results so far, written out after every section."""

    def __init__(self, path: Path, dry_run: bool) -> None:
        self.path = path
        self.results: dict = {"dry_run": dry_run, "sections": {}}
        path.parent.mkdir(parents=True, exist_ok=True)

    def section(self, name: str, fn, *args) -> dict | None:
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            out = fn(*args)
        except Exception as err:  # noqa: BLE001 - one broken section must not cost the others
            out = {"error": f"{type(err).__name__}: {err}"}
        out["seconds"] = round(time.perf_counter() - started, 1)
        self.results["sections"][name] = out
        self.path.write_text(json.dumps(self.results, indent=1))
        print(json.dumps(out)[:2000], flush=True)
        return out


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Seconds per call, after warm-up, timed with CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats
    torch.cuda.synchronize(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / 1000 / repeats


def peak_gb(device: torch.device) -> float:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class Setup:
    def __init__(self, dry_run: bool) -> None:
        self.dry_run = dry_run
        self.preset = "tiny" if dry_run else "full"
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.dtype = torch.float32 if dry_run else torch.float16
        self.batches = [1, 2] if dry_run else [1, 2, 4, 8]
        self.repeats = 1 if dry_run else 10
        self.steps = (2, 3) if dry_run else (10, 20)

    def build(self, fn, *args):
        """A model built straight on the device in the probe's dtype (no CPU copy)."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                return fn(*args)
        finally:
            torch.set_default_dtype(previous)


def ceilings(s: Setup) -> dict:
    n = 512 if s.dry_run else 8192
    out = {"device": torch.cuda.get_device_name(0) if s.device.type == "cuda" else "cpu", "torch": torch.__version__}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        a = torch.randn(n, n, device=s.device, dtype=dtype)
        b = torch.randn(n, n, device=s.device, dtype=dtype)
        seconds = timed(lambda a=a, b=b: a @ b, s.device, s.repeats, warmup=3)
        out[f"matmul_{name}_tflops"] = round(2 * n**3 / seconds / 1e12, 1)
    x = torch.empty(2**28 if not s.dry_run else 2**20, device=s.device, dtype=torch.float32)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), s.device, s.repeats, warmup=3)
    out["copy_tb_per_s"] = round(2 * x.numel() * 4 / seconds / 1e12, 3)  # bytes read and written
    if s.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        out |= {"memory_gb": round(props.total_memory / 2**30, 1), "sms": props.multi_processor_count}
    return out


def unet_inputs(unet, stage: str, batch: int, s: Setup) -> dict:
    cfg = unet.config
    size = cfg.sample_size
    x = torch.randn(batch, cfg.in_channels, size, size, device=s.device, dtype=s.dtype)
    width = cfg.encoder_hid_dim or cfg.cross_attention_dim
    inputs = {
        "sample": x,
        "timestep": torch.full((batch,), 500, device=s.device),
        "encoder_hidden_states": torch.randn(batch, 77, width, device=s.device, dtype=s.dtype),
    }
    if cfg.class_embed_type is not None or cfg.num_class_embeds:
        inputs["class_labels"] = torch.full((batch,), 100, device=s.device)
    return inputs


def build_unet(stage: str, s: Setup):
    from jobs.plan import models

    if stage == "upscale":
        return s.build(lambda: models.build_upscale_components(models.build_clip_tokenizer(), s.preset)[0])
    return s.build(getattr(models, f"build_{stage}_unet"), s.preset)


def unets(s: Setup, matmul_tflops: float | None) -> dict:
    out = {}
    for stage in UNETS:
        unet = build_unet(stage, s).eval()
        rows = []
        for layout in ("nchw", "channels_last"):
            if layout == "channels_last":
                unet.to(memory_format=torch.channels_last)
            for b in s.batches:
                inputs = unet_inputs(unet, stage, 2 * b, s)  # classifier-free guidance: 2 rows per image
                if layout == "channels_last":
                    inputs["sample"] = inputs["sample"].to(memory_format=torch.channels_last)
                # A step outside the guidance interval runs the conditional half only: b rows.
                half = unet_inputs(unet, stage, b, s)
                if layout == "channels_last":
                    half["sample"] = half["sample"].to(memory_format=torch.channels_last)
                reset_peak(s.device)
                with torch.inference_mode():
                    seconds = timed(lambda inputs=inputs, unet=unet: unet(**inputs), s.device, s.repeats)
                    unguided = timed(lambda inputs=half, unet=unet: unet(**inputs), s.device, s.repeats)
                achieved = FORWARD_TFLOP[stage] * 2 * b / seconds  # full-size FLOPs: a dry run's are not
                rows.append(
                    {
                        "layout": layout,
                        "batch": b,
                        "ms_per_step": round(seconds * 1000, 2),
                        "ms_per_unguided_step": round(unguided * 1000, 2),
                        "tflops": round(achieved, 1),
                        "mfu_of_matmul": round(achieved / matmul_tflops, 3) if matmul_tflops else None,
                        "peak_gb": peak_gb(s.device),
                    }
                )
        out[stage] = rows
        del unet
        reset_peak(s.device)
    return out


def vae(s: Setup) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from jobs.plan import models

    base = s.build(lambda: models.build_upscale_components(models.build_clip_tokenizer(), s.preset)[1]).eval()
    pixels = 256 if s.dry_run else 1024  # the upscaler's output
    size = pixels // 2 ** (len(base.config.block_out_channels) - 1)  # its latent: 256 at full size
    out = {"pixels": pixels, "latent": size, "rows": []}
    backends = {"default": None}
    if s.device.type == "cuda":
        backends |= {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = base.to(dtype)
        latents = torch.randn(1, 4, size, size, device=s.device, dtype=dtype)
        for backend, kernel in backends.items():
            reset_peak(s.device)
            row = {"dtype": name, "attention": backend}
            try:
                with torch.inference_mode(), sdpa_kernel(kernel) if kernel else _nothing():
                    images = model.decode(latents).sample
                    seconds = timed(lambda m=model, x=latents: m.decode(x), s.device, max(1, s.repeats // 3))
                row |= {
                    "ms": round(seconds * 1000, 1),
                    "tflops": round(VAE_DECODE_TFLOP / seconds, 1),
                    "finite": bool(torch.isfinite(images).all()),
                    "peak_gb": peak_gb(s.device),
                }
            except Exception as err:  # noqa: BLE001 - a backend the kernel shapes do not take
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            out["rows"].append(row)
    return out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def t5(s: Setup) -> dict:
    from jobs.plan import models

    tokenizer = models.build_t5_tokenizer()
    encoder = s.build(models.build_t5_encoder, len(tokenizer), s.preset).eval()
    out = {}
    for b in [2] if s.dry_run else [8, 32]:
        ids = torch.randint(0, len(tokenizer), (b, 77), device=s.device)
        mask = torch.ones_like(ids)
        reset_peak(s.device)
        with torch.inference_mode():
            seconds = timed(lambda ids=ids, mask=mask: encoder(ids, attention_mask=mask), s.device, s.repeats)
        out[f"batch_{b}"] = {"ms": round(seconds * 1000, 1), "ms_per_prompt": round(seconds * 1000 / b, 2)}
    out["peak_gb"] = peak_gb(s.device)
    return out


def host(s: Setup) -> dict:
    """A DDPM step of IF-I and IF-II at batch 8 with per-row CPU generators (what the stages pass
    for per-row determinism), against the same step drawing no noise."""
    from diffusers import DDPMScheduler

    from jobs.plan.models import _config
    from workers.base import row_generators

    out = {}
    for stage, config, size in (
        ("stage1", "IF-I-XL-v1.0_scheduler_config.json", 64),
        ("stage2", "IF-II-L-v1.0_scheduler_config.DERIVED.json", 256),
    ):
        scheduler = DDPMScheduler.from_config(_config(config))
        scheduler.set_timesteps(100)
        b = 2 if s.dry_run else 8
        sample = torch.randn(b, 3, size, size, device=s.device, dtype=s.dtype)
        output = torch.randn(b, 6, size, size, device=s.device, dtype=s.dtype)  # IF predicts its variance too
        t = scheduler.timesteps[50]
        generators = row_generators(torch.arange(b).numpy(), stage)

        def step(t=t, output=output, sample=sample, generators=generators, scheduler=scheduler):
            return scheduler.step(output, t, sample, generator=generators)

        with_noise = timed(step, s.device, s.repeats)
        without = timed(lambda: step(t=0), s.device, s.repeats)  # the last step, t=0, adds no noise
        out[stage] = {
            "ms_per_step_cpu_noise": round(with_noise * 1000, 3),
            "ms_per_step_no_noise": round(without * 1000, 3),
        }
    return out


def save_checkpoints(s: Setup, root: Path) -> dict[str, Path]:
    """IF-I (without T5: the stages take embeddings), IF-II and the x4 upscaler in the hub layout
    on local disk, built on the device, so the workers load them as they load the real ones."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        IFPipeline,
        IFSuperResolutionPipeline,
        StableDiffusionUpscalePipeline,
    )

    from jobs.plan import models

    variant = None if s.dry_run else "fp16"
    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    paths = {stage: root / stage for stage in UNETS}
    sched = models._scheduler
    pipes = {
        "stage1": lambda: IFPipeline(
            tokenizer=None, text_encoder=None, unet=build_unet("stage1", s),
            scheduler=sched(DDPMScheduler, "IF-I-XL-v1.0_scheduler_config.json"), **none,
        ),
        "stage2": lambda: IFSuperResolutionPipeline(
            tokenizer=None, text_encoder=None, unet=build_unet("stage2", s),
            scheduler=sched(DDPMScheduler, "IF-II-L-v1.0_scheduler_config.DERIVED.json"),
            image_noising_scheduler=sched(DDPMScheduler, "IF-II-L-v1.0_image_noising_scheduler_config.DERIVED.json"),
            **none,
        ),
    }  # fmt: skip

    def upscaler():
        tokenizer = models.build_clip_tokenizer()
        unet, vae, clip = s.build(models.build_upscale_components, tokenizer, s.preset)
        return StableDiffusionUpscalePipeline(
            vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=unet,
            low_res_scheduler=sched(DDPMScheduler, "sd-x4-upscaler_low_res_scheduler_config.json"),
            scheduler=sched(DDIMScheduler, "sd-x4-upscaler_scheduler_config.json"), max_noise_level=350,
        )  # fmt: skip

    pipes["upscale"] = upscaler
    for stage, make in pipes.items():
        if not (paths[stage] / "model_index.json").exists():
            pipe = make()
            pipe.save_pretrained(paths[stage], variant=variant, safe_serialization=True)
            del pipe
    reset_peak(s.device)
    return paths


def worker_batch(s: Setup, n: int, width: int) -> dict:
    """The profiler's prompt rows with T5 embeddings of the full width added (no T5 run)."""
    import numpy as np

    from jobs.plan.profile import prompt_rows

    embeds = np.random.default_rng(0).standard_normal((n, 77, width))
    embeds = embeds.astype(np.float32 if s.dry_run else np.float16)
    return prompt_rows(n) | {"prompt_embeds": embeds, "negative_prompt_embeds": embeds * 0}


def workers(s: Setup, root: Path) -> dict:
    """Stage I, II and the upscaler as the actors run them (load, micro-batches, per-row seeds,
    handover dtype, the upscaler's decode) at two step counts: t(n) = fixed + n * per_step."""
    from workers.config import Stage1Config, Stage2Config, UpscaleConfig
    from workers.stage1 import Stage1Worker
    from workers.stage2 import Stage2Worker
    from workers.upscale import UpscaleWorker

    started = time.perf_counter()
    paths = save_checkpoints(s, root)
    out = {"checkpoints_s": round(time.perf_counter() - started, 1)}
    common = dict(dtype="fp32" if s.dry_run else "fp16", device=s.device.type, num_gpus=0 if s.dry_run else 1)
    if not s.dry_run:
        common["variant"] = "fp16"
    micro = {"stage1": 2, "stage2": 2, "upscale": 1} if s.dry_run else {"stage1": 8, "stage2": 8, "upscale": 4}
    classes = {"stage1": (Stage1Worker, Stage1Config), "stage2": (Stage2Worker, Stage2Config), "upscale": (UpscaleWorker, UpscaleConfig)}  # fmt: skip
    width = 32 if s.dry_run else 4096
    batch = worker_batch(s, micro["stage1"], width)
    for stage in UNETS:
        worker_cls, config_cls = classes[stage]
        times = {}
        for steps in s.steps:
            cfg = config_cls(model=str(paths[stage]), micro_batch=micro[stage], batch_size=micro[stage], num_inference_steps=steps, **common)  # fmt: skip
            loading = time.perf_counter()
            worker = worker_cls(cfg)
            load_s = time.perf_counter() - loading
            rows = {k: v[: micro[stage]] for k, v in batch.items()}
            worker(rows)  # warm-up
            reset_peak(s.device)
            seconds = timed(lambda w=worker, r=rows: w(r), s.device, max(1, s.repeats // 5), warmup=0)
            result = worker(rows)
            assert (result["status"] == "ok").all(), result["error"]
            times[steps] = seconds
            del worker
        # The same call at the most steps with guidance on the first half of the schedule only.
        steps = max(s.steps)
        cfg = config_cls(model=str(paths[stage]), micro_batch=micro[stage], batch_size=micro[stage], num_inference_steps=steps, guidance_interval=(0.0, 0.5), **common)  # fmt: skip
        worker = worker_cls(cfg)
        worker(rows)
        interval_s = timed(lambda w=worker, r=rows: w(r), s.device, max(1, s.repeats // 5), warmup=0)
        del worker
        fixed, per_step = step_costs(times)
        out[stage] = {
            "half_interval_seconds_per_call": round(interval_s, 3),
            "half_interval_saving": round(times[steps] / interval_s, 3),
            "micro_batch": micro[stage],
            "load_s": round(load_s, 1),
            "seconds_per_call": {str(k): round(v, 3) for k, v in times.items()},
            "fixed_s_per_call": round(fixed, 3),
            "per_step_s_per_call": round(per_step, 4),
            "peak_gb": peak_gb(s.device),
        }
        batch = result  # the next stage's input: this one's output, embeddings kept
    return out


SHARING_CHILD = """
import sys, time, json, torch
sys.path.insert(0, {repo!r})
from benchmarks.gpu_probe import Setup, build_unet, unet_inputs
s = Setup({dry_run})
unet = build_unet("stage2", s).eval()
inputs = unet_inputs(unet, "stage2", {batch}, s)
with torch.inference_mode():
    for _ in range(2):
        unet(**inputs)
    print("ready", flush=True)
    sys.stdin.readline()  # every process starts at once
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < {seconds}:
        unet(**inputs)
        if s.device.type == "cuda":
            torch.cuda.synchronize()
        done += 1
print(json.dumps({{"steps_per_s": done / (time.perf_counter() - start)}}), flush=True)
"""


def sharing(s: Setup) -> dict:
    """Two processes stepping IF-II's UNet, each alone and both at once, on one GPU."""
    code = SHARING_CHILD.format(
        repo=str(REPO), dry_run=s.dry_run, batch=2 if s.dry_run else 16, seconds=1 if s.dry_run else 15
    )

    def together(n: int) -> list[float]:
        procs = [
            subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for _ in range(n)
        ]
        for p in procs:
            while (line := p.stdout.readline()).strip() != "ready":
                if not line:  # the child ended before it was ready
                    raise RuntimeError(f"a sharing process exited with {p.wait()} before its first step")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["steps_per_s"] for p in procs]
        return rates

    alone = together(1)[0]
    both = together(2)
    efficiency = sum(both) / alone
    return {
        "alone_steps_per_s": round(alone, 2),
        "together_steps_per_s": [round(r, 2) for r in both],
        # 1.0: the GPU's time split between them with no loss; ~0.5 each: time-sliced, not shared
        # by share labels; above 1: kernels of both overlap (MPS, or a GPU one process cannot fill).
        "timeslice_efficiency": round(efficiency, 3),
        "split": [round(r / sum(both), 3) for r in both],
    }


def measured_profile(probe: Probe, out: Path) -> dict:
    """Seconds per image at the default steps from the workers' fixed and per-step costs, T5 from
    its section, memory from the peaks: a profile for `ifrender plan --profile`."""
    from jobs.manifest import MANIFESTS_DIR, load_manifest
    from jobs.plan.costs import Profile, StageProfile, schedule_steps

    sections = probe.results["sections"]
    w, enc = sections["workers"], sections["t5"]
    manifest = load_manifest(MANIFESTS_DIR / "production.yaml")
    stages = {}
    key = min(k for k in enc if k.startswith("batch_"))
    stages["encode"] = StageProfile(
        2 * enc[key]["ms_per_prompt"] / 1000, max(enc["peak_gb"], 0.1), int(key.split("_")[1])
    )
    for stage in UNETS:
        m = w[stage]
        steps = schedule_steps(getattr(manifest, stage).model_dump())
        per_call = m["fixed_s_per_call"] + steps * m["per_step_s_per_call"]
        stages[stage] = StageProfile(per_call / m["micro_batch"], max(m["peak_gb"], 0.1), m["micro_batch"])
    efficiency = sections.get("sharing", {}).get("timeslice_efficiency", 1.0)
    device = sections["ceilings"].get("device", "unknown")
    profile = Profile("measured by benchmarks/gpu_probe.py at production's steps", device, stages, min(1.0, efficiency))
    profile.save(out)
    total = sum(p.seconds_per_image for p in stages.values())
    return {"path": str(out), "seconds_per_image": {k: round(v.seconds_per_image, 4) for k, v in stages.items()},
            "images_per_hour_one_gpu": round(3600 / total, 1), "timeslice_efficiency": profile.timeslice_efficiency}  # fmt: skip


def compile_probe(s: Setup, cache: Path) -> dict:
    """torch.compile of IF-II's UNet in two fresh processes sharing one cache directory: the first
    compiles, the second should load."""
    code = f"""
import os, sys, time, json, torch
sys.path.insert(0, {str(REPO)!r})
os.environ["IFRENDER_COMPILE_CACHE"] = {str(cache)!r}
from workers.models import use_compile_cache
from benchmarks.gpu_probe import Setup, build_unet, unet_inputs, timed
use_compile_cache()
s = Setup({s.dry_run})
unet = build_unet("stage2", s).eval()
inputs = unet_inputs(unet, "stage2", 16 if not s.dry_run else 2, s)
with torch.inference_mode():
    eager = timed(lambda: unet(**inputs), s.device, s.repeats)
    compiled = torch.compile(unet)
    start = time.perf_counter()
    compiled(**inputs)
    if s.device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    steady = timed(lambda: compiled(**inputs), s.device, s.repeats)
print(json.dumps({{"eager_ms": eager * 1000, "first_call_s": first, "compiled_ms": steady * 1000}}))
"""
    runs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=540)
        if result.returncode:
            return {"error": result.stderr[-1500:]}
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return {"cold": runs[0], "warm_cache": runs[1], "cache_files": sum(1 for _ in cache.rglob("*") if _.is_file())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the tiny models on a CPU: checks the script")
    parser.add_argument("--compile", action="store_true", help="only the torch.compile section (a second call)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu-probe")
    parser.add_argument("--scratch", default="/tmp/ifrender-probe", help="local disk for the checkpoints and caches")
    args = parser.parse_args()
    s = Setup(args.dry_run)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_probe: expected a CUDA GPU, found none. Fix: run it on a GPU machine, or --dry-run")
    torch.manual_seed(0)
    out = Path(args.out)
    scratch = Path(args.scratch)
    probe = Probe(out / ("gpu-probe-compile.json" if args.compile else "gpu-probe.json"), args.dry_run)
    if args.compile:
        probe.section("compile", compile_probe, s, scratch / "inductor")
        return
    top = probe.section("ceilings", ceilings, s)
    probe.section("unets", unets, s, top.get("matmul_fp16_tflops"))
    probe.section("vae", vae, s)
    probe.section("t5", t5, s)
    probe.section("host", host, s)
    probe.section("workers", workers, s, scratch / "checkpoints")
    probe.section("sharing", sharing, s)
    probe.section("profile", measured_profile, probe, out / "gpu-profile.json")
    failed = [k for k, v in probe.results["sections"].items() if "error" in v]
    print(f"wrote {probe.path}" + (f"; sections that failed: {failed}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
