"""The driver's view of a run's progress, from the tracker actor (workers/progress.py): the live
progress line with its ETA, the diagnosis of a stalled run (the stage, its queue and its actors),
and the metrics the driver adds (chunks and commits). `stream` iterates the chain's result blocks
while the watch keeps the line going.

A whole-pipeline stall is found by Ray Data's own guard (`execution_no_progress_timeout_s`, set
from ray.no_progress_timeout_s): `stream` turns its ExecutionTimeoutError into `Stalled` with
ifrender's diagnosis. One timer per fault: a batch that hangs inside a stage is the workers'
watchdog's (workers/base.py), which Ray does not have."""

from __future__ import annotations

import logging
import queue
import threading
import time

from jobs.run.events import Observer
from jobs.run.stop import Stop
from jobs.run.summary import Summary, startup_parts
from workers.stages import WRITE

log = logging.getLogger(__name__)

POLL_S = 2  # at most one tracker snapshot per this many seconds; also the stream's wait


class Stalled(RuntimeError):
    """Ray Data saw no block move for ray.no_progress_timeout_s; the message is ifrender's diagnosis."""


class Watch(Observer):
    def __init__(self, run, tracker, display=None) -> None:
        self.run, self.tracker, self.display = run, tracker, display
        self.timeout = run.manifest.ray.no_progress_timeout_s
        self.pools = {stage: name for name, (members, _) in run.manifest.model_pools().items() for stage in members}
        self.pools[WRITE] = WRITE
        self.sizes: dict[str, int] = {}
        self.snap: dict = {}
        self.last_poll = 0.0
        self.first_done: tuple[float, int] | None = None  # (seconds into the run, rows) when rows first finished

    def on_chunk(self, run, chunk) -> None:
        self.sizes = chunk.pools

    def poll(self) -> dict:
        import ray

        if time.perf_counter() - self.last_poll < POLL_S:
            return self.snap
        self.last_poll = time.perf_counter()
        try:
            self.snap = ray.get(self.tracker.snapshot.remote(), timeout=10)
        except Exception as err:  # noqa: BLE001 - a slow tracker delays the check, never the run
            log.debug("progress snapshot failed: %s", err)
        return self.snap

    def check(self) -> None:
        """Called at least every POLL_S seconds while a chunk runs."""
        self.poll()
        if self.display:
            self.display.show(self.line(self.run.summary, self.run.clock.elapsed()))

    def diagnose(self, err: Exception) -> Stalled:
        """Ray's no-progress error as ifrender's: which stage, its queue, its actors."""
        self.last_poll = 0.0
        log.debug("Ray Data: %s", err)
        return Stalled(self.stalled(self.poll(), self.timeout))

    def line(self, summary: Summary, elapsed: float) -> str:
        """Rows and images done, images per second, the ETA (from the first finished row: the
        tracker counts rows as the last stage finishes them, before their shard commits)."""
        (done, ok), todo = self.finished(summary), self.run.todo
        eta = self.eta(done, todo, elapsed)
        queues = self.snap.get("queues", {})
        waiting = ", ".join(f"{s} {q}" for s, q in queues.items() if q)
        actors = self.snap.get("actors", {}).values()
        if not done and all(a["state"] == "loading" for a in actors):
            waiting = "the pools are starting (loading models)" if actors else "starting the pools"
        else:
            waiting = f"queued: {waiting}" if waiting else ""
        return (
            f"{done}/{todo} rows, {ok} images ok, {done - ok} errors; {summary.committed_shards}/"
            f"{len(self.run.work)} shards committed; {ok / elapsed if elapsed else 0:.2f} images/s; "
            f"{_duration(elapsed)} elapsed, ETA {_duration(eta) if eta is not None else 'after the first row'}"
            + (f"; {waiting}" if waiting else "")
        )

    def finished(self, summary: Summary) -> tuple[int, int]:
        """(rows done, of them ok): those the driver holds, or those the chain's last stage has
        finished (before their shard commits), whichever is more."""
        rows = self.snap.get("rows", {})
        last = rows[list(rows)[-1]] if rows else {"out": 0, "ok": 0}
        if summary.rows >= last["out"]:
            return summary.rows, summary.ok
        return min(self.run.todo, last["out"]), min(self.run.todo, last["ok"])

    def eta(self, done: int, todo: int, elapsed: float) -> float | None:
        """Seconds left at the rate since the first rows finished; until a second batch has, at the
        rate of the whole run so far (start-up included: an ETA on the long side)."""
        if done <= 0:
            return None
        if self.first_done is None:
            self.first_done = (elapsed, done)
        since, first = self.first_done
        rate = (done - first) / (elapsed - since) if done > first and elapsed > since else done / max(elapsed, 1e-9)
        return max(0.0, (todo - done) / rate)

    def stalled(self, snap: dict, idle: float, alive: set[str] | None = None) -> str:
        queues = snap.get("queues", {})
        actors = list(snap.get("actors", {}).values())
        alive = _alive_nodes() if alive is None else alive
        stage = stalled_stage(queues, actors, alive) or next(iter(self.pools))
        pool = self.pools[stage]
        actors = [a for a in actors if a["stage"] == stage]
        now = snap.get("now", time.time())
        states = ", ".join(
            f"{a['state']} for {now - a['since']:.0f} s on node {a['node'][:8]}"
            + ("" if a["node"] in alive else " (that node is gone)")
            for a in actors
        )
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
        if self.display:
            self.display.end(self.line(summary, self.run.clock.elapsed()))
        summary.first_work_at, summary.rows_by_node = snap.get("first_work", {}), snap.get("node_rows", {})
        if summary.first_work_at:
            summary.first_batch_s = round(self.run.clock.at(min(summary.first_work_at.values())), 1)
        summary.node_names = {n["NodeID"]: f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}" for n in ray.nodes()}
        summary.actor_starts = [
            {"at_s": round(self.run.clock.at(at), 1), "stage": stage, "node": node}
            for at, stage, node in snap.get("starts", [])
        ]
        summary.startup = startup_parts(snap.get("startup", []), self.run.clock.at)


class Metrics(Observer):
    """What the driver adds to the tracker's Ray metrics: each chunk's pools and rows, each commit."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker

    def on_chunk(self, run, chunk) -> None:
        self.tracker.chunk.remote(chunk.todo, chunk.pools)

    def on_commit(self, run, commit) -> None:
        self.tracker.committed.remote(1, run.summary.ok, run.clock.elapsed())


def stalled_stage(queues: dict[str, int], actors: list[dict], alive: set[str]) -> str | None:
    """The stage a stall is blamed on. The first stage in the chain with rows waiting and no actor
    on a live node (its actors gone with their node, or never started): the stages after it idle
    for want of its rows. Else the last stage with rows waiting: those before it back up behind it."""
    waiting = [s for s, q in queues.items() if q]
    working = {a["stage"] for a in actors if not alive or a["node"] in alive}
    stranded = [s for s in waiting if s not in working]
    if stranded:
        return stranded[0]
    return waiting[-1] if waiting else None


def _alive_nodes() -> set[str]:
    import ray

    try:
        return {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    except Exception as err:  # noqa: BLE001 - the message is still worth giving without it
        log.debug("listing nodes failed: %s", err)
        return set()


def _duration(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def stream(ds, watch: Watch | None, stop: Stop | None = None):
    """The chain's result blocks. With a watch, they are iterated in a thread of their own so that
    the driver keeps its progress line and its stop signal while Ray Data waits: a stop signal's
    grace running out raises Stopped, and Ray's no-progress error becomes Stalled."""
    from ray.data.exceptions import ExecutionTimeoutError

    try:
        yield from _blocks(ds, watch, stop)
    except ExecutionTimeoutError as err:
        if watch is None:
            raise Stalled(f"no progress for {ds.context.execution_no_progress_timeout_s:g} s: {err}") from err
        raise watch.diagnose(err) from err


def _results(ds):
    # No prefetch: Ray Data's default (one batch ahead) hands a block over only once the next one
    # is there, so each shard would commit a whole batch late (measured on local-tiny: the first
    # shard 9 s late) and a stop or kill would lose one more batch of written rows. The blocks
    # are a shard's metadata rows, nothing worth fetching ahead.
    return ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)


def _blocks(ds, watch: Watch | None, stop: Stop | None):
    if watch is None:
        for block in _results(ds):
            if stop:
                stop.check()
            yield block
        return
    blocks: queue.Queue = queue.Queue(maxsize=4)  # bounded: the chain feels the driver's pace
    end = object()

    def pump() -> None:
        try:
            for block in _results(ds):
                blocks.put(block)
            blocks.put(end)
        except BaseException as err:  # noqa: BLE001 - handed to the driver's thread
            blocks.put(err)

    threading.Thread(target=pump, name="ifrender-stream", daemon=True).start()
    while True:
        try:
            item = blocks.get(timeout=POLL_S)
        except queue.Empty:
            watch.check()
            if stop:
                stop.check()
            continue
        if item is end:
            return
        if isinstance(item, BaseException):
            raise item
        watch.check()
        if stop:
            stop.check()
        yield item
