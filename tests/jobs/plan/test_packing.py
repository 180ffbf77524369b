"""Sizing elastic pools to the cluster as it is (jobs.run.pools.size_pools), the manifest they are
applied to, and the deadlines a run is given (jobs.plan.search.nightly)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from jobs.manifest import MANIFESTS_DIR, load_manifest
from jobs.plan.layouts import with_pool_sizes
from jobs.plan.packing import fits, size_pools
from jobs.plan.schedule import MARGIN, STARTUP_S, nightly
from workers.config import PoolConfig


def pool(**kw) -> PoolConfig:
    return PoolConfig(**kw)


def test_an_elastic_replica_pool_takes_one_actor_per_gpu_node_up_to_its_maximum():
    pools = {"replicas": pool(num_gpus=1, num_cpus=3, max_pool_size=8, resources={"ifrender_gpu": 1}), "write": pool()}
    cluster = lambda nodes: {"CPU": 8 + 4 * nodes, "GPU": nodes, "ifrender_gpu": nodes}  # noqa: E731
    assert size_pools(pools, cluster(0)) == {"replicas": 1, "write": 1}  # waits for a node rather than none
    assert size_pools(pools, cluster(3)) == {"replicas": 3, "write": 1}
    assert size_pools(pools, cluster(12)) == {"replicas": 8, "write": 1}


def test_elastic_pools_grow_in_the_proportion_of_their_pool_sizes():
    pools = {
        "a": pool(num_gpus=0.5, pool_size=1, max_pool_size=10),
        "b": pool(num_gpus=0.5, pool_size=3, max_pool_size=10),
    }
    assert size_pools(pools, {"CPU": 100, "GPU": 4}) == {"a": 2, "b": 6}  # 8 half-GPU slots, 1:3


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, 0.25, 0.5, 1, 2]),  # GPUs per actor
            st.sampled_from([0.5, 1, 3]),  # CPUs per actor
            st.integers(1, 4),  # pool_size
            st.one_of(st.none(), st.integers(0, 12)),  # extra room above pool_size, or fixed
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 16),
    st.integers(1, 64),
)
def test_sized_pools_fit_and_no_elastic_pool_could_take_one_more(specs, gpus, cpus):
    pools = {
        f"p{i}": pool(num_gpus=g, num_cpus=c, pool_size=n, max_pool_size=None if extra is None else n + extra)
        for i, (g, c, n, extra) in enumerate(specs)
    }
    have = {"CPU": cpus, "GPU": gpus}
    sizes = size_pools(pools, have)
    for name, p in pools.items():
        if p.max_pool_size is None:
            assert sizes[name] == p.pool_size  # a fixed pool is never re-sized
        else:
            assert 1 <= sizes[name] <= p.max_pool_size
    grown_past_one = any(sizes[n] > 1 for n, p in pools.items() if p.max_pool_size)
    if grown_past_one:  # growth happens only while everything fits
        assert fits(pools, sizes, have)
    if fits(pools, sizes, have):
        for name, p in pools.items():
            if p.max_pool_size and sizes[name] < p.max_pool_size:
                assert not fits(pools, sizes | {name: sizes[name] + 1}, have), (name, sizes)


def test_max_pool_size_below_pool_size_is_refused_naming_both():
    with pytest.raises(ValidationError, match=r"max_pool_size=2 is below pool_size=3"):
        PoolConfig(pool_size=3, max_pool_size=2)


def test_pool_sizes_apply_to_groups_and_single_stages(tiny_manifest):
    replicas = load_manifest(MANIFESTS_DIR / "cluster-tiny.yaml")
    sized = with_pool_sizes(replicas, {"encode+stage1+stage2+upscale": 3, "write": 5})
    assert sized.model_pools()["encode+stage1+stage2+upscale"][1].pool_size == 3 and sized.write.pool_size == 5
    assert sized.stage_config("upscale").pool_size == 3
    assert replicas.model_pools()["encode+stage1+stage2+upscale"][1].pool_size == 1  # a copy, not an edit
    pipeline = with_pool_sizes(tiny_manifest(), {"encode": 2, "upscale": 4})
    assert pipeline.encode.pool_size == 2 and pipeline.upscale.pool_size == 4 and pipeline.stage1.pool_size == 1


def test_a_night_holds_start_up_one_chunk_and_the_finish_after_the_stop():
    rate, chunk = 5815.0, 4000
    stop, per_night = nightly(rate, chunk, 8 * 3600)
    chunk_s = chunk / rate * 3600 * MARGIN
    assert stop + chunk_s + STARTUP_S <= 8 * 3600 and stop > 6 * 3600
    assert per_night == int(stop / 3600 / MARGIN * rate)
    with pytest.raises(ValueError, match="cannot hold start-up"):
        nightly(rate, 40_000, 8 * 3600)
