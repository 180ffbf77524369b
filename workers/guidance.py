"""Classifier-free guidance on a part of a UNet stage's schedule only (`guidance_interval`).

With guidance a diffusers pipeline runs its UNet on a doubled batch (the unconditional half, then
the conditional half) and mixes the two predictions: uncond + g * (cond - uncond). Outside the
interval the stand-in below runs the UNet on the conditional half alone and hands its prediction
back twice, so the pipeline's own formula gives the conditional prediction exactly (cond - cond
is 0 in floating point too): the step costs half, and every other line of the pipeline (its
scheduler, IF's variance split, the upscaler's noise-level labels) runs as written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch where a step runs: the planner counts guided steps without it
    import torch

FULL = (0.0, 1.0)  # guidance on every step: the pipelines as they are, bit for bit


def guided_steps(steps: int, interval: tuple[float, float]) -> list[bool]:
    """Per step of a schedule of `steps`, whether it is guided: step i of n sits at i / n."""
    start, end = interval
    return [start <= i / steps < end for i in range(steps)]


def guided_fraction(steps: int, interval: tuple[float, float]) -> float:
    """The share of a schedule's steps that run guided (the planner's and the summary's cost)."""
    return sum(guided_steps(steps, interval)) / steps if steps else 0.0


class IntervalUNet:
    """Stands in for a pipeline's UNet during one call. The steps are counted from the
    scheduler's timesteps at the first call (img2img rows start part-way down the schedule)."""

    def __init__(self, unet: Any, scheduler: Any, interval: tuple[float, float]) -> None:
        self.unet, self.scheduler, self.interval = unet, scheduler, interval
        self.guided: list[bool] | None = None
        self.calls = 0

    def __getattr__(self, name: str) -> Any:  # config, dtype, device...: the UNet's own
        return getattr(self.unet, name)

    def _plan(self, timestep: Any) -> list[bool]:
        import torch

        timesteps = self.scheduler.timesteps
        t = timestep.flatten()[0] if isinstance(timestep, torch.Tensor) else timestep
        found = (timesteps.to(torch.as_tensor(t).device) == t).nonzero()
        first = int(found[0]) if len(found) else 0
        return guided_steps(len(timesteps) - first, self.interval)

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        if self.guided is None:
            self.guided = self._plan(timestep)
        step, self.calls = self.calls, self.calls + 1
        if step >= len(self.guided) or self.guided[step]:
            return self.unet(sample, timestep, *args, **kwargs)
        import torch

        half = sample.shape[0] // 2

        def cond(value: Any) -> Any:  # a per-row input of the doubled batch: its conditional half
            if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == 2 * half:
                return value[half:]
            return value

        out = self.unet(cond(sample), cond(timestep), *args, **{k: cond(v) for k, v in kwargs.items()})
        if isinstance(out, tuple):
            return (torch.cat([out[0], out[0]]), *out[1:])
        out.sample = torch.cat([out.sample, out.sample])
        return out


@contextlib.contextmanager
def guidance_interval(pipe: Any, interval: tuple[float, float], guided: bool) -> Iterator[None]:
    """Within this block, `pipe` guides only on `interval` of its schedule. A full interval, or a
    call without guidance (guidance_scale <= 1), leaves the pipeline untouched."""
    if not guided or tuple(interval) == FULL:
        yield
        return
    unet = pipe.unet
    # Set in the instance's dict: DiffusionPipeline's own setattr would record it in the config.
    pipe.__dict__["unet"] = IntervalUNet(unet, pipe.scheduler, tuple(interval))
    try:
        yield
    finally:
        pipe.__dict__["unet"] = unet
