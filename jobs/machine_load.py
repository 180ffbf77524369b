"""What other processes take of this machine's CPUs while `ifrender bench` measures.

The bench compares ways measured one after another; if something else starts or stops using
cores between them (another job, a build, a test run), the faster way may only have had the
quieter machine. The monitor samples, twice a second, the machine's busy CPU time and the CPU
time of this process and everything it started (a local Ray's raylet and workers included); the
difference is the other processes' share, in cores.
"""

from __future__ import annotations

import os
import threading
import time

# Other processes' use, in cores, that a comparison tolerates: a quiet machine's daemons stay
# well under it; one busy process elsewhere is a whole core.
TOLERATED_CORES = 0.3


class OtherLoad:
    """Cores used by processes outside this process tree, averaged over each measured way."""

    def __init__(self, interval_s: float = 0.5) -> None:
        import psutil

        self.psutil = psutil
        self.interval_s = interval_s
        self.me = psutil.Process(os.getpid())
        self.samples: list[tuple[float, float]] = []  # (wall time, other processes' CPU seconds since start)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _busy(self) -> float:
        t = self.psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)

    def _tree(self) -> dict[int, float]:
        found = {}
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                c = p.cpu_times()
                found[p.pid] = c.user + c.system + c.children_user + c.children_system
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                continue
        return found

    def _run(self) -> None:
        busy, tree, other = self._busy(), self._tree(), 0.0
        self.samples.append((time.monotonic(), other))
        while not self._stop.wait(self.interval_s):
            now_busy, now_tree = self._busy(), self._tree()
            # A process of ours counts from the first sample it is seen in (new ones from 0).
            own = sum(cpu - tree.get(pid, 0.0) for pid, cpu in now_tree.items())
            other += max(0.0, (now_busy - busy) - own)
            busy, tree = now_busy, now_tree
            self.samples.append((time.monotonic(), other))

    def start(self) -> OtherLoad:
        self._thread = threading.Thread(target=self._run, name="ifrender-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def cores(self, start: float, end: float) -> float:
        """Other processes' average use between two time.monotonic() readings, in cores."""
        inside = [(t, c) for t, c in self.samples if start <= t <= end]
        if len(inside) < 2:
            return 0.0
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0


def verdict(other: dict[str, float]) -> str | None:
    """None when the ways ran on an equally quiet machine; else why their comparison is not a pick."""
    busiest = max(other.values(), default=0.0)
    if busiest <= TOLERATED_CORES:
        return None
    shown = ", ".join(f"{way} {cores:.2f}" for way, cores in other.items())
    return (
        f"other processes used up to {busiest:.2f} cores while the ways ran ({shown}; tolerated "
        f"{TOLERATED_CORES}): the ways did not have the same machine, so no pick is reported. Fix: run the "
        f"bench again when nothing else runs here"
    )
