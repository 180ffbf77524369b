"""`ifrender status` stays a few lines for an output of any size: the counts, the first failed and
pending shards, the top errors each with a row id and its source row; --all lists every shard."""

from __future__ import annotations

import json

import numpy as np

from jobs.input.rows import read_shards
from jobs.input.shards import plan_shards, shard_items
from jobs.manifest import load_manifest
from jobs.output.commits import Work, commit_shard
from jobs.output.job_record import check_job
from jobs.output.status import FIRST, status
from workers.columns import METADATA_SCHEMA

SHARDS = 120


def test_status_of_a_large_interrupted_output_is_a_few_lines(tmp_path):
    # Every 7th row has a seed no generator takes: an error row of its own, in its shard.
    rows = [{"prompt": f"prompt {i}", "id": f"r{i}"} | ({"seed": -1} if i % 7 == 3 else {}) for i in range(SHARDS)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = load_manifest(
        None, [f"input.path={tmp_path / 'p.jsonl'}", "input.shard_size=1", f"output.path={tmp_path / 'o'}"]
    )
    out, shards = m.output.path, plan_shards(m.input)
    check_job(out, m, allow_changed=False)
    committed = shards[: SHARDS * 3 // 4]  # the rest are pending: the run was interrupted
    for shard in committed:
        batch = read_shards({k: np.array([v], dtype=object) for k, v in shard_items([shard])[0].items()}, 0, m.input)
        work = Work(shard, 0)
        work.rows = {
            item: dict.fromkeys(METADATA_SCHEMA.names) | {k: batch[k][i] for k in batch if k in METADATA_SCHEMA.names}
            for i, item in enumerate(batch["item"])
        }
        assert commit_shard(out, work, "r1")
    failed = [s.index for s in committed if s.index % 7 == 3]

    text = status(out)
    print(text)
    lines = text.splitlines()
    assert len(lines) <= 2 * FIRST + 12, len(lines)
    assert lines[0].endswith(f"{SHARDS} shards, {len(committed)} committed, {len(failed)} with failed rows, 30 pending")
    assert f"rows {SHARDS}: done {len(committed) - len(failed)}, failed {len(failed)}, pending 30" in lines[1]
    assert f"shards with failed rows (first {FIRST} of {len(failed)}; --all lists every shard):" in lines
    assert f"  shard {failed[0]:6d}: committed attempt 0: done 0, failed 1, pending 0" in lines
    assert f"pending shards (first {FIRST} of 30; --all lists every shard):" in lines
    assert f"  shard {len(committed):6d}: pending: done 0, failed 0, pending 1" in lines
    # The top error, with a row that has it: its id and where it is in the input.
    top = lines.index("top errors:")
    assert lines[top + 1].startswith(f"  x{len(failed)} [fix the input]: seed")
    assert lines[top + 2] == f"      e.g. row id 'r{failed[0]}': row {failed[0] + 1} of {tmp_path / 'p.jsonl'}"

    every = status(out, show_all=True).splitlines()
    assert sum(line.startswith("  shard ") for line in every) == SHARDS
