"""ifrender's job, top to bottom: manifest in -> one Ray Data streaming chain per chunk -> images +
Parquet out.

    read shards -> encode (T5) -> stage1 (IF-I) -> stage2 (IF-II) -> upscale (x4) -> write

The chain is built in jobs/run/chain.py; the driver streams the small metadata rows back (never
an image) and commits each shard once all its rows are in (jobs/run/assemble.py,
jobs/output/commits.py); a Ray task then publishes the shard's files from storage
(jobs/output/publish.py). A `Run` (jobs/run/state.py) holds the run's state and tells its
observers (summary, report, progress watch, metrics) what happens. A re-run of the same command
renders only what is missing.
"""

from __future__ import annotations

import logging

from jobs.input.shards import plan_input
from jobs.manifest import Manifest
from jobs.output.card import write_card
from jobs.output.commits import check_input, list_commits, work_left
from jobs.output.job_record import check_job
from jobs.output.layout import Derived
from jobs.output.leases import Leases
from jobs.output.publish import finish_output, write_schema
from jobs.run.chunks import anything_free, render_chunks
from jobs.run.cluster import Cluster
from jobs.run.events import Clock
from jobs.run.preflight import check_output, ready_to_render
from jobs.run.report import RunReport
from jobs.run.state import Run
from jobs.run.stop import Stop
from jobs.run.summary import Summary
from jobs.run.terminal import Display
from workers.errors import StorageFailure, storage_failure
from workers.storage import delete

log = logging.getLogger(__name__)


def run(
    manifest: Manifest,
    overwrite: bool = False,
    retry_errors: bool = False,
    allow_changed: bool = False,
    progress: bool = True,
    stop_after_s: float | None = None,
    verbose: bool = False,
    display: Display | None = None,
) -> Summary:
    """Render what the output lacks. `progress`: ifrender's progress line (on `display`, by
    default stderr); `verbose`: Ray Data's own progress bars and INFO log too."""
    clock = Clock()
    out, derived = manifest.output.path, Derived.of(manifest)

    # 1. Plan the input: shard boundaries and its columns from one streaming pass, before anything is written.
    plan = plan_input(manifest.input)
    shards = plan.shards

    # 2. Preflight: the output can be claimed (writable, new or ifrender's, no link among its
    # folders); with --overwrite the models and resources too, so nothing is deleted before all is checked.
    doomed = check_output(manifest, overwrite)
    ready = ready_to_render(manifest) if overwrite else None  # models resolved; the record keeps their names

    # 3. Claim the output: --overwrite empties it; it holds this job (job.json) and its card.
    delete(out, doomed)
    check_job(out, manifest, allow_changed, plan.columns.kept)
    write_schema(out, plan.columns.kept, derived)
    write_card(out, manifest, derived)

    # 4. Resume: shards without a commit, and with --retry-errors the failed rows of the rest
    # that another try could pass (those that need their input fixed are named, not rendered).
    commits = list_commits(out)
    changed = check_input(out, shards, commits, allow_changed)
    not_retried: list[dict] = []
    work = work_left(out, shards, commits, retry_errors, changed, not_retried)
    summary = Summary(manifest.name, out, skipped_shards=len(shards) - len(work))
    summary.not_retried(not_retried)
    state = Run(manifest, clock, commits, work, summary, columns=plan.columns)
    state.observe(RunReport(manifest, clock, plan.columns))
    log.info(
        "%s: %d rows in %d shards; %d shards committed before, %d rows to render",
        manifest.name,
        sum(s.num_rows for s in shards),
        len(shards),
        len(commits),
        state.todo,
    )

    cluster = None
    if work and anything_free(state):  # shards another driver holds are left to it (jobs/output/leases.py)
        # 5. Start the cluster: models and resources checked, Ray started or joined, the progress tracker.
        manifest = state.manifest = ready or ready_to_render(manifest)
        cluster = Cluster.start(manifest, verbose)
        state.observe(*cluster.observers(state, (display or Display()) if progress else None))
        state.stop = Stop(manifest.ray.stop_grace_s)
        state.stop.install()  # after Ray's start: its own handler aborts the driver

        # 6. Chunk by chunk, each chunk's shards leased: pools sized to the cluster, the chain built,
        # shards assembled and committed.
        state.leases = Leases(out, manifest.output.lease_s).start()
        try:
            render_chunks(state, cluster, stop_after_s)
        finally:
            state.leases.stop()
            state.stop.uninstall()
            cluster.close(state)

    # 7. Finish: publish what a kill or a slow writer left unpublished, the job's sheet, index.json,
    # the card with the counts; the observers write the summary and the report.
    try:
        index = finish_output(out, derived, submit=cluster.publish_all if cluster else None)
        write_card(out, manifest, derived, index)
        state.end(index)
    except Exception as err:
        if cause := storage_failure(err):  # the run ends as a stop: the same command finishes it
            raise StorageFailure(f"finishing {out}: {err} ({cause}); {summary.stopped or 'run again'}") from err
        raise
    return summary
