"""`ifrender status OUTPUT`: an output's commits and its job's input plan in; done / pending / failed per shard out."""

from __future__ import annotations

import json
from collections import Counter

from jobs.input.shards import plan_shards
from jobs.output.commits import list_commits, read_metadata
from jobs.output.job_record import recorded_manifest
from jobs.output.layout import JOB
from workers.storage import join, read_bytes


def status(out: str, show_all: bool = False, top_errors: int = 5) -> str:
    record = read_bytes(join(out, JOB))
    if record is None:
        raise FileNotFoundError(f"{out}: no ifrender job here (no job.json). Expected the output.path of a job.")
    manifest = recorded_manifest(json.loads(record))
    shards = plan_shards(manifest.input)
    commits = list_commits(out)
    errors: Counter[str] = Counter()
    lines, clean = [], 0
    totals = Counter()
    for shard in shards:
        commit = commits.get(shard.index)
        done, failed = (commit.ok, commit.error) if commit else (0, 0)
        # A committed shard has nothing pending (rows with num_images > 1 are several outputs).
        pending = 0 if commit else shard.num_rows
        totals.update(rows=done + failed + pending, done=done, failed=failed, pending=pending)
        if commit and commit.error:
            errors.update(r["error"][:160] for r in read_metadata(out, commit, ["error"]) if r["error"])
        if failed or pending or show_all:
            state = "committed" if commit else "pending"
            attempt = f" attempt {commit.attempt}" if commit else ""
            lines.append(f"  shard {shard.index:6d}: {state}{attempt}: done {done}, failed {failed}, pending {pending}")
        else:
            clean += 1
    head = [
        f"{out}: {manifest.name}: {len(shards)} shards, {len(commits)} committed",
        f"  rows {totals['rows']}: done {totals['done']}, failed {totals['failed']}, pending {totals['pending']}",
    ]
    if clean and not show_all:
        lines.append(f"  ({clean} shards committed with every row done; --all lists them)")
    if errors:
        lines.append("most frequent errors:")
        lines += [f"  x{n}: {message}" for message, n in errors.most_common(top_errors)]
    return "\n".join(head + lines)
