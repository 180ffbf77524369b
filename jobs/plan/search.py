"""The planner: a stage profile and a cluster in, a layout (which stages share an actor) and
pool sizes and GPU shares per pool out.

Model. A stage needs `seconds_per_image` of one whole GPU per image; a pool running several
stages (fused, or the whole cascade in a replica) needs their sum. A Ray GPU share is a label for
placement only: every actor sees the whole GPU. Without MPS the busy processes on one GPU
time-slice it and an idle one gives its time away, so a GPU keeps up while the work its actors
take per image adds up to no more than its time (times `timeslice_efficiency` when two or more
share it); the shares decide which actors meet on a GPU, and nothing else. With MPS
(`ray.mps`), each actor runs on its share of the GPU's SMs, and only there. The best N GPUs can
do is N / sum(seconds_per_image): every GPU busy all the time. Replicas reach it whenever a
copy of the cascade fits a GPU's memory; the pipeline and fused layouts come as close as whole
actors, shares that pack and memory allow. At equal predicted rates, fewer pools win: fewer
handovers through the object store.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from jobs.manifest import Manifest
from jobs.plan.costs import Profile
from jobs.plan.layouts import with_groups
from jobs.plan.packing import packs, place
from workers.errors import PlanError
from workers.stages import MODEL_STAGES, group_name


@dataclass
class Allocation:
    stages: tuple[str, ...]  # what each actor of the pool runs, in order
    pool_size: int
    num_gpus: float  # per actor
    batch_size: int

    @property
    def gpus(self) -> float:
        return self.pool_size * self.num_gpus


LAYOUTS = ("replicas", "fused", "pipeline")  # the order of preference at equal rates


def layout_of(pools: dict[str, Allocation], stages: tuple[str, ...]) -> str:
    if len(pools) == 1 and len(stages) > 1:
        return "replicas"
    return "pipeline" if all(len(a.stages) == 1 for a in pools.values()) else "fused"


@dataclass
class Plan:
    layout: str
    gpus: int
    gpu_memory_gb: float
    pools: dict[str, Allocation]
    images_per_second: float
    bottleneck: str  # the pool, or the GPU and the pools on it, that sets the rate
    profile_source: str
    sharing: str  # "time-slicing" or "mps"
    rates: dict[str, float] = field(default_factory=dict)  # images/s each pool's GPUs let it sustain

    @property
    def images_per_hour(self) -> float:
        return self.images_per_second * 3600

    def gpu_hours(self, images: int) -> float:
        return images / self.images_per_hour * self.gpus if self.images_per_second else math.inf

    def apply(self, manifest: Manifest) -> Manifest:
        """The manifest in this plan's layout, with its pool sizes, shares and batches; a pool
        steered to a worker group by custom resources asks for as much of them as of GPUs (one
        GPU per group node)."""
        groups, singles = [], {}
        for a in self.pools.values():
            first = manifest.stage_config(a.stages[0])
            settings = {"pool_size": a.pool_size, "num_gpus": a.num_gpus, "batch_size": a.batch_size}
            if first.resources:
                settings["resources"] = dict.fromkeys(first.resources, a.num_gpus)
            if len(a.stages) > 1:
                groups.append({"stages": list(a.stages), "num_cpus": first.num_cpus} | settings)
            else:
                singles[a.stages[0]] = settings
        moved = with_groups(manifest, groups)
        return moved.model_copy(update={s: moved.stage_config(s).model_copy(update=v) for s, v in singles.items()})

    def yaml(self) -> str:
        """What to write in a manifest for this plan."""
        lines = []
        if self.layout != "pipeline":
            lines.append("groups:")
        for a in self.pools.values():
            if len(a.stages) > 1:
                lines.append(
                    f"  - {{stages: [{', '.join(a.stages)}], pool_size: {a.pool_size}, num_gpus: {a.num_gpus:g}, "
                    f"batch_size: {a.batch_size}}}"
                )
            else:
                lines.append(
                    f"{a.stages[0]}: {{pool_size: {a.pool_size}, num_gpus: {a.num_gpus:g}, batch_size: {a.batch_size}}}"
                )
        return "\n".join(lines)

    def table(self, images: int | None = None) -> str:
        lines = [
            f"{self.layout} on {self.gpus} GPU(s) of {self.gpu_memory_gb:g} GB, {self.sharing} ({self.profile_source}):",
            f"  {'pool':28} {'actors':>6} {'GPU/actor':>9} {'GPUs':>6} {'batch':>5} {'images/h':>10}",
        ]
        for name, a in self.pools.items():
            lines.append(
                f"  {name:28} {a.pool_size:6d} {a.num_gpus:9.4g} {a.gpus:6.3g} {a.batch_size:5d} "
                f"{self.rates[name] * 3600:10.0f}"
            )
        lines.append(f"  predicted: {self.images_per_hour:,.0f} images/hour; bottleneck: {self.bottleneck}")
        if images:
            lines.append(
                f"  {images:,} images: {self.gpu_hours(images):,.1f} GPU-hours, {images / self.images_per_hour:,.2f} hours"
            )
        return "\n".join(lines)


def saved_plan(record: dict) -> Plan:
    """A plan from `ifrender plan --save`'s JSON."""
    data = dict(record["plan"])
    data["pools"] = {n: Allocation(**(a | {"stages": tuple(a["stages"])})) for n, a in data["pools"].items()}
    return Plan(**data)


def _cost(profile: Profile, stages: tuple[str, ...]) -> tuple[float, float, int]:
    """A pool's (seconds per image, memory per actor, batch): every stage of it in one process,
    each with its activations counted (an upper bound: they are not all alive at once). Its batch
    is the largest of the stages that carry its cost (5% or more of it), so that none of them pads
    its calls; a light stage (T5 in a replica) may pad, at little cost."""
    ps = [profile.stages[s] for s in stages]
    seconds = sum(p.seconds_per_image for p in ps)
    batch = max(p.batch_size for p in ps if p.seconds_per_image >= 0.05 * seconds)
    return seconds, sum(p.memory_gb for p in ps), batch


def predict(
    profile: Profile, pools: dict[str, Allocation], gpus: int, mps: bool = False
) -> tuple[float, str, dict[str, float]]:
    """(images/s, what limits it, images/s each pool's GPUs let it sustain) for actors placed as
    Ray places them (jobs.run.pools.place): time slicing unless `mps`."""
    cost = {name: _cost(profile, a.stages)[0] for name, a in pools.items()}
    if mps:  # each actor on its share of the GPU, whatever its neighbours do
        rates = {n: a.pool_size * min(1.0, a.num_gpus) / cost[n] for n, a in pools.items()}
        bottleneck = min(rates, key=rates.get)
        return rates[bottleneck], bottleneck, rates
    actors = [(n, a.num_gpus) for n, a in pools.items() for _ in range(a.pool_size)]
    where = place([share for _, share in actors], gpus)
    if where is None:
        return 0.0, "the shares do not pack onto the GPUs", dict.fromkeys(pools, 0.0)
    on_gpu: dict[int, list[str]] = {}
    for (name, _), placed in zip(actors, where):
        for g in placed:
            on_gpu.setdefault(g, []).append(name)
    # Ray spreads a pool's work over its actors: each takes 1/pool_size of the pool's images.
    rates = dict.fromkeys(pools, math.inf)
    limits = {}
    for g, names in on_gpu.items():
        load = sum(cost[n] / pools[n].pool_size / _gpus_of(pools[n]) for n in names)
        capacity = 1.0 if len(names) == 1 else profile.timeslice_efficiency
        limits[g] = capacity / load
        for n in names:
            rates[n] = min(rates[n], limits[g])
    g = min(limits, key=limits.get)
    names = sorted(set(on_gpu[g]))
    bottleneck = names[0] if len(on_gpu[g]) == 1 else f"GPU {g}, time-sliced by {' + '.join(on_gpu[g])}"
    return limits[g], bottleneck, rates


def _gpus_of(a: Allocation) -> float:
    return max(1.0, a.num_gpus)  # an actor of several whole GPUs spreads its load over them


def _check_memory(profile: Profile, gpu_memory_gb: float) -> None:
    for stage, p in profile.stages.items():
        if p.memory_gb > gpu_memory_gb:
            raise PlanError(
                f"{stage}: needs about {p.memory_gb:g} GB per actor at batch_size={p.batch_size} but a GPU has "
                f"{gpu_memory_gb:g} GB. Fix: lower {stage}.batch_size, use fp16/8-bit weights or offload, or larger GPUs."
            )


def partitions(stages: tuple[str, ...]) -> list[tuple[tuple[str, ...], ...]]:
    """Every way to cut the cascade into runs of consecutive stages, one pool per run."""
    out = []
    for cuts in itertools.product((False, True), repeat=len(stages) - 1):
        runs, current = [], [stages[0]]
        for stage, cut in zip(stages[1:], cuts):
            if cut:
                runs.append(tuple(current))
                current = []
            current.append(stage)
        out.append((*runs, tuple(current)))
    return out


def _allocations(profile: Profile, runs, gpus: int, gpu_memory_gb: float):
    """Candidate allocations of these pools: whole GPUs given one by one to the pool that needs
    them most, and shares in proportion to cost (several actor counts each), shrunk until they pack."""
    costs = {group_name(r): (r, *_cost(profile, r)) for r in runs}
    if any(memory > gpu_memory_gb for _, _, memory, _ in costs.values()):
        return
    if len(costs) <= gpus:
        counts = dict.fromkeys(costs, 1)
        for _ in range(gpus - len(costs)):
            neediest = min(counts, key=lambda n: counts[n] / costs[n][1])
            counts[neediest] += 1
        yield {n: Allocation(r, counts[n], 1.0, b) for n, (r, _, _, b) in costs.items()}
    total = sum(c for _, c, _, _ in costs.values())
    names = list(costs)
    for extra in itertools.product(range(3), repeat=len(names)):
        for shrink in [1 - 0.01 * k for k in range(50)] + [0.5 - 0.02 * k for k in range(20)]:
            alloc = {}
            for name, more in zip(names, extra):
                stages, cost, memory, batch = costs[name]
                ideal = gpus * cost / total * shrink
                actors = max(1, math.ceil(ideal - 1e-9)) + more
                share = min(1.0, max(ideal / actors, memory / gpu_memory_gb))
                alloc[name] = Allocation(stages, actors, math.floor(share * 1e4) / 1e4, batch)
            if packs([a.num_gpus for a in alloc.values() for _ in range(a.pool_size)], gpus):
                yield alloc
                break  # less shrinking fits no more with these actor counts


def plan_layouts(profile: Profile, gpus: int, gpu_memory_gb: float, mps: bool = False) -> dict[str, Plan | str]:
    """The best plan of each layout, or why it has none: {"replicas": Plan | reason, ...}."""
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: expected at least 1 GPU")
    _check_memory(profile, gpu_memory_gb)
    stages = tuple(s for s in MODEL_STAGES if s in profile.stages)
    sharing = "mps" if mps else "time-slicing"
    best: dict[str, Plan | str] = {}
    for runs in partitions(stages):
        for alloc in _allocations(profile, runs, gpus, gpu_memory_gb):
            layout = layout_of(alloc, stages)
            rate, bottleneck, rates = predict(profile, alloc, gpus, mps)
            mine = best.get(layout)
            if not isinstance(mine, Plan) or rate > mine.images_per_second * (1 + 1e-9):
                best[layout] = Plan(
                    layout, gpus, gpu_memory_gb, alloc, rate, bottleneck, profile.source, sharing, rates
                )
    whole = _cost(profile, stages)[1]
    for layout in LAYOUTS:
        if layout not in best:
            best[layout] = (
                f"a copy of the cascade needs about {whole:g} GB, over a GPU's {gpu_memory_gb:g} GB"
                if layout == "replicas"
                else "no fused pool fits a GPU's memory"
                if layout == "fused"
                else f"no allocation of {len(stages)} pools fits {gpus} GPU(s) of {gpu_memory_gb:g} GB"
            )
    return {layout: best[layout] for layout in LAYOUTS}


def choose(layouts: dict[str, Plan | str]) -> Plan:
    """The fastest plan; within 1% of it, the one with fewer pools (LAYOUTS' order)."""
    plans = [p for p in layouts.values() if isinstance(p, Plan)]
    if not plans:
        raise PlanError("; ".join(f"{k}: {v}" for k, v in layouts.items()))
    top = max(p.images_per_second for p in plans)
    return next(p for p in plans if p.images_per_second >= top * 0.99)


def plan(profile: Profile, gpus: int, gpu_memory_gb: float, mps: bool = False) -> Plan:
    """The layout, pool sizes and GPU shares that maximise images per second."""
    return choose(plan_layouts(profile, gpus, gpu_memory_gb, mps))


def why(profile: Profile, layouts: dict[str, Plan | str], chosen: Plan) -> list[str]:
    """One line per layout: its predicted rate against the GPUs' bound, or why it has none."""
    bound = chosen.gpus / sum(p.seconds_per_image for p in profile.stages.values())
    lines = []
    for layout, p in layouts.items():
        mark = "chosen" if p is chosen else "      "
        if isinstance(p, Plan):
            lines.append(
                f"  {mark} {layout:8} {p.images_per_hour:10,.0f} images/h, {p.images_per_second / bound:4.0%} of "
                f"the {p.gpus} GPUs' bound; {len(p.pools)} pool(s); limited by {p.bottleneck}"
            )
        else:
            lines.append(f"  {mark} {layout:8} none: {p}")
    return lines


def naive(profile: Profile, gpus: int, gpu_memory_gb: float, mps: bool = False) -> Plan:
    """One pool per stage with an equal share of the GPUs: whole GPUs per actor when there are
    enough, an equal fraction each otherwise (1 / the stages per GPU, so the shares pack: five
    stages on two GPUs get a third each, not 0.4)."""
    stages = [s for s in MODEL_STAGES if s in profile.stages]
    per_stage = gpus / len(stages)
    if per_stage < 1:  # a share that packs: as many stages on each GPU as it takes to seat them all
        per_stage = 1 / math.ceil(len(stages) / gpus)
    alloc = {}
    for stage in stages:
        batch = profile.stages[stage].batch_size
        if per_stage >= 1:
            alloc[stage] = Allocation((stage,), int(per_stage), 1.0, batch)
        else:
            alloc[stage] = Allocation((stage,), 1, math.floor(per_stage * 1e4) / 1e4, batch)
    rate, bottleneck, rates = predict(profile, alloc, gpus, mps)
    sharing = "mps" if mps else "time-slicing"
    return Plan(
        "pipeline", gpus, gpu_memory_gb, alloc, rate, bottleneck, profile.source + ", equal shares", sharing, rates
    )
