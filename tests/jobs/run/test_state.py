"""The Run tells its observers what happens, the summary first; the summary is written at the end."""

from __future__ import annotations

import json

import pyarrow as pa

from jobs.input.shards import Shard
from jobs.output.commits import Commit, Work, to_metadata
from jobs.run.events import Chunk, Clock, Observer
from jobs.run.state import Run
from jobs.run.summary import Summary


class Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_chunk(self, run, chunk):
        self.events.append(("chunk", chunk.todo, dict(chunk.pools)))

    def on_block(self, run, block, rows):
        self.events.append(("block", rows.num_rows, run.summary.rows))  # the summary counted it already

    def on_commit(self, run, commit):
        self.events.append(("commit", commit.shard, run.summary.committed_shards, commit.shard in run.commits))

    def on_end(self, run):
        self.events.append(("end", run.index["rows"]))


def test_observers_hear_each_chunk_block_commit_and_the_end_after_the_summary(tiny_manifest, tmp_path):
    manifest = tiny_manifest(output=str(tmp_path / "out"))
    work = [Work(Shard(0, "in.txt", "text", 0, 2, 0, 0, 1), 0)]
    summary = Summary(manifest.name, manifest.output.path)
    run = Run(manifest, Clock(), {}, work, summary)
    recorder = Recorder()
    run.observe(recorder)
    assert run.observers == [summary, recorder]

    run.chunk(Chunk(work, {"encode": 1, "write": 1}, {"at_s": 0.0, "shards": 1, "pools": {"encode": 1, "write": 1}}))
    block = pa.table(
        {"id": ["a", "b"], "status": ["ok", "error"], "error": ["", "bad seed"], "row": [0, 1], "shard": [0, 0]}
    )
    run.block(block, to_metadata(block, "stage1"))
    run.chunk_ended()
    run.committed(Commit(0, 0, "attempts/000000-000-r.parquet", 2, 1, 1, "r"))
    run.end({"rows": 2, "ok": 1})

    assert recorder.events == [
        ("chunk", 2, {"encode": 1, "write": 1}),
        ("block", 2, 2),
        ("commit", 0, 1, True),
        ("end", 2),
    ]
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (written["rows"], written["ok"], written["error"], written["committed_shards"]) == (2, 1, 1, 1)
    assert written["pool_sizes"][0]["pools"] == {"encode": 1, "write": 1} and "ended_at_s" in written["pool_sizes"][0]
    assert written["output_rows"] == 2 and written["errors"] == {"bad seed": 1}
