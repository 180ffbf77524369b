"""The schedule a plan implies: the deadline of one run, and the nightly --stop-after of a job
bigger than a night."""

from __future__ import annotations

import math

from jobs.plan.search import Plan

# What a run needs beyond rendering, for the deadlines a RayJob is given.
STARTUP_S = 1800  # nodes up, the image pulled, weights synced and loaded
FINISH_S = 600  # the last commits and publishes, the index, the report
MARGIN = 1.25  # nodes lost and replaced, stragglers, the planner's error


def deadline_s(images: int, images_per_hour: float) -> int:
    """activeDeadlineSeconds for a run that renders `images` at the plan's rate in one go."""
    return math.ceil(STARTUP_S + images / images_per_hour * 3600 * MARGIN + FINISH_S)


def nightly(images_per_hour: float, chunk_images: int, night_s: float) -> tuple[int, int]:
    """(--stop-after, images rendered a night at the least) for a job that runs in nights of
    `night_s` on one output: a run starts no further chunk after --stop-after, and one chunk started just
    before it still finishes within the night. The night is the RayJob's activeDeadlineSeconds."""
    chunk_s = chunk_images / images_per_hour * 3600 * MARGIN
    stop = math.floor(night_s - STARTUP_S - chunk_s - FINISH_S)
    if stop <= 0:
        raise ValueError(
            f"a night of {night_s / 3600:g} h cannot hold start-up ({STARTUP_S} s), one chunk of {chunk_images:,} "
            f"images ({chunk_s:,.0f} s) and the finish ({FINISH_S} s). Fix: a smaller ray.chunk_shards, or a "
            f"longer night"
        )
    return stop, math.floor(stop / 3600 / MARGIN * images_per_hour)


def deadlines(chosen: Plan, images: int, chunk_images: int | None, night_hours: float) -> list[str]:
    """What `ifrender plan --images` prints for the RayJob: its deadline, and how the job runs
    as nightly chunks that resume when it is bigger than a night."""
    rate = chosen.images_per_hour
    if not rate:
        return ["  no deadline: the plan renders nothing"]
    hours = images / rate
    lines = [
        f"  deadline for {images:,} images in one run: activeDeadlineSeconds: {deadline_s(images, rate)} "
        f"({hours:,.1f} h of rendering x {MARGIN:g} + {STARTUP_S // 60} min start-up + {FINISH_S // 60} min finish)"
    ]
    if deadline_s(images, rate) <= night_hours * 3600:
        return lines + [f"  fits one night of {night_hours:g} h"]
    if not chunk_images:
        return lines + [
            f"  more than one night of {night_hours:g} h, and ray.chunk_shards is unset (one chunk): set it so "
            "that a run can stop between chunks and the next night resume"
        ]
    stop, per_night = nightly(rate, chunk_images, night_hours * 3600)
    return lines + [
        f"  more than one night of {night_hours:g} h: run nightly on one output.path with activeDeadlineSeconds: "
        f"{int(night_hours * 3600)} and --stop-after {stop}; each night renders at least {per_night:,} images and "
        f"the next resumes, about {math.ceil(images / per_night)} nights"
    ]
