"""What happens in a run, as its observers see it: the run's clock, a chunk as it started, and the
hooks an observer may implement (jobs/run/state.py's Run calls them)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from jobs.output.commits import Commit, Work

if TYPE_CHECKING:  # for annotations only: the Run holds its observers
    from jobs.run.state import Run


class Clock:
    """The run's one clock: seconds since the run started, and wall times on the same axis."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.wall0 = time.time()  # the wall time at `started`

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def at(self, wall: float) -> float:
        """A wall time (time.time(), as the actors record it) as seconds into the run."""
        return wall - self.wall0


@dataclass
class Chunk:
    """A chunk of shards as it was started: its work, and its pools on the cluster then."""

    work: list[Work]
    pools: dict[str, int]  # actors per pool
    record: dict  # what summary.json keeps of it (pools, nodes, GPUs, when it started and ended)

    @property
    def todo(self) -> int:
        return sum(w.shard.todo for w in self.work)


class Observer:
    """What an observer of a run may implement; every hook does nothing unless overridden."""

    def on_chunk(self, run: Run, chunk: Chunk) -> None: ...

    def on_block(self, run: Run, block: pa.Table, rows: pa.Table) -> None:
        """A result block arrived: `block` as the chain returned it, `rows` as metadata."""

    def on_commit(self, run: Run, commit: Commit) -> None: ...

    def on_end(self, run: Run) -> None:
        """The run is over and its output finished (run.index is set)."""
