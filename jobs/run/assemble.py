"""Shard assembly: the chain's metadata rows in, committed shards out. Rows are gathered into
their shards as they stream back; a shard whole is committed (jobs/output/commits.py) and
published in a Ray task (jobs/output/publish.py), so no image passes the driver."""

from __future__ import annotations

import logging
import time

from jobs.output.commits import Work, commit_shard, to_metadata
from jobs.output.publish import write_index
from jobs.run.cluster import publisher
from jobs.run.state import Run
from jobs.run.watch import Watch, stream
from workers.columns import UNWRITTEN
from workers.errors import StorageFailure
from workers.keys import item_key

log = logging.getLogger(__name__)

INDEX_S = 5  # index.json rewritten at most once per this many seconds while shards publish


def assemble(run: Run, ds, pending: dict[int, Work], run_id: str, watch: Watch | None = None) -> dict[int, Work]:
    """Stream the chain's metadata rows into their shards (`pending`, by shard index), committing
    each shard once it is whole and publishing it in a Ray task. Committed shards leave
    `pending`, so after a failure it holds what is left. Returns `pending`."""
    import ray

    out, derived, summary = run.out, run.derived, run.summary
    task = publisher()
    publishing: dict = {}  # task ref -> shard
    open_rows = 0  # rendered rows whose shard is not committed yet
    blocked: set[int] = set()  # shards with a row the storage refused: never committed by this run
    unwritten = ""  # the first such refusal: why the run stops
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
        if done and (wait or time.perf_counter() - last_index > INDEX_S):
            last_index = time.perf_counter()
            write_index(out, run.commits, derived)  # never names a file that is not there

    try:
        for block in stream(ds, watch, run.stop):
            table = to_metadata(block, run.manifest.last_stage)
            run.block(block, table)
            expected = block.column("shard_items").to_pylist()
            for i, row in enumerate(table.to_pylist()):
                if row["status"] == UNWRITTEN:  # the storage refused it: its shard stays open
                    unwritten = unwritten or row["error"]
                    blocked.add(row["shard"])
                w = pending.get(row["shard"])
                if w is None or row["shard"] in blocked:
                    continue  # a retried task's repeat of a shard already committed, or a shard that cannot commit
                item = item_key(row["row"], row["image_index"])
                open_rows += item not in w.rows
                w.rows[item] = row  # keyed by output: a repeated row counts once
                if len(w.rows) == expected[i]:
                    commit = commit_shard(out, pending.pop(row["shard"]), run_id, run.columns.kept)
                    open_rows -= len(w.rows)
                    if commit is not None:
                        run.committed(commit)
                        publishing[task.remote(out, commit.shard, derived)] = commit.shard
                summary.max_uncommitted_rows = max(summary.max_uncommitted_rows, open_rows)
            published(wait=False)
            if unwritten:
                raise StorageFailure(f"the output refused a write: {unwritten}")
    finally:
        published(wait=True)  # what was committed is published, whatever ended the chunk
    return pending
