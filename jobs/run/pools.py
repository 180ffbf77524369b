"""How the stage pools sit on Ray: each pool's actors, GPU reservations, and the block layout into
each pool.

Two things the pools need beyond `map_batches`, both measured in the 8-GPU simulation
(benchmarks/simulate.py), which reached 84-86% of the planned rate without them and 97% with:

- GPU shares reserved largest first. Ray puts a fractional GPU request on the best-fitting GPU
  in the order requests arrive, so shares that pack onto N GPUs in one order may not in another:
  with the pools starting in stage order, 2 of 5 upscale actors waited until stage I's pool
  ended. A placement group per fractional pool, created largest share first, makes Ray pack
  them best-fit decreasing, as `packs` checks.
- Blocks no bigger than a pool's batch. A task takes whole blocks, so a 32-row block from encode
  is one task for one actor while the pool's others wait: 5 upscale actors were 78-100% busy
  with 32-row tasks, 99% each with 4-row ones.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

from jobs.manifest import Manifest
from jobs.plan.packing import fractional
from workers.stages import WRITE

log = logging.getLogger(__name__)


def cluster_address(manifest: Manifest) -> str | None:
    return manifest.ray.address or os.environ.get("RAY_ADDRESS")


def job_pools(manifest: Manifest) -> dict:
    """Every actor pool of the job by name: its model stages' or groups' (Manifest.model_pools) and the writer's."""
    return {name: pool for name, (_, pool) in manifest.model_pools().items()} | {WRITE: manifest.write}


def local_size(manifest: Manifest) -> tuple[int, int]:
    """(logical CPUs, GPUs) of the local Ray a job starts when it joins no cluster. CPUs: enough
    for every pool plus read tasks, else the read task can starve behind the actors and Ray waits
    30 minutes before failing. GPUs: the machine's, unless ray.num_gpus says."""
    import torch

    num_cpus = local_cpus(manifest)
    num_gpus = torch.cuda.device_count() if manifest.ray.num_gpus is None else manifest.ray.num_gpus
    return num_cpus, num_gpus


def local_cpus(manifest: Manifest) -> int:
    needed = sum(c.pool_size * c.num_cpus for c in job_pools(manifest).values()) + 1
    return manifest.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(needed))


def bundle(pool) -> dict[str, float]:
    """What one actor of `pool` (a PoolConfig) reserves; Ray refuses zero amounts in a bundle."""
    wanted = {"GPU": pool.num_gpus, "CPU": pool.num_cpus} | dict(pool.resources)
    return {k: v for k, v in wanted.items() if v > 0}


def reserve(pools: dict, timeout_s: float) -> tuple[dict[str, dict], list]:
    """Placement groups for the pools with fractional GPU shares, created largest share first,
    each ready before the next. Returns per stage the `map_batches` arguments that put its actors
    in its placement group, and the reservations (release them when the chunk ends). Whole-GPU pools need none:
    their actors take GPUs nobody shares."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    args: dict[str, dict] = {}
    reservations: list = []
    order = sorted((s for s, p in pools.items() if fractional(p.num_gpus)), key=lambda s: -pools[s].num_gpus)
    try:
        for stage in order:
            p = pools[stage]
            reserved = placement_group([bundle(p)] * p.pool_size, strategy="PACK")
            reservations.append(reserved)
            ready, _ = ray.wait([reserved.ready()], timeout=timeout_s)
            if not ready:
                raise RuntimeError(
                    f"{stage}: could not reserve {p.pool_size} actor(s) of {bundle(p)} within {timeout_s:g} s "
                    f"(reserved before it: {', '.join(order[: order.index(stage)]) or 'nothing'}). Expected the "
                    f"cluster to have room for every pool. Fix: `ifrender plan` an allocation for this cluster, "
                    f"fewer actors or a smaller num_gpus for {stage}, or a longer ray.reserve_timeout_s "
                    f"while an autoscaler adds nodes."
                )
            args[stage] = {"scheduling_strategy": PlacementGroupSchedulingStrategy(reserved)}
            log.info("reserved %d x %s for %s", p.pool_size, bundle(p), stage)
    except BaseException:
        release(reservations)
        raise
    return args, reservations


def release(reservations: list) -> None:
    from ray.util.placement_group import remove_placement_group

    for reserved in reservations:
        remove_placement_group(reserved)


def mps_env(pool, mps: bool) -> dict:
    """The runtime env that holds an actor with a GPU share to that share of the SMs under MPS;
    without MPS a share is a placement label only."""
    if not (mps and fractional(pool.num_gpus)):
        return {}
    return {"runtime_env": {"env_vars": {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(max(1, round(100 * pool.num_gpus)))}}}


def strategy(pool, placed: bool):
    """The pool's actors: a fixed number, or for a pool with a max_pool_size and no reservation,
    Ray Data's autoscaling pool from this chunk's size up to the maximum, so that a node joining
    mid-chunk takes work without waiting for the next chunk (measured on a local multi-node
    cluster: tests/scenarios/test_cluster.py). Two tasks in flight per actor keep one queued behind
    the one running without the first actor ready taking a whole chunk's blocks."""
    from ray.data import ActorPoolStrategy

    if pool.max_pool_size and not placed and pool.max_pool_size > pool.pool_size:
        return ActorPoolStrategy(min_size=pool.pool_size, max_size=pool.max_pool_size, max_tasks_in_flight_per_actor=2)
    return ActorPoolStrategy(size=pool.pool_size)


def map_pool(ds, fn, pool, rows_in: int, placed: dict | None = None, mps: bool = False, **kwargs):
    """One stage's `map_batches` on its fixed actor pool, blocks re-cut first when they arrive
    bigger than its batch. Returns the dataset and the rows per block the pool hands on."""

    if pool.batch_size < rows_in:
        ds = ds.repartition(target_num_rows_per_block=pool.batch_size)
        rows_in = pool.batch_size
    with warnings.catch_warnings():
        # Ray 2.60 takes a placement group only as a free-form remote argument, deprecated for
        # 2.64; the pin in pyproject.toml keeps it.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*", category=DeprecationWarning)
        ds = ds.map_batches(
            fn,
            compute=strategy(pool, bool(placed)),
            batch_size=pool.batch_size,
            num_gpus=pool.num_gpus,
            num_cpus=pool.num_cpus,
            resources=dict(pool.resources) or None,
            fn_constructor_kwargs=kwargs,
            **(placed or {}),
            **mps_env(pool, mps),
        )
    # A task takes whole blocks until it has a batch, and hands its rows on as one block.
    return ds, math.ceil(pool.batch_size / rows_in) * rows_in
