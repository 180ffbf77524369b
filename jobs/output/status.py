"""`ifrender status OUTPUT`: an output's commits and its job's input plan in; a few summary lines,
the first failed and pending shards and the top errors (each with a row id and its source line)
out, whatever the number of shards. `--all` lists every shard."""

from __future__ import annotations

import json
from collections import Counter

from jobs.input.shards import plan_shards
from jobs.output.commits import list_commits, read_metadata
from jobs.output.job_record import recorded_manifest
from jobs.output.layout import JOB
from workers.errors import retryable
from workers.storage import join, read_bytes

FIRST = 10  # failed and pending shards listed without --all
EXAMPLES = 200  # error rows read at most, for the top errors (only shards with errors are read)


def status(out: str, show_all: bool = False, top_errors: int = 5) -> str:
    record = read_bytes(join(out, JOB))
    if record is None:
        raise FileNotFoundError(f"{out}: no ifrender job here (no job.json). Expected the output.path of a job.")
    manifest = recorded_manifest(json.loads(record))
    shards = plan_shards(manifest.input)
    commits = list_commits(out)
    totals: Counter[str] = Counter()
    failed, pending, listed = [], [], []
    for shard in shards:
        commit = commits.get(shard.index)
        done, bad = (commit.ok, commit.error) if commit else (0, 0)
        # A committed shard has nothing pending (rows with num_images > 1 are several outputs).
        waiting = 0 if commit else shard.num_rows
        totals.update(rows=done + bad + waiting, done=done, failed=bad, pending=waiting)
        line = (
            f"  shard {shard.index:6d}: "
            + (f"committed attempt {commit.attempt}" if commit else "pending")
            + f": done {done}, failed {bad}, pending {waiting}"
        )
        if bad:
            failed.append((shard, commit, line))
        elif waiting:
            pending.append(line)
        if show_all:
            listed.append(line)
    lines = [
        f"{out}: {manifest.name}: {len(shards)} shards, {len(commits)} committed, {len(failed)} with failed rows, "
        f"{len(pending)} pending",
        f"  rows {totals['rows']}: done {totals['done']}, failed {totals['failed']}, pending {totals['pending']}",
    ]
    if show_all:
        lines += ["every shard:", *listed]
    else:
        for title, group in (("shards with failed rows", [f[2] for f in failed]), ("pending shards", pending)):
            if group:
                more = f" (first {FIRST} of {len(group)}; --all lists every shard)" if len(group) > FIRST else ""
                lines += [f"{title}{more}:", *group[:FIRST]]
    lines += _top_errors(out, failed, top_errors)
    if pending:
        lines.append("next: run the same command again to render what is pending")
    if totals["failed"]:
        lines.append(
            "next: `ifrender run MANIFEST --retry-errors` renders again the failed rows marked [retryable]; fix the "
            "input of the others, then run with --allow-changed"
        )
    return "\n".join(lines)


def _top_errors(out: str, failed: list, top: int) -> list[str]:
    """The most frequent error messages among the failed rows, each with one row that has it:
    its id and where it came from (file and line)."""
    counts: Counter[str] = Counter()
    example: dict[str, dict] = {}
    read = 0
    for _shard, commit, _line in failed:
        if read >= EXAMPLES:
            break
        rows = read_metadata(out, commit, ["id", "error", "source_file", "source_row"])
        for row in rows:
            if row["error"]:
                key = row["error"][:160]
                counts[key] += 1
                example.setdefault(key, row)
                read += 1
    if not counts:
        return []
    sampled = f" (from the first {read} failed rows)" if read >= EXAMPLES else ""
    lines = [f"top errors{sampled}:"]
    for message, n in counts.most_common(top):
        row = example[message]
        kind = "retryable" if retryable(message) else "fix the input"
        lines.append(f"  x{n} [{kind}]: {message}")
        lines.append(f"      e.g. row id {row['id']!r}: row {row['source_row']} of {row['source_file']}")
    return lines
