"""The Ray a run renders on: the local Ray started or the cluster joined, its Data context, the
run's progress tracker on the head node, the autoscaler asked for the pools' maximum, and the
publish task. `Cluster.start` before the first chunk, `close` when the chunks are over."""

from __future__ import annotations

import logging
import os

from jobs.manifest import Manifest
from jobs.output.layout import Derived
from jobs.output.publish import publish
from jobs.run.pools import bundle, cluster_address, job_pools, local_size
from jobs.run.watch import Metrics, Watch
from workers.noise import VERBOSE
from workers.progress import TRACKER, Progress
from workers.stages import chain_stages

log = logging.getLogger(__name__)

# Ray 2.60 turns a node address of 127.0.0.1 into the machine's reachable one, unless this is
# off: then a local Ray's node, GCS, and the autoscaler's and dashboard's metrics servers bind
# loopback. Read once, when Ray is first imported (ray._private.ray_constants).
LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def keep_local(manifest: Manifest) -> None:
    """For a local run (no cluster to join), keep every Ray endpoint on loopback. Call it before
    anything imports Ray: the CLI does, and Cluster.start does again."""
    if not cluster_address(manifest):
        os.environ.setdefault(LOOPBACK, "0")


class Cluster:
    def __init__(self, manifest: Manifest, tracker, address: str | None) -> None:
        self.manifest, self.tracker, self.address = manifest, tracker, address
        self.watch: Watch | None = None

    @classmethod
    def start(cls, manifest: Manifest, verbose: bool = False) -> Cluster:
        """Ray up (local or joined), its Data context set, the tracker started (the pools were checked
        against what it has before: jobs.run.preflight). Ray Data's progress bars and INFO log
        only when `verbose`: ifrender's own line says what they would (ray-data.log keeps it all)."""
        keep_local(manifest)
        from ray.data import DataContext

        init_ray(manifest, verbose)
        context = DataContext.get_current()
        context.enable_progress_bars = verbose
        if not verbose:
            for handler in logging.getLogger("ray.data").handlers:
                if not isinstance(handler, logging.FileHandler):  # the console, not the session's file
                    handler.setLevel(logging.WARNING)
            # "Progress bars disabled. To enable, ...": they are, on purpose (--verbose has them).
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        # Ray's own guard finds a whole-pipeline stall; jobs/run/watch.stream says which stage it is.
        context.execution_no_progress_timeout_s = manifest.ray.no_progress_timeout_s
        cluster = cls(manifest, start_tracker(manifest), cluster_address(manifest))
        if cluster.address:
            ask_autoscaler(job_pools(manifest))
        return cluster

    def observers(self, run, display=None) -> tuple:
        """The run's observers that live on the cluster: the progress watch (drawing on `display`,
        if any) and the metrics."""
        self.watch = Watch(run, self.tracker, display)
        return self.watch, Metrics(self.tracker)

    def publish_all(self, out: str, shards: list[int], derived: Derived) -> None:
        import ray

        task = publisher()
        ray.get([task.remote(out, s, derived) for s in shards])

    def close(self, run) -> None:
        """What the tracker saw of the cluster into the run's summary; then the tracker and the
        autoscaler request go."""
        import ray

        if self.watch:
            self.watch.record(run.summary)
        ray.kill(self.tracker)
        if self.address:
            stop_asking()


def publisher():
    """publish() as a Ray task: it reads images from storage, so no image passes the driver."""
    import ray

    return ray.remote(publish).options(num_cpus=0.25, max_retries=3)


def init_ray(manifest: Manifest, verbose: bool = False) -> None:
    """Join the manifest's cluster, or start a local Ray sized for the job's pools."""
    import ray

    # A local Ray's token is made and kept by Ray on this machine: its notice asks nothing of the user.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.WARNING if verbose else logging.ERROR
    )
    level = logging.INFO if verbose else logging.WARNING  # "Started a local Ray instance", "Connected to"

    # Workers inherit the environment of a local Ray; a cluster gets it through the runtime env.
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing reaches a hub at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose:
        os.environ[VERBOSE] = "1"  # a local Ray's workers inherit it: the libraries' known warnings show
    if ray.is_initialized():
        return
    address = cluster_address(manifest)
    if address:
        env = {"HF_HUB_OFFLINE": "1"} | ({VERBOSE: "1"} if verbose else {})
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, logging_level=level)
        return
    num_cpus, num_gpus = local_size(manifest)
    # A local run answers no one else: its node address is loopback, no dashboard, and no metrics
    # export (an HTTP endpoint on all interfaces that answers without a token). Ray's gRPC servers
    # still bind every interface in 2.60; its token auth (on by default for a local Ray) guards them.
    ray.init(
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        log_to_driver=True,
        logging_level=level,
        _node_ip_address="127.0.0.1",
        _system_config={"enable_metrics_collection": False},
    )


def start_tracker(manifest: Manifest):
    """The run's Progress actor (workers/progress.py), where the stage actors report, on the head
    node: the node that lives as long as the cluster (and exports its metrics). A local Ray's
    only node is its head."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"]]
    node = heads[0] if heads else ray.get_runtime_context().get_node_id()
    tracker = ray.remote(Progress).options(
        name=TRACKER,
        num_cpus=0,
        max_restarts=-1,  # lost with its node only; a restart starts its counts again
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
    )
    tracker = tracker.remote(manifest.name, list(chain_stages(manifest.stages())))
    ray.get(tracker.snapshot.remote())  # ready before any stage looks it up
    return tracker


def ask_autoscaler(pools: dict) -> None:
    """Tell the cluster's autoscaler (KubeRay's, the launcher's) what the pools could use at most.
    Ray Data sizes a pool to the nodes that are there and so never asks for more nodes by itself;
    without this an autoscaling cluster that starts empty would stay at one node per pool."""
    from ray.autoscaler.sdk import request_resources

    wanted = [bundle(p) for p in pools.values() for _ in range(p.max_pool_size or p.pool_size)]
    request_resources(bundles=wanted)


def stop_asking() -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])
