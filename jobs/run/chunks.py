"""The run chunk by chunk (ray.chunk_shards shards each): before each chunk the elastic pools are
sized to the cluster as it is then (jobs.plan.packing.size_pools), and within a chunk they grow
as nodes join (jobs.run.pools.strategy). A chunk whose blocks were lost with a node runs its
uncommitted shards again once; a stall ends the run; --stop-after starts no further chunk."""

from __future__ import annotations

import logging
import time
import uuid

from jobs.output.commits import Work, committed_attempts, latest_commit, read_marker
from jobs.output.leases import current
from jobs.plan.layouts import with_pool_sizes
from jobs.plan.packing import size_pools
from jobs.run.assemble import assemble
from jobs.run.chain import build_dataset
from jobs.run.cluster import Cluster
from jobs.run.events import Chunk
from jobs.run.pools import job_pools, release, reserve
from jobs.run.state import Run
from jobs.run.stop import Stopped
from jobs.run.watch import Stalled
from workers.errors import StorageFailure, storage_failure

log = logging.getLogger(__name__)


def render_chunks(run: Run, cluster: Cluster, stop_after_s: float | None = None) -> list[Work]:
    """Render run.work; returns the shards left incomplete (also in run.left)."""
    run.left = _render_chunks(run, cluster, stop_after_s) + run.held
    return run.left


def _render_chunks(run: Run, cluster: Cluster, stop_after_s: float | None) -> list[Work]:
    manifest, summary = run.manifest, run.summary
    per_chunk = manifest.ray.chunk_shards or len(run.work)
    remaining, left = list(run.work), []
    again: set[int] = set()  # shards already run a second time in this run
    nodes: set[str] = set()  # the alive nodes the last chunk saw
    while remaining:
        if run.stop and run.stop.asked:  # a signal: no new chunk
            summary.stopped = f"{run.stop.reason()}; {len(remaining)} shards left for the same command"
            return left + remaining
        elapsed = run.clock.elapsed()
        # The first chunk always runs: a night never does nothing.
        if run.chunks and stop_after_s is not None and elapsed > stop_after_s:
            log.warning(
                "stopping after %.0f s (--stop-after %g): %d shards left for the same command to render next",
                elapsed,
                stop_after_s,
                len(remaining),
            )
            summary.stopped = f"--stop-after {stop_after_s:g} s reached with {len(remaining)} shards to go"
            return left + remaining
        work, remaining = remaining[:per_chunk], remaining[per_chunk:]
        work, held = claim(run, work)
        run.held += held
        if not remaining and run.held:  # held by another driver: wait until committed or free
            waiting, run.held = run.held, []
            remaining = wait_for(run, waiting)
        if not work:
            continue
        chunk, nodes = start_chunk(run, work, nodes)
        pending = {w.shard.index: w for w in work}
        run_id = uuid.uuid4().hex[:8]  # per chunk: a chunk run again writes under names of its own
        sized = with_pool_sizes(manifest, chunk.pools)
        placed, reservations = reserve(job_pools(sized), manifest.ray.reserve_timeout_s)
        try:
            ds = build_dataset(sized, work, run_id, placed, run.columns)
            assemble(run, ds, pending, run_id, cluster.watch)
        except Stopped:
            summary.stopped = f"{run.stop.reason()}; {len(pending) + len(remaining)} shards left for the same command"
            log.warning("%s", summary.stopped)
            return left + list(pending.values()) + remaining
        except Stalled as err:
            log.error("%s", err)
            summary.stalled = str(err)
            return left + list(pending.values()) + remaining
        except Exception as err:
            cause = storage_failure(err)
            if isinstance(err, StorageFailure) or cause:  # a full disk, a permission: nothing more can commit
                why = str(err) if isinstance(err, StorageFailure) else f"the output refused a write: {err} ({cause})"
                log.error("%s", why)
                summary.stopped = f"{why}. Committed shards stay committed; run the same command again once fixed"
                return left + list(pending.values()) + remaining
            if not lost_blocks(err):
                raise
            retry = [Work(w.shard, w.attempt, w.carried) for w in pending.values() if w.shard.index not in again]
            gave_up = [w for w in pending.values() if w.shard.index in again]
            log.warning(
                "a chunk failed on the cluster (%s: %s); %d uncommitted shards run again in the next chunk%s",
                type(err).__name__,
                str(err).splitlines()[0][:300] if str(err) else "",
                len(retry),
                f", {len(gave_up)} left for a re-run (they failed twice)" if gave_up else "",
            )
            summary.chunks_lost += 1
            for w in pending.values():
                summary.discard(list(w.rows.values()))
            again |= {w.shard.index for w in retry}
            left += gave_up
            remaining = retry + remaining
            continue
        finally:
            release(reservations)  # a cluster keeps no reservation of an ended chunk
            run.chunk_ended()
        left += list(pending.values())
    return left


WAIT_S = 5  # how often a driver looks at the shards another driver holds


def anything_free(run: Run) -> bool:
    """Whether any shard of the run's work is free of another live driver's lease, after waiting
    while none is: until the other drivers commit them (nothing left to render: no cluster is
    started) or a lease expires (a driver died: its shards are free)."""
    run.work = wait_for(run, run.work)
    return bool(run.work)


def wait_for(run: Run, work: list[Work]) -> list[Work]:
    """`work` once some of it is free: shards another driver commits meanwhile are counted as
    theirs and dropped; returns as soon as any shard has no live lease (or on a stop signal,
    leaving the held ones in run.held)."""
    told = False
    while work:
        leases, now = current(run.out), time.time()
        held = [w for w in work if (lease := leases.get(w.shard.index)) and lease.live(now)]
        if len(held) < len(work):
            return work
        attempts = committed_attempts(run.out)  # one listing a round, however many shards are held
        committed = {w.shard.index for w in held if _done_by_others(run, w, attempts)}
        work = [w for w in work if w.shard.index not in committed]
        if run.stop and run.stop.asked:
            run.held += work
            return []
        if work and not told:
            drivers = sorted({leases[w.shard.index].driver for w in work})
            log.warning(
                "%d shard(s) are being rendered by another driver of this job (%s): waiting for them to "
                "commit, or for a lease to expire",
                len(work),
                ", ".join(drivers),
            )
            run.summary.held_by = sorted(set(run.summary.held_by) | set(drivers))
            told = True
        if work:
            time.sleep(min(WAIT_S, run.manifest.output.lease_s / 4))
    return work


def _done_by_others(run: Run, w: Work, attempts: dict[int, tuple[int, str]] | None = None) -> bool:
    """Whether another driver committed the shard (this attempt or a later one) since this run
    looked; `attempts`: committed_attempts() where the caller listed them already."""
    if attempts is not None:
        attempt, uri = attempts.get(w.shard.index, (-1, ""))
        commit = read_marker(uri) if attempt >= w.attempt else None
    else:
        commit = latest_commit(run.out, w.shard.index)
    if commit is None or commit.attempt < w.attempt:
        return False
    run.commits[w.shard.index] = commit
    run.summary.shards_by_others += 1
    return True


def claim(run: Run, work: list[Work]) -> tuple[list[Work], list[Work]]:
    """(the shards this driver takes a lease on, those another live driver holds). A shard another
    driver committed since this run looked is done: it is counted, never rendered twice."""
    if run.leases is None:
        return work, []
    taken, _ = run.leases.take([w.shard.index for w in work])
    mine, held = [], []
    for w in work:
        if w.shard.index not in taken:
            held.append(w)
        elif _done_by_others(run, w):
            run.leases.release([w.shard.index])
        else:
            mine.append(w)
    return mine, held


def start_chunk(run: Run, work: list[Work], nodes: set[str]) -> tuple[Chunk, set[str]]:
    """The chunk's pools, sized to the cluster now, told to the run. Returns it and the alive nodes."""
    import ray

    resources = ray.cluster_resources()
    pools = job_pools(run.manifest)
    sizes = size_pools(pools, resources)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    record = {
        "at_s": round(run.clock.elapsed(), 1),
        "shards": len(work),
        "pools": sizes,
        "nodes": len(alive),
        "joined": sorted(alive - nodes) if nodes else [],
        "left": sorted(nodes - alive),
        "gpus": resources.get("GPU", 0),
        "gpus_used": sum(sizes[n] * p.num_gpus for n, p in pools.items()),
    }
    log.info("chunk of %d shards on pools %s (%g GPUs in the cluster)", len(work), sizes, resources.get("GPU", 0))
    chunk = Chunk(work, sizes, record)
    run.chunk(chunk)
    return chunk, alive


def lost_blocks(err: BaseException) -> bool:
    """A Ray failure of the cluster (a node, an actor, an object lost), not an error in ifrender's code."""
    from ray.data.exceptions import UserCodeException
    from ray.exceptions import RayError

    seen, e = [], err
    while e is not None and len(seen) < 10:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return any(isinstance(e, RayError) for e in seen) and not any(isinstance(e, UserCodeException) for e in seen)
