"""The shard plan's fingerprints: every edit of the input is seen, and only an edit."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.input.shards import plan_shards
from jobs.manifest import InputConfig

TRIALS = 200


def _plan(path, shard_size: int = 16) -> list[str]:
    return [s.sha256 for s in plan_shards(InputConfig(path=str(path), shard_size=shard_size))]


def test_an_in_place_edit_of_one_prompt_changes_its_shards_fingerprint_in_every_trial(tmp_path):
    """One character of one prompt changed (the file's size and row groups alike), written with
    pyarrow's defaults and uncompressed: the edited shard's fingerprint changes, no other's does."""
    rng = random.Random(7)
    seen = {"default": 0, "none": 0}
    for trial in range(TRIALS):
        prompts = [f"prompt {i}: a {rng.choice(['red', 'blue', 'green'])} fox" for i in range(64)]
        compression = "none" if trial % 2 else "snappy"
        path = tmp_path / f"t{trial}.parquet"
        pq.write_table(pa.table({"prompt": prompts}), path, compression=compression, row_group_size=20)
        before = _plan(path)
        row = rng.randrange(len(prompts))
        prompts[row] = prompts[row][:-3] + ("cat" if not prompts[row].endswith("cat") else "dog")
        pq.write_table(pa.table({"prompt": prompts}), path, compression=compression, row_group_size=20)
        after = _plan(path)
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
        assert changed == [row // 16], (trial, row, changed)
        seen["none" if trial % 2 else "default"] += 1
    print(f"in-place edits seen: {seen} of {TRIALS // 2} each (compression none / pyarrow's default)")


def test_reshuffled_rows_change_the_fingerprint_and_a_rewrite_of_the_same_rows_does_not(tmp_path):
    prompts = [f"prompt {i}" for i in range(100)]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": prompts, "seed": list(range(100))}), path, compression="none")
    base = _plan(path)
    shuffled = prompts[:]
    random.Random(1).shuffle(shuffled)
    pq.write_table(pa.table({"prompt": shuffled, "seed": list(range(100))}), path, compression="none")
    assert all(a != b for a, b in zip(base, _plan(path)))
    # The same rows in other row groups, pages and compression: the same fingerprints.
    for row_group_size, compression in ((7, "zstd"), (100, "gzip"), (33, "none")):
        pq.write_table(
            pa.table({"prompt": prompts, "seed": list(range(100))}),
            path,
            compression=compression,
            row_group_size=row_group_size,
            data_page_size=64,
        )
        assert _plan(path) == base, (row_group_size, compression)
