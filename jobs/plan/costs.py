"""Stage costs: what one image costs each stage, from FLOP counts or from a measured profile,
and the profile the planner, the profiler and the bench share."""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from jobs.manifest import Manifest
from workers.errors import PlanError

# FLOPs per forward at batch 1 (FACTS: counted on the meta device), TFLOP.
# score: CLIP ViT-L/14's image tower at 224 px (0.162) and text tower at 77 tokens (0.013), counted
# the same way (jobs/plan/models.py clip_config("full")).
FORWARD_TFLOP = {"encode": 0.72, "stage1": 2.88, "stage2": 3.09, "upscale": 4.53, "score": 0.175}
VAE_DECODE_TFLOP = 18.98  # the x4 upscaler's VAE decode to 1024 px, once per image
# Memory per actor, GB: fp16 weights (8-bit T5), plus activations per image in a batch.
WEIGHTS_GB = {"encode": 10.0, "stage1": 8.6, "stage2": 2.5, "upscale": 1.7, "score": 0.9}
WEIGHTS_8BIT_GB = {"encode": 8.0}
ACTIVATION_GB = {"encode": 0.02, "stage1": 0.4, "stage2": 0.6, "upscale": 2.5, "score": 0.02}


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
    # Of a GPU's time, the part left for work while two or more busy processes time-slice it
    # (context switches); benchmarks/gpu_probe.py measures it. 1.0: no loss assumed.
    timeslice_efficiency: float = 1.0

    def __post_init__(self) -> None:
        for name, st in self.stages.items():
            if not (math.isfinite(st.seconds_per_image) and st.seconds_per_image > 0):
                raise PlanError(
                    f"profile ({self.source}): stage {name} has seconds_per_image={st.seconds_per_image}; expected a "
                    f"positive, finite time. Fix: measure it again (ifrender profile, benchmarks/gpu_probe.py)."
                )
        if not 0 < self.timeslice_efficiency <= 1:
            raise PlanError(
                f"profile ({self.source}): timeslice_efficiency={self.timeslice_efficiency}; expected a share of "
                f"the GPU's time in (0, 1]. Fix: measure it again with benchmarks/gpu_probe.py."
            )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        data = json.loads(Path(path).read_text())
        stages = {k: StageProfile(**v) for k, v in data.pop("stages").items()}
        return cls(stages=stages, **data)


def step_costs(seconds_per_call: dict[int, float]) -> tuple[float, float]:
    """(fixed, per step) seconds of a call, from calls timed at two step counts. Where the call
    with more steps was not the slower one (timing noise swamped the step cost), the fit would
    give a negative cost per step; each call's whole time is then counted per step and the larger
    rate taken, an upper bound, so a profile never predicts a free stage."""
    (n1, t1), (n2, t2) = sorted(seconds_per_call.items())
    per_step = (t2 - t1) / (n2 - n1)
    if per_step <= 0:
        return 0.0, max(t1 / n1, t2 / n2)
    return t1 - n1 * per_step, per_step


def schedule_steps(settings: dict) -> int:
    """A UNet stage's denoising steps: its timestep preset's length, or num_inference_steps."""
    if settings.get("timesteps"):
        from workers.models import preset_timesteps

        return len(preset_timesteps(settings["timesteps"]))
    return settings["num_inference_steps"]


def stage_tflop(stage: str, settings: dict) -> float:
    """One image's TFLOP in a stage at the full-size models, from its settings: a stage config's
    fields, or a row's recorded `<stage>_params` (what it actually ran: steps or preset, strength,
    guidance scale and interval)."""
    from workers.guidance import FULL, guided_fraction

    if stage == "encode":
        return FORWARD_TFLOP["encode"] * 2  # prompt and negative prompt
    if stage == "score":
        return FORWARD_TFLOP["score"]  # one image and its prompt, no steps
    steps = schedule_steps(settings)
    if settings.get("mode", "text2img") != "text2img" and settings.get("strength") is not None:
        steps = min(int(steps * settings["strength"]), steps)  # img2img starts part-way, as diffusers does
    # Classifier-free guidance doubles the batch on the steps it runs.
    guided = (
        guided_fraction(steps, tuple(settings.get("guidance_interval", FULL))) if settings["guidance_scale"] > 1 else 0
    )
    tflop = FORWARD_TFLOP[stage] * steps * (1 + guided)
    return tflop + (VAE_DECODE_TFLOP if stage == "upscale" else 0.0)


@functools.lru_cache(maxsize=4096)
def recorded_tflop(stage: str, params: str) -> float:
    """One row's TFLOP in a stage, from the `<stage>_params` JSON it recorded (rows that ran
    alike share one string, so a run's rows cost a few parses)."""
    return stage_tflop(stage, json.loads(params))


def image_tflop(manifest: Manifest) -> dict[str, float]:
    """Per stage of the job, one text-to-image row's TFLOP at the manifest's settings."""
    return {s: stage_tflop(s, getattr(manifest, s).model_dump()) for s in manifest.stages()}


def flops_profile(manifest: Manifest, tflops: float = 800.0, utilisation: float = 0.4, device: str = "H100") -> Profile:
    """Seconds per image from FLOP counts at a stated utilisation of a GPU's peak dense TFLOP/s."""
    rate = tflops * utilisation
    stages = {}
    for stage in manifest.stages():
        cfg = getattr(manifest, stage)
        tflop = stage_tflop(stage, cfg.model_dump())
        weights = WEIGHTS_8BIT_GB["encode"] if stage == "encode" and cfg.load_in_8bit else WEIGHTS_GB[stage]
        # Memory follows the rows of one model call (micro_batch), whatever the layout's batches.
        stages[stage] = StageProfile(
            seconds_per_image=tflop / rate,
            memory_gb=round(weights + ACTIVATION_GB[stage] * cfg.micro_batch, 2),
            batch_size=cfg.micro_batch,
        )
    source = f"FLOP counts at {utilisation:.0%} of {tflops:g} TFLOP/s"
    return Profile(source, device, stages)


def cost_line(manifest: Manifest, per_gpu: float) -> str:
    """What one image costs at the manifest's settings, and what a GPU gives at the plan."""
    tflop = image_tflop(manifest)
    parts = ", ".join(f"{s} {t:,.1f}" for s, t in tflop.items())
    return (
        f"cost: {sum(tflop.values()):,.1f} TFLOP per image at the full-size models ({parts}); "
        f"{per_gpu:,.0f} images/hour per GPU"
    )
