"""The planner: a stage profile and a cluster in, pool sizes and GPU shares per stage out.

Model: a stage needs `seconds_per_image` of one whole GPU per image; an actor holding a share f
of a GPU runs at f of its speed (co-located actors time-slice the GPU). A stage with n actors of
share f then renders n * f / seconds_per_image images per second, and the job runs at the rate
of its slowest stage. The best a cluster of N GPUs can do is N / sum(seconds_per_image): every
stage's share of the GPUs proportional to its seconds per image. The planner gets as close to
that as whole actors, fractional shares that pack into N GPUs, and memory allow.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from jobs.manifest import Manifest
from jobs.pools import packs
from workers.errors import PlanError
from workers.stages import MODEL_STAGES

# FLOPs per forward at batch 1 (FACTS: counted on the meta device), TFLOP.
FORWARD_TFLOP = {"encode": 0.72, "stage1": 2.88, "stage2": 3.09, "upscale": 4.53}
VAE_DECODE_TFLOP = 18.98  # the x4 upscaler's VAE decode to 1024 px, once per image
# Memory per actor, GB: fp16 weights (8-bit T5), plus activations per image in a batch.
WEIGHTS_GB = {"encode": 10.0, "stage1": 8.6, "stage2": 2.5, "upscale": 1.7}
WEIGHTS_8BIT_GB = {"encode": 8.0}
ACTIVATION_GB = {"encode": 0.02, "stage1": 0.4, "stage2": 0.6, "upscale": 2.5}


@dataclass
class StageProfile:
    seconds_per_image: float  # of one whole device
    memory_gb: float  # per actor at batch_size
    batch_size: int


@dataclass
class Profile:
    source: str  # how the numbers were obtained
    device: str
    stages: dict[str, StageProfile]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        data = json.loads(Path(path).read_text())
        return cls(data["source"], data["device"], {k: StageProfile(**v) for k, v in data["stages"].items()})


def _steps(cfg) -> int:
    if getattr(cfg, "timesteps", None):
        from workers.models import preset_timesteps

        return len(preset_timesteps(cfg.timesteps))
    return cfg.num_inference_steps


def flops_profile(manifest: Manifest, tflops: float = 800.0, utilisation: float = 0.4, device: str = "H100") -> Profile:
    """Seconds per image from FLOP counts at a stated utilisation of a GPU's peak dense TFLOP/s."""
    rate = tflops * utilisation
    stages = {}
    for stage in manifest.stages():
        cfg = getattr(manifest, stage)
        if stage == "encode":
            tflop = FORWARD_TFLOP["encode"] * 2  # prompt and negative prompt
        else:
            cfg_factor = 2 if cfg.guidance_scale > 1 else 1  # classifier-free guidance doubles the batch
            tflop = FORWARD_TFLOP[stage] * _steps(cfg) * cfg_factor
            if stage == "upscale":
                tflop += VAE_DECODE_TFLOP
        weights = WEIGHTS_8BIT_GB["encode"] if stage == "encode" and cfg.load_in_8bit else WEIGHTS_GB[stage]
        stages[stage] = StageProfile(
            seconds_per_image=tflop / rate,
            memory_gb=round(weights + ACTIVATION_GB[stage] * cfg.batch_size, 2),
            batch_size=cfg.batch_size,
        )
    source = f"FLOP counts at {utilisation:.0%} of {tflops:g} TFLOP/s"
    return Profile(source, device, stages)


@dataclass
class Allocation:
    pool_size: int
    num_gpus: float  # per actor
    batch_size: int

    @property
    def gpus(self) -> float:
        return self.pool_size * self.num_gpus


@dataclass
class Plan:
    gpus: int
    gpu_memory_gb: float
    stages: dict[str, Allocation]
    images_per_second: float
    bottleneck: str
    profile_source: str
    rates: dict[str, float] = field(default_factory=dict)  # images/s each stage could sustain

    @property
    def images_per_hour(self) -> float:
        return self.images_per_second * 3600

    def gpu_hours(self, images: int) -> float:
        return images / self.images_per_hour * self.gpus if self.images_per_second else math.inf

    def overrides(self, manifest: Manifest | None = None) -> list[str]:
        """--set assignments that apply this plan to a manifest; a stage steered to a worker group
        by custom resources asks for as much of them as of GPUs (one GPU per group node)."""
        out = []
        for stage, a in self.stages.items():
            out += [
                f"{stage}.pool_size={a.pool_size}",
                f"{stage}.num_gpus={a.num_gpus:g}",
                f"{stage}.batch_size={a.batch_size}",
            ]
            resources = getattr(manifest, stage).resources if manifest else {}
            if resources:
                out.append(f"{stage}.resources={{{', '.join(f'{k}: {a.num_gpus:g}' for k in resources)}}}")
        return out

    def table(self, images: int | None = None) -> str:
        lines = [
            f"plan for {self.gpus} GPU(s) of {self.gpu_memory_gb:g} GB ({self.profile_source}):",
            f"  {'stage':8} {'actors':>6} {'GPU/actor':>9} {'GPUs':>6} {'batch':>5} {'images/h':>10}",
        ]
        for stage, a in self.stages.items():
            lines.append(
                f"  {stage:8} {a.pool_size:6d} {a.num_gpus:9.4g} {a.gpus:6.3g} {a.batch_size:5d} {self.rates[stage] * 3600:10.0f}"
            )
        lines.append(f"  predicted: {self.images_per_hour:,.0f} images/hour; bottleneck: {self.bottleneck}")
        if images:
            lines.append(
                f"  {images:,} images: {self.gpu_hours(images):,.1f} GPU-hours, {images / self.images_per_hour:,.2f} hours"
            )
        return "\n".join(lines)


def _rate(profile: Profile, stages: dict[str, Allocation]) -> tuple[float, str, dict[str, float]]:
    rates = {s: a.gpus / profile.stages[s].seconds_per_image for s, a in stages.items()}
    bottleneck = min(rates, key=rates.get)
    return rates[bottleneck], bottleneck, rates


def plan(profile: Profile, gpus: int, gpu_memory_gb: float) -> Plan:
    """Pool size and GPU share per stage that maximise images per second."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: expected at least 1 GPU")
    stages = {s: profile.stages[s] for s in MODEL_STAGES if s in profile.stages}
    for stage, p in stages.items():
        if p.memory_gb > gpu_memory_gb:
            raise PlanError(
                f"{stage}: needs about {p.memory_gb:g} GB per actor at batch_size={p.batch_size} but a GPU has "
                f"{gpu_memory_gb:g} GB. Fix: lower {stage}.batch_size, use fp16/8-bit weights or offload, or larger GPUs."
            )
    total = sum(p.seconds_per_image for p in stages.values())
    best: Plan | None = None
    # Each stage's ideal share split over a few actor counts (smaller pieces pack better), each
    # shrunk a little at a time until the actors fit on the GPUs; the fastest that fits wins.
    # Every stage at the bottleneck's rate, no spare rate elsewhere: with the pools placed and fed
    # as planned (jobs/pools.py), 10% spare on the other stages kept the bottleneck 99% busy
    # instead of 95% but cost 2-5% of the predicted rate, so fewer images per hour (measured in
    # the simulation at 4, 8 and 16 GPUs; docs/benchmarks.md).
    names = list(stages)
    for extra in itertools.product(range(3), repeat=len(names)):
        for shrink in [1 - 0.01 * k for k in range(50)] + [0.5 - 0.02 * k for k in range(20)]:
            alloc = {}
            for stage, more in zip(names, extra):
                p = stages[stage]
                ideal = gpus * p.seconds_per_image / total * shrink
                actors = max(1, math.ceil(ideal - 1e-9)) + more
                share = min(1.0, max(ideal / actors, p.memory_gb / gpu_memory_gb))
                alloc[stage] = Allocation(actors, math.floor(share * 1e4) / 1e4, p.batch_size)
            shares = [a.num_gpus for a in alloc.values() for _ in range(a.pool_size)]
            if packs(shares, gpus):
                rate, bottleneck, rates = _rate(profile, alloc)
                if best is None or rate > best.images_per_second * (1 + 1e-9):
                    best = Plan(gpus, gpu_memory_gb, alloc, rate, bottleneck, profile.source, rates)
                break  # less shrinking fits no more with these actor counts
    if best is None:
        raise PlanError(f"no allocation of {len(stages)} stages fits {gpus} GPU(s) of {gpu_memory_gb:g} GB")
    return best


def naive(profile: Profile, gpus: int, gpu_memory_gb: float) -> Plan:
    """One pool per stage with an equal share of the GPUs: whole GPUs per actor when there are
    enough, an equal fraction each otherwise."""
    stages = [s for s in MODEL_STAGES if s in profile.stages]
    per_stage = gpus / len(stages)
    alloc = {}
    for stage in stages:
        if per_stage >= 1:
            alloc[stage] = Allocation(int(per_stage), 1.0, profile.stages[stage].batch_size)
        else:
            alloc[stage] = Allocation(1, math.floor(per_stage * 1e4) / 1e4, profile.stages[stage].batch_size)
    rate, bottleneck, rates = _rate(profile, alloc)
    return Plan(gpus, gpu_memory_gb, alloc, rate, bottleneck, profile.source + ", equal shares", rates)
