"""Leases on a local disk and a real S3 server: one driver per shard, however they race; a dead
driver's shards taken over once its lease expires; renewed leases kept; released ones free."""

from __future__ import annotations

import random
import threading
import time

from jobs.output.leases import Leases, current


def test_a_second_driver_skips_what_the_first_holds_and_takes_what_it_releases(output):
    first, second = Leases(output, 60, "first"), Leases(output, 60, "second")
    assert first.take([0, 1, 2])[0] == [0, 1, 2]
    taken, others = second.take([1, 2, 3])
    assert taken == [3] and {s: lease.driver for s, lease in others.items()} == {1: "first", 2: "first"}
    first.release([1])
    assert second.take([1, 2])[0] == [1]
    assert {s: lease.driver for s, lease in current(output).items()} == {
        0: "first",
        1: "second",
        2: "first",
        3: "second",
    }
    first.stop()
    second.stop()
    assert current(output) == {}


def test_an_expired_lease_is_taken_over_and_its_late_holder_lets_go(output):
    dead = Leases(output, 0.3, "dead")
    assert dead.take([0, 1])[0] == [0, 1]
    time.sleep(0.5)  # no renewal: the driver is gone
    heir = Leases(output, 60, "heir")
    assert heir.take([0, 1])[0] == [0, 1]
    assert {lease.generation for lease in current(output).values()} == {1}
    dead.renew()  # a driver that was only slow finds its shards taken and drops them
    assert dead.held == {} and {lease.driver for lease in current(output).values()} == {"heir"}


def test_a_renewed_lease_outlives_its_first_expiry(output):
    keeper = Leases(output, 0.6, "keeper").start()  # renews every 0.15 s
    assert keeper.take([5])[0] == [5]
    time.sleep(1.2)
    assert Leases(output, 60, "other").take([5])[0] == []
    keeper.stop()
    assert Leases(output, 60, "other").take([5])[0] == [5]


def test_racing_drivers_take_each_shard_exactly_once(output):
    shards, drivers = list(range(12)), [Leases(output, 60, f"d{i}") for i in range(6)]
    taken: dict[str, list[int]] = {}
    barrier = threading.Barrier(len(drivers))

    def race(leases: Leases) -> None:
        order = random.Random(leases.driver).sample(shards, len(shards))  # each its own order: real contention
        barrier.wait()
        taken[leases.driver] = leases.take(order)[0]

    threads = [threading.Thread(target=race, args=(d,)) for d in drivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = sorted(s for got in taken.values() for s in got)
    print(f"shards won per driver: {sorted(len(v) for v in taken.values())}")
    assert won == shards  # every shard once: none twice, none lost
    assert {s: lease.driver for s, lease in current(output).items()} == {s: d for d, got in taken.items() for s in got}


def test_a_lease_of_a_process_gone_from_this_machine_is_free_at_once(output, tmp_path):
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = Leases(output, 600, f"{socket.gethostname()}:{int(gone.stdout)}:abc123")  # a crashed driver's lease
    assert dead.take([0])[0] == [0]
    elsewhere = Leases(output, 600, "another-host:1:abc123")
    assert elsewhere.take([1])[0] == [1]
    heir = Leases(output, 600, "heir")
    assert heir.take([0, 1])[0] == [0]  # the dead local driver's shard at once; the other host's waits
