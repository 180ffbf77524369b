"""ifrender's job, top to bottom: manifest in -> one Ray Data streaming chain -> images + Parquet out.

    read shards -> encode (T5) -> stage1 (IF-I) -> stage2 (IF-II) -> upscale (x4) -> write

Each model stage is a callable class in its own fixed-size actor pool (workers/); embeddings and
images travel between them as columns through Ray's object store. The driver streams the small
metadata rows back (never an image) and commits each shard once all its rows are in
(jobs/output/commits.py); a Ray task then publishes the shard's files from storage (jobs/output/publish.py).
A re-run of the same command renders only what is missing.
"""

from __future__ import annotations

import json
import logging
import queue
import resource
import threading
import time
import uuid
from dataclasses import asdict

from jobs.input.rows import read_shards
from jobs.input.shards import plan_shards, shard_items
from jobs.manifest import Manifest, with_pool_sizes
from jobs.output.commits import Work, check_input, commit_shard, list_commits, to_metadata, work_left
from jobs.output.job_record import check_job
from jobs.output.publish import Derived, finish_output, publish, write_card, write_index
from jobs.plan.packing import size_pools
from jobs.run.pools import ask_autoscaler, cluster_address, init_ray, job_pools, map_pool, release, reserve, stop_asking
from jobs.run.preflight import check_resources, prepare_output, resolve_models
from jobs.run.report import RunReport
from jobs.run.summary import Summary
from workers.group import GroupWorker
from workers.keys import item_key
from workers.progress import TRACKER, Progress
from workers.sizes import JobSize
from workers.stages import STAGES, drops
from workers.storage import join, write_bytes
from workers.write import WriteWorker

log = logging.getLogger(__name__)


def run(
    manifest: Manifest,
    overwrite: bool = False,
    retry_errors: bool = False,
    allow_changed: bool = False,
    progress: bool = True,
    stop_after_s: float | None = None,
) -> Summary:
    started = time.perf_counter()
    out = manifest.output.path
    # 1. Everything that can fail without a model: input, output, the job record. The input is
    # planned before --overwrite deletes anything.
    shards = plan_shards(manifest.input)
    prepare_output(manifest, overwrite)
    check_job(out, manifest, allow_changed)
    write_card(out, manifest.name, Derived.of(manifest))
    # 2. What is left: shards without a commit, and with --retry-errors the failed rows of the rest.
    commits = list_commits(out)
    changed = check_input(out, shards, commits, allow_changed)
    work = work_left(out, shards, commits, retry_errors, changed)
    summary = Summary(manifest.name, out, skipped_shards=len(shards) - len(work))
    report = RunReport(manifest, started)
    todo = sum(w.shard.todo for w in work)
    log.info(
        "%s: %d rows in %d shards; %d shards committed before, %d rows to render",
        manifest.name,
        sum(s.num_rows for s in shards),
        len(shards),
        len(commits),
        todo,
    )
    if work:
        # 3. The weights, then Ray (local or joined) and the run's progress tracker.
        manifest = resolve_models(manifest)
        init_ray(manifest)
        import ray
        from ray.data import DataContext

        check_resources(manifest, ray.cluster_resources())
        context = DataContext.get_current()
        context.enable_progress_bars = progress
        # Ray's own no-progress limit stays behind ifrender's, which says which stage stalled.
        context.execution_no_progress_timeout_s = max(1800.0, 2 * manifest.ray.no_progress_timeout_s)
        watch = Watch(manifest, start_tracker(manifest), todo, len(work), started)
        if cluster_address(manifest):
            ask_autoscaler(job_pools(manifest))
        try:
            # 4. The chain, chunk by chunk, streamed back row by row; each shard committed once whole.
            left = render_chunks(manifest, work, commits, summary, started, watch, report, stop_after_s)
        finally:
            watch.record(summary)
            ray.kill(watch.tracker)
            if cluster_address(manifest):
                stop_asking()
        summary.uncommitted_shards = len(left)
    # 5. What a kill or a slow writer left unpublished, the job's sheet and index, the summary.
    index = finish_output(out, Derived.of(manifest), submit=_publish_all if work else None)
    write_card(out, manifest.name, Derived.of(manifest), index)
    summary.driver_peak_rss_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    summary.finish(time.perf_counter() - started)
    summary.output_rows, summary.output_ok = index["rows"], index["ok"]
    write_bytes(join(out, "summary.json"), json.dumps(asdict(summary), indent=2).encode())
    report.write(summary, final=True)
    return summary


def read_dataset(manifest: Manifest, work: list[Work]):
    """The chain's start: one read task per shard (its rows, validated), re-cut into blocks of
    the first pools' batch. Returns the dataset and its rows per block."""
    import ray

    rows = manifest.ray.block_rows or min(pool.batch_size for _, pool in manifest.units().values())
    ds = ray.data.from_items(shard_items([w.shard for w in work]), override_num_blocks=len(work))
    ds = ds.map_batches(
        read_shards,
        batch_size=1,
        num_cpus=0.25,
        fn_kwargs={
            "job_seed": manifest.seed,
            "cfg": manifest.input,
            "num_images": manifest.num_images,
            "size": JobSize(manifest.width, manifest.height, manifest.last_stage),
        },
    )
    # Small blocks give each stage several tasks, so the stages overlap instead of taking turns.
    return ds.repartition(target_num_rows_per_block=rows), rows


def build_dataset(manifest: Manifest, work: list[Work], run_id: str, placed: dict[str, dict] | None = None):
    """The Ray Data chain, one line per stage; `placed` holds the pools' placement groups
    (jobs.run.pools.reserve)."""
    placed = placed or {}
    dropped = drops(manifest.last_stage)
    # 1-2. The shards' rows, in blocks.
    ds, rows = read_dataset(manifest, work)

    # 3. The model stages in registry order, each in its pool or fused with its neighbours in a
    # group's (the layout); the last one finishes its images with the safety checker.
    def worker_args(stage: str) -> dict:
        kwargs = {"cfg": manifest.stage_config(stage), "drop": dropped[stage]}
        if stage == manifest.last_stage and manifest.safety.wanted():
            kwargs["safety"] = manifest.safety
        return kwargs

    for name, (members, pool) in manifest.units().items():
        if len(members) == 1:
            fn, kwargs = STAGES[name].worker_class(), worker_args(name)
        else:
            fn, kwargs = GroupWorker, {"stages": [{"stage": s} | worker_args(s) for s in members]}
        ds, rows = map_pool(ds, fn, pool, rows, placed.get(name), manifest.ray.mps, **kwargs)
    # 4. The writer: image files out, their keys and digests on.
    out = manifest.output
    ds, _ = map_pool(
        ds,
        WriteWorker,
        manifest.write,
        rows,
        placed.get("write"),
        output=out.path,
        run_id=run_id,
        image_column=STAGES[manifest.last_stage].image_column,
        attempts={w.shard.index: w.attempt for w in work},
        image_format=out.image_format,
        quality=out.quality,
    )
    return ds


def _publisher():
    """publish() as a Ray task: it reads images from storage, so no image passes the driver."""
    import ray

    return ray.remote(publish).options(num_cpus=0.25, max_retries=3)


def _publish_all(out: str, shards: list[int], derived: Derived) -> None:
    import ray

    task = _publisher()
    ray.get([task.remote(out, s, derived) for s in shards])


class Stalled(RuntimeError):
    """No stage moved for ray.no_progress_timeout_s while rows were waiting."""


def start_tracker(manifest: Manifest):
    """The run's Progress actor (workers/progress.py), where the stage actors report, on the head
    node: the node that lives as long as the cluster (and exports its metrics). A local Ray's
    only node is its head."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    node = heads[0] if heads else ray.get_runtime_context().get_node_id()
    stages = [*manifest.stages(), "write"]
    tracker = ray.remote(Progress).options(
        name=TRACKER,
        num_cpus=0,
        max_restarts=-1,  # lost with its node only; a restart starts its counts again
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
    )
    tracker = tracker.remote(manifest.name, stages)
    ray.get(tracker.snapshot.remote())  # ready before any stage looks it up
    return tracker


def _lost_blocks(err: BaseException) -> bool:
    """A Ray failure of the cluster (a node, an actor, an object lost), not an error in ifrender's code."""
    from ray.data.exceptions import UserCodeException
    from ray.exceptions import RayError

    seen, e = [], err
    while e is not None and len(seen) < 10:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return any(isinstance(e, RayError) for e in seen) and not any(isinstance(e, UserCodeException) for e in seen)


def render_chunks(
    manifest: Manifest,
    work: list[Work],
    commits: dict,
    summary: Summary,
    started: float,
    watch: Watch,
    report: RunReport,
    stop_after_s: float | None = None,
) -> list[Work]:
    """Run the work chunk by chunk (ray.chunk_shards shards each), sizing the elastic pools to
    the cluster before each chunk (jobs.run.pools.size_pools); within a chunk they grow as nodes
    join (jobs.run.pools.strategy). A chunk whose blocks were lost with a node runs its uncommitted shards again
    once; a stall ends the run. Returns the shards left incomplete."""
    import ray

    size = manifest.ray.chunk_shards or len(work)
    remaining, left = list(work), []
    again: set[int] = set()  # shards already run a second time in this run
    nodes: set[str] = set()  # the alive nodes the last chunk saw
    while remaining:
        ran = bool(summary.pool_sizes)  # the first chunk always runs: a night never does nothing
        if ran and stop_after_s is not None and time.perf_counter() - started > stop_after_s:
            log.warning(
                "stopping after %.0f s (--stop-after %g): %d shards left for the same command to render next",
                time.perf_counter() - started,
                stop_after_s,
                len(remaining),
            )
            summary.stopped = f"--stop-after {stop_after_s:g} s reached with {len(remaining)} shards to go"
            return left + remaining
        chunk, remaining = remaining[:size], remaining[size:]
        resources = ray.cluster_resources()
        pools = job_pools(manifest)
        sizes = size_pools(pools, resources)
        sized = with_pool_sizes(manifest, sizes)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        summary.pool_sizes.append(
            {
                "at_s": round(time.perf_counter() - started, 1),
                "shards": len(chunk),
                "pools": sizes,
                "nodes": len(alive),
                "joined": sorted(alive - nodes) if nodes else [],
                "left": sorted(nodes - alive),
                "gpus": resources.get("GPU", 0),
                "gpus_used": sum(sizes[n] * p.num_gpus for n, p in pools.items()),
            }
        )
        nodes = alive
        log.info("chunk of %d shards on pools %s (%g GPUs in the cluster)", len(chunk), sizes, resources.get("GPU", 0))
        watch.tracker.chunk.remote(sum(w.shard.todo for w in chunk), sizes)
        watch.expect(sizes)
        pending = {w.shard.index: w for w in chunk}
        run_id = uuid.uuid4().hex[:8]  # per chunk: a chunk run again writes under names of its own
        placed, groups = reserve(job_pools(sized), manifest.ray.reserve_timeout_s)
        try:
            ds = build_dataset(sized, chunk, run_id, placed)
            collect(sized, ds, pending, commits, run_id, summary, started, watch, report)
        except Stalled as err:
            log.error("%s", err)
            summary.stalled = str(err)
            return left + list(pending.values()) + remaining
        except Exception as err:
            if not _lost_blocks(err):
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
            release(groups)  # a cluster keeps no reservation of an ended chunk
            summary.pool_sizes[-1]["ended_at_s"] = round(time.perf_counter() - started, 1)
        left += list(pending.values())
    return left


class Watch:
    """The driver's view of the run's progress: the live progress line with its ETA, and the
    no-progress check that ends a stalled run naming the stage, its queue and its actors."""

    def __init__(self, manifest: Manifest, tracker, todo: int, shards: int, started: float) -> None:
        self.tracker, self.todo, self.shards, self.started = tracker, todo, shards, started
        self.timeout = manifest.ray.no_progress_timeout_s
        self.units = {stage: name for name, (members, _) in manifest.units().items() for stage in members}
        self.units["write"] = "write"
        self.sizes: dict[str, int] = {}
        self.snap: dict = {}
        self.last_poll = self.last_line = 0.0
        self.last_move = time.time()
        self.marks: tuple = ()

    def expect(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.last_move = time.time()  # a new chunk's actors start loading now

    def poll(self) -> dict:
        import ray

        if time.perf_counter() - self.last_poll < 2:
            return self.snap
        self.last_poll = time.perf_counter()
        try:
            self.snap = ray.get(self.tracker.snapshot.remote(), timeout=10)
        except Exception as err:  # noqa: BLE001 - a slow tracker delays the check, never the run
            log.debug("progress snapshot failed: %s", err)
            return self.snap
        marks = tuple((s, c["last"]) for s, c in self.snap["rows"].items()) + tuple(
            (a, v["since"]) for a, v in self.snap["actors"].items()
        )
        if marks != self.marks:
            self.marks, self.last_move = marks, time.time()
        return self.snap

    def check(self, summary: Summary) -> None:
        """Called at least every two seconds while the chunk runs."""
        snap = self.poll()
        now = time.perf_counter()
        if now - self.last_line >= 5:
            self.last_line = now
            log.info("progress: %s", self.line(summary, now - self.started))
        idle = time.time() - self.last_move
        if idle > self.timeout:
            raise Stalled(self.stalled(snap, idle))

    def moved(self) -> None:
        """Rows reached the driver."""
        self.last_move = time.time()

    def line(self, summary: Summary, elapsed: float) -> str:
        done = summary.rows
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.todo - done) / rate if rate > 0 else float("inf")
        queues = self.snap.get("queues", {})
        waiting = ", ".join(f"{s} {q}" for s, q in queues.items() if q)
        return (
            f"{done}/{self.todo} rows (ok {summary.ok}, error {summary.error}), {summary.committed_shards}/"
            f"{self.shards} shards committed, {summary.ok / elapsed if elapsed else 0:.2f} images/s, "
            f"{elapsed:.0f} s elapsed, ETA {_duration(eta)}" + (f"; queued: {waiting}" if waiting else "")
        )

    def stalled(self, snap: dict, idle: float) -> str:
        queues = snap.get("queues", {})
        # The stalled stage: the last in the chain with rows waiting (those before it back up behind it).
        waiting = [s for s, q in queues.items() if q]
        stage = waiting[-1] if waiting else next(iter(self.units))
        pool = self.units[stage]
        actors = [a for a in snap.get("actors", {}).values() if a["stage"] == stage]
        now = snap.get("now", time.time())
        states = ", ".join(f"{a['state']} for {now - a['since']:.0f} s on node {a['node'][:8]}" for a in actors)
        return (
            f"no progress for {idle:.0f} s (ray.no_progress_timeout_s={self.timeout:g}): stage {stage} (pool "
            f"{pool}, {self.sizes.get(pool, '?')} actors planned) has {queues.get(stage, '?')} queued rows; its "
            f"actors: {states or 'none has started (waiting for resources or a node)'}. Queued rows by stage: "
            f"{queues or 'unknown'}. Committed shards stay committed. Fix: check the cluster has room for the "
            f"pool (`ray status`) and the actors' logs, then run the same command again to resume."
        )

    def record(self, summary: Summary) -> None:
        """Where the run ended, and what the tracker saw of the cluster, into the summary."""
        import ray

        self.last_poll = 0.0
        snap = self.poll()
        log.info("progress: %s", self.line(summary, time.perf_counter() - self.started))
        summary.first_work_at, summary.rows_by_node = snap.get("first_work", {}), snap.get("node_rows", {})
        summary.node_names = {n["NodeID"]: f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}" for n in ray.nodes()}
        wall0 = time.time() - (time.perf_counter() - self.started)
        summary.actor_starts = [
            {"at_s": round(at - wall0, 1), "stage": stage, "node": node} for at, stage, node in snap.get("starts", [])
        ]


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown"
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def stream(ds, watch: Watch, summary: Summary):
    """The chain's result blocks, iterated in a thread of their own so that the driver checks
    progress while Ray Data waits: a stalled stage raises Stalled instead of hanging."""
    blocks: queue.Queue = queue.Queue(maxsize=4)  # bounded: the chain feels the driver's pace
    end = object()

    def pump() -> None:
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                blocks.put(block)
            blocks.put(end)
        except BaseException as err:  # noqa: BLE001 - handed to the driver's thread
            blocks.put(err)

    threading.Thread(target=pump, name="ifrender-stream", daemon=True).start()
    while True:
        try:
            item = blocks.get(timeout=2)
        except queue.Empty:
            watch.check(summary)
            continue
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        watch.moved()
        watch.check(summary)
        yield item


def collect(
    manifest: Manifest,
    ds,
    pending: dict[int, Work],
    commits: dict,
    run_id: str,
    summary: Summary,
    started: float,
    watch: Watch | None = None,
    report: RunReport | None = None,
) -> dict:
    """Stream the chain's metadata rows into their shards (`pending`, by shard index), committing
    each shard once it is whole and publishing it in a Ray task; `commits` (the output's, as
    run() found them) gains this run's, for index.json. Committed shards leave `pending`, so
    after a failure it holds what is left. Returns `pending`."""
    import ray

    out = manifest.output.path
    derived = Derived.of(manifest)
    task = _publisher()
    publishing: dict = {}  # task ref -> shard
    open_rows = 0  # rendered rows whose shard is not committed yet
    last_index = time.perf_counter()

    def published(wait: bool) -> None:
        """Collect finished publish tasks; a failed one is published again by finish_output."""
        nonlocal last_index
        if not publishing:
            return
        done, _ = ray.wait(list(publishing), num_returns=len(publishing), timeout=None if wait else 0)
        for ref in done:
            shard = publishing.pop(ref)
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - the run's end publishes it again
                log.warning("publishing shard %d failed (%s); the end of the run tries again", shard, err)
        if done and (wait or time.perf_counter() - last_index > 5):
            last_index = time.perf_counter()
            write_index(out, commits, derived)  # never names a file that is not there

    blocks = stream(ds, watch, summary) if watch else ds.iter_batches(batch_size=None, batch_format="pyarrow")
    try:
        for block in blocks:
            table = to_metadata(block, manifest.last_stage)
            summary.add(table)
            summary.add_stage_counters(block, manifest.stages())
            if report:
                report.add(block, summary)
            expected = block.column("shard_items").to_pylist()
            for i, row in enumerate(table.to_pylist()):
                w = pending.get(row["shard"])
                if w is None:
                    continue  # a retried task's repeat of a shard already committed
                item = item_key(row["row"], row["image_index"])
                open_rows += item not in w.rows
                w.rows[item] = row  # keyed by output: a repeated row counts once
                if len(w.rows) == expected[i]:
                    commit = commit_shard(out, pending.pop(row["shard"]), run_id)
                    open_rows -= len(w.rows)
                    if commit is not None:
                        summary.committed_shards += 1
                        commits[commit.shard] = commit
                        publishing[task.remote(out, commit.shard, derived)] = commit.shard
                        if watch:
                            watch.tracker.committed.remote(1, summary.ok, time.perf_counter() - started)
                        if report:
                            report.committed(commit.shard)
                summary.max_uncommitted_rows = max(summary.max_uncommitted_rows, open_rows)
            published(wait=False)
            if report:
                report.maybe_write(summary)
    finally:
        published(wait=True)  # what was committed is published, whatever ended the chunk
    return pending
