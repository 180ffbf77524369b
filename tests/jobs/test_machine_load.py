"""The bench's load monitor: a busy process outside the bench's own process tree is counted, the
bench's own children are not, and a load that differs between the ways voids the pick."""

from __future__ import annotations

import subprocess
import sys
import time

from jobs.machine_load import TOLERATED_CORES, OtherLoad, verdict

BUSY = "import time\nend = time.time() + {s}\nwhile time.time() < end: pass"


def measure(seconds: float, spawn) -> float:
    load = OtherLoad(interval_s=0.2).start()
    start = time.monotonic()
    spawn(seconds)
    time.sleep(seconds)
    end = time.monotonic()
    load.stop()
    return load.cores(start, end)


def test_a_busy_stranger_is_counted_and_the_benchs_own_children_are_not():
    def stranger(seconds):  # the shell exits at once: its busy child is re-parented, no longer ours
        subprocess.run(["sh", "-c", f"{sys.executable} -c '{BUSY.format(s=seconds)}' >/dev/null 2>&1 &"], check=True)

    children = []

    def child(seconds):
        children.append(subprocess.Popen([sys.executable, "-c", BUSY.format(s=seconds)]))

    assert measure(3, stranger) > 0.6  # about one core
    assert measure(3, child) < TOLERATED_CORES
    for c in children:
        c.wait()


def test_the_verdict_names_the_busiest_way():
    assert verdict({"pipeline": 0.05, "replicas": 0.1, "sequential": 0.0}) is None
    said = verdict({"pipeline": 0.05, "replicas": 1.02, "sequential": 0.0})
    assert "up to 1.02 cores" in said and "replicas 1.02" in said and "no pick is reported" in said
