"""A run's state, and the observers told what happens to it.

`Run` owns what one `ifrender run` knows as it goes: the manifest, the output, the clock, the
commits (the output's, gaining this run's), the work left and the pools of every chunk. The
chain and the shard assembly tell it what happens (a chunk starts, a result block arrives, a
shard commits, the run ends), and it tells its observers: the summary, the run report, the
progress watch and the metrics each implement the hooks they need instead of being fed by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from jobs.input.columns import Columns
from jobs.manifest import Manifest
from jobs.output.commits import Commit, Work
from jobs.output.layout import Derived
from jobs.output.leases import Leases
from jobs.run.events import Chunk, Clock, Observer
from jobs.run.stop import Stop
from jobs.run.summary import Summary


@dataclass
class Run:
    manifest: Manifest
    clock: Clock
    commits: dict[int, Commit]  # every committed shard of the output, this run's included
    work: list[Work]  # what this run set out to render
    summary: Summary  # the run's record, and its first observer
    observers: list[Observer] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    left: list[Work] = field(default_factory=list)  # shards left incomplete
    held: list[Work] = field(default_factory=list)  # shards left to another driver that holds them
    index: dict = field(default_factory=dict)  # index.json as the run's end wrote it
    stop: Stop | None = None  # asked by a signal (jobs/run/stop.py)
    columns: Columns = field(default_factory=Columns)  # the input's columns: read, kept (jobs/input/columns.py)
    leases: Leases | None = None  # this driver's claims on the shards it renders (jobs/output/leases.py)

    @property
    def out(self) -> str:
        return self.manifest.output.path

    @property
    def derived(self) -> Derived:
        return Derived.of(self.manifest)

    @property
    def todo(self) -> int:
        return sum(w.shard.todo for w in self.work)

    def __post_init__(self) -> None:
        self.observers.insert(0, self.summary)  # first: the others read its counts

    def observe(self, *observers: Observer) -> None:
        self.observers += observers

    def chunk(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        for o in self.observers:
            o.on_chunk(self, chunk)

    def chunk_ended(self) -> None:
        self.chunks[-1].record["ended_at_s"] = round(self.clock.elapsed(), 1)

    def block(self, block: pa.Table, rows: pa.Table) -> None:
        for o in self.observers:
            o.on_block(self, block, rows)

    def committed(self, commit: Commit) -> None:
        self.commits[commit.shard] = commit
        if self.leases:
            self.leases.release([commit.shard])
        for o in self.observers:
            o.on_commit(self, commit)

    def end(self, index: dict) -> None:
        self.index = index
        for o in self.observers:
            o.on_end(self)
