"""How actors pack onto a cluster: GPU shares placed as Ray places them (largest first, best fit),
and elastic pools sized to the resources there are. Pure arithmetic: the planner and the run share it."""

from __future__ import annotations


def fits(pools: dict, sizes: dict[str, int], resources: dict[str, float]) -> bool:
    """Whether pools at these sizes fit a cluster of these total resources (ray.cluster_resources):
    CPUs with one to spare for the read and publish tasks, custom resources, and GPU shares as
    `place` packs them."""
    need: dict[str, float] = {}
    shares: list[float] = []
    for name, pool in pools.items():
        for key, amount in ({"CPU": pool.num_cpus} | dict(pool.resources)).items():
            need[key] = need.get(key, 0.0) + amount * sizes[name]
        shares += [pool.num_gpus] * sizes[name]
    if need.get("CPU", 0) > resources.get("CPU", 0) - 1 + 1e-9:
        return False
    if any(need[k] > resources.get(k, 0) + 1e-9 for k in need if k != "CPU"):
        return False
    return packs(shares, int(resources.get("GPU", 0) + 1e-9))


def size_pools(pools: dict, resources: dict[str, float]) -> dict[str, int]:
    """Actors per pool for the cluster as it is now. Fixed pools keep pool_size; a pool with a
    max_pool_size starts at one actor and grows, one actor at a time to the pool furthest below
    its share (pool_size sets the proportions), while the cluster has room, up to its maximum."""
    sizes = {name: pool.pool_size for name, pool in pools.items()}
    elastic = [name for name, pool in pools.items() if pool.max_pool_size]
    sizes |= {name: 1 for name in elastic}
    while True:
        growable = [n for n in elastic if sizes[n] < pools[n].max_pool_size]
        for name in sorted(growable, key=lambda n: sizes[n] / pools[n].pool_size):
            trial = sizes | {name: sizes[name] + 1}
            if fits(pools, trial, resources):
                sizes = trial
                break
        else:
            return sizes


def place(shares: list[float], gpus: int) -> list[list[int]] | None:
    """Where actors with these GPU shares land on `gpus` GPUs, as Ray places them once `reserve`
    orders them: largest first, each fraction on the GPU it fits best (the least room left
    over), each whole number on that many unshared GPUs. Per actor (in the order given) its GPU
    indexes; None when they do not fit."""
    free = [1.0] * gpus
    where: list[list[int]] = [[] for _ in shares]
    for i in sorted(range(len(shares)), key=lambda i: -shares[i]):
        share = shares[i]
        if share <= 0:
            continue
        if share >= 1:
            whole = [g for g, room in enumerate(free) if room == 1.0][: int(share)]
            if len(whole) < share:
                return None
            for g in whole:
                free[g] = 0.0
            where[i] = whole
            continue
        fits = [g for g, room in enumerate(free) if room >= share - 1e-9]
        if not fits:
            return None
        best = min(fits, key=lambda g: free[g] - share)
        free[best] -= share
        where[i] = [best]
    return where


def packs(shares: list[float], gpus: int) -> bool:
    """Whether actors with these GPU shares fit on `gpus` GPUs (see `place`)."""
    return place(shares, gpus) is not None


def fractional(share: float) -> bool:
    return 0 < share < 1
