"""Leases: which driver renders a shard now, so that two drivers of one job on one output (an
overlapping nightly run, a retry started by hand) share the work instead of both rendering all
of it.

A lease is `leases/<shard>-<generation>.json`, created once (create-exclusive: a conditional PUT
on S3, link() locally), holding its driver and when it expires. The shard's lease is its highest
generation. A driver takes a shard when it has no lease, or its lease expired (a dead driver's),
by creating the next generation: of two drivers racing for it one wins. A lease of a process of
this machine that is gone counts as expired. While it renders, it
renews its leases (rewriting its own files); on a commit, or at its end, it releases them.

Leases save work; they never decide correctness. The commit marker does (jobs/output/commits.py):
if a slow driver's lease expires and another takes the shard over, both may render it, and still
one commit wins and every row is in the output once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from jobs.output.layout import LEASE, LEASES, lease_key
from workers.storage import create_exclusive, delete, join, list_prefix, read_bytes, write_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    shard: int
    generation: int
    driver: str  # who holds it: host, pid and a random part
    expires: float  # wall-clock seconds

    def live(self, now: float) -> bool:
        """Unexpired, and not held by a process of this machine that is gone (a driver that
        crashed here frees its shards for the next run at once, not after lease_s)."""
        if self.expires <= now:
            return False
        host, _, rest = self.driver.partition(":")
        pid = rest.partition(":")[0]
        if host != socket.gethostname() or not pid.isdigit():
            return True
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: alive
            return True
        return True


def driver_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def current(out: str) -> dict[int, Lease]:
    """Each leased shard's lease now (its highest generation), from one listing."""
    latest: dict[int, tuple[int, str]] = {}
    for key in list_prefix(out, LEASES):
        match = LEASE.match(key)
        if match and int(match[2]) >= latest.get(int(match[1]), (-1, ""))[0]:
            latest[int(match[1])] = (int(match[2]), key)
    found = {}
    for shard, (generation, key) in latest.items():
        data = read_bytes(join(out, key))
        try:
            record = json.loads(data) if data is not None else None
            found[shard] = Lease(shard, generation, str(record["driver"]), float(record["expires"]))
        except (ValueError, TypeError, KeyError):  # released meanwhile, or unreadable: free to take
            found[shard] = Lease(shard, generation, "", 0.0)
    return found


class Leases:
    """One driver's leases on an output: taken shard by shard, renewed in a thread, released."""

    def __init__(self, out: str, lease_s: float, driver: str | None = None) -> None:
        self.out, self.lease_s = out, lease_s
        self.driver = driver or driver_name()
        self.held: dict[int, int] = {}  # shard -> the generation this driver holds
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"driver": self.driver, "expires": time.time() + self.lease_s}).encode()

    def take(self, shards: list[int]) -> tuple[list[int], dict[int, Lease]]:
        """(the shards this driver now holds, {shard: the live lease of another driver} for the rest)."""
        now, leases = time.time(), current(self.out)
        taken, others, lost = [], {}, []
        for shard in shards:
            lease = leases.get(shard)
            if lease and lease.driver != self.driver and lease.live(now):
                others[shard] = lease
                continue
            generation = lease.generation + 1 if lease else 0
            if create_exclusive(join(self.out, lease_key(shard, generation)), self._record()):
                with self.lock:
                    self.held[shard] = generation
                taken.append(shard)
                if lease:  # the expired or released generations before: nobody holds them
                    delete(self.out, [lease_key(shard, g) for g in range(lease.generation + 1)])
            else:
                lost.append((shard, generation))
        if lost:  # another driver created these first: one more listing says who
            leases = current(self.out)
            others |= {s: leases.get(s) or Lease(s, g, "another driver", now) for s, g in lost}
        return taken, others

    def renew(self) -> None:
        """Push back the expiry of every lease this driver holds; one another driver took over
        (this driver's expired while it was too slow to renew) is dropped, with a warning."""
        with self.lock:
            held = dict(self.held)
        leases = current(self.out)
        for shard, generation in held.items():
            now = leases.get(shard)
            with self.lock:  # a lease released meanwhile is not written again
                if self.held.get(shard) != generation:
                    continue
                if now is not None and now.generation != generation:
                    log.warning(
                        "shard %d: another driver (%s) took over this driver's expired lease", shard, now.driver
                    )
                    self.held.pop(shard)
                    continue
                write_bytes(join(self.out, lease_key(shard, generation)), self._record())

    def release(self, shards: list[int]) -> None:
        with self.lock:
            keys = [lease_key(s, self.held.pop(s)) for s in shards if s in self.held]
        delete(self.out, keys)

    def start(self) -> Leases:
        """Renew every lease_s / 4 seconds until stop()."""

        def loop() -> None:
            while not self.done.wait(self.lease_s / 4):
                try:
                    self.renew()
                except Exception as err:  # noqa: BLE001 - a missed renewal costs at most a shared shard
                    log.warning("renewing the shard leases failed: %s", err)

        self.thread = threading.Thread(target=loop, name="ifrender-leases", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing and release every lease still held."""
        self.done.set()
        if self.thread:
            self.thread.join()
        with self.lock:
            shards = list(self.held)
        self.release(shards)
