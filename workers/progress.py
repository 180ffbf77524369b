"""The run's progress, counted where the work happens: every stage actor reports its loading and
each batch it starts and finishes to one small actor per run (`Progress`), which keeps the
counts, hands the driver a snapshot (the no-progress check, the progress line) and exports them
as Ray metrics on the cluster's Prometheus endpoint.

Reports are fire-and-forget actor calls (well under a millisecond each, one per batch), so a
slow or missing tracker never slows a stage; outside a run (the bench, a unit test) there is no
tracker and reporting does nothing.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

TRACKER = "ifrender-progress"  # the actor's name in the job's namespace: one per driver


class Progress:
    """Counts per stage (rows in, rows out, ok, failed), per actor (node, state, since when) and
    per node (first work), and the driver's commits. Also the Ray metrics:

    - ifrender_rows{stage, status}: rows a stage finished, status ok or failed (counter)
    - ifrender_queue_rows{stage}: rows handed to a stage and not yet finished by it (gauge)
    - ifrender_shard_commits: shards committed (counter)
    - ifrender_images_per_second: ok images committed per second, over the run (gauge)
    - ifrender_pool_actors{pool}: actors in each pool of the chunk running (gauge)
    """

    def __init__(self, job: str, stages: list[str]) -> None:
        from ray.util.metrics import Counter, Gauge

        self.stages = stages
        self.started_at = time.time()
        self.rows = {s: {"in": 0, "out": 0, "ok": 0, "failed": 0, "last": 0.0} for s in stages}
        self.actors: dict[str, dict] = {}
        self.first_work: dict[str, float] = {}  # node id -> wall time its first batch finished
        self.node_rows: dict[str, dict[str, int]] = {}  # node id -> stage -> rows finished there
        self.starts: list[tuple[float, str, str]] = []  # (wall time, stage, node) per actor start
        # (actor, stage) -> wall times: process started, worker loading, loaded, first call, first done
        self.startup: dict[tuple[str, str], dict] = {}
        self.todo = 0  # rows handed to the chain so far (the first stage's queue)
        self.commits = 0
        tags = {"job": job}
        self.m_rows = Counter("ifrender_rows", "Rows a stage finished, by status", tag_keys=("job", "stage", "status"))
        self.m_queue = Gauge("ifrender_queue_rows", "Rows waiting in or for a stage", tag_keys=("job", "stage"))
        self.m_commits = Counter("ifrender_shard_commits", "Shards committed", tag_keys=("job",))
        self.m_rate = Gauge("ifrender_images_per_second", "Ok images committed per second", tag_keys=("job",))
        self.m_pool = Gauge("ifrender_pool_actors", "Actors per pool", tag_keys=("job", "pool"))
        for m in (self.m_rows, self.m_queue, self.m_commits, self.m_rate, self.m_pool):
            m.set_default_tags(tags)

    def _actor(self, actor: str, stage: str, node: str, state: str) -> None:
        self.actors[actor] = {"stage": stage, "node": node, "state": state, "since": time.time()}

    def loading(self, stage: str, actor: str, node: str, process_start: float = 0.0) -> None:
        """An actor starts: it loads its models, then waits for its first batch."""
        self._actor(actor, stage, node, "loading")
        if len(self.starts) < 10_000:
            self.starts.append((time.time(), stage, node))
            self.startup[(actor, stage)] = {"stage": stage, "process": process_start, "loading": time.time()}
        self.rows[stage]["last"] = time.time()

    def loaded(self, stage: str, actor: str, node: str) -> None:
        """The stage's models are loaded in this actor (what follows is waiting for a batch)."""
        self._part(actor, stage, "loaded")

    def _part(self, actor: str, stage: str, part: str) -> None:
        parts = self.startup.get((actor, stage))
        if parts is not None:
            parts.setdefault(part, time.time())

    def started(self, stage: str, actor: str, node: str, rows: int) -> None:
        self._actor(actor, stage, node, "busy")
        self._part(actor, stage, "first_call")
        counts = self.rows[stage]
        counts["in"] += rows
        counts["last"] = time.time()
        self._queues()

    def finished(self, stage: str, actor: str, node: str, ok: int, failed: int) -> None:
        self._actor(actor, stage, node, "idle")
        self._part(actor, stage, "first_done")
        counts = self.rows[stage]
        counts["out"] += ok + failed
        counts["ok"] += ok
        counts["failed"] += failed
        counts["last"] = time.time()
        self.first_work.setdefault(node, counts["last"])
        on_node = self.node_rows.setdefault(node, {})
        on_node[stage] = on_node.get(stage, 0) + ok + failed
        for status, n in (("ok", ok), ("failed", failed)):
            if n:
                self.m_rows.inc(n, {"stage": stage, "status": status})
        self._queues()

    def chunk(self, rows: int, pools: dict[str, int]) -> None:
        """The driver hands the chain another chunk of `rows` rows, on pools of these sizes."""
        self.todo += rows
        for pool, size in pools.items():
            self.m_pool.set(size, {"pool": pool})
        self._queues()

    def committed(self, shards: int, ok_images: int, elapsed: float) -> None:
        self.commits += shards
        self.m_commits.inc(shards)
        self.m_rate.set(ok_images / elapsed if elapsed > 0 else 0.0)

    def queues(self) -> dict[str, int]:
        """Rows each stage has been handed (by the stage before it, or the chunks for the first)
        and not finished."""
        out, before = {}, self.todo
        for stage in self.stages:
            counts = self.rows[stage]
            out[stage] = max(0, before - counts["out"])
            before = counts["out"]
        return out

    def _queues(self) -> None:
        for stage, rows in self.queues().items():
            self.m_queue.set(rows, {"stage": stage})

    def snapshot(self) -> dict:
        return {
            "now": time.time(),
            "rows": self.rows,
            "queues": self.queues(),
            "actors": self.actors,
            "first_work": self.first_work,
            "node_rows": self.node_rows,
            "starts": self.starts,
            "startup": list(self.startup.values()),
            "commits": self.commits,
        }


def process_started() -> float:
    """When this process started (wall time): what an actor spent before its worker's code ran."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - progress only
        return 0.0


class Reporter:
    """A stage actor's side: finds its run's tracker once and reports to it, never raising."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.tracker = None
        self.actor = self.node = ""
        try:
            import ray

            if not ray.is_initialized():
                return
            context = ray.get_runtime_context()
            self.actor = context.get_actor_id() or context.get_worker_id()
            self.node = context.get_node_id()
            self.tracker = ray.get_actor(TRACKER)
        except Exception:  # noqa: BLE001 - no tracker (bench, tests): nothing to report to
            self.tracker = None

    def __call__(self, event: str, *args) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, event).remote(self.stage, self.actor, self.node, *args)
        except Exception as err:  # noqa: BLE001 - progress is never worth failing a batch
            log.debug("%s: progress report %s failed: %s", self.stage, event, err)
