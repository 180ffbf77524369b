"""A run stopped by a signal loses nothing it rendered. The first SIGTERM or SIGINT (Kubernetes
deleting a pod, a spot node reclaimed, Ctrl-C) asks the run to stop: it starts no new chunk, goes
on committing the shards whose rows come in for ray.stop_grace_s, then publishes what committed
and ends with exit code 4 (the same command finishes the job). A second signal stops at once."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_AT_ONCE = 4  # the second signal: committed shards stay committed, run again


class Stopped(RuntimeError):
    """The grace after a stop signal ran out with shards still open."""


class Stop:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.asked_at: float | None = None
        self.signal = ""
        self._previous: dict = {}

    def install(self) -> None:
        """Take SIGTERM and SIGINT from Ray's handlers (Ray's aborts the driver). Only the main
        thread can: elsewhere (a library caller's thread) signals keep their handlers."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.asked_at is not None:
            sys.stderr.write(
                f"ifrender: {name} again: stopping at once; committed shards stay committed, run the same "
                "command again to finish\n"
            )
            sys.stderr.flush()
            os._exit(EXIT_AT_ONCE)
        self.asked_at, self.signal = time.monotonic(), name
        log.warning(
            "%s: stopping: no new chunk; committing the shards whose rows come in for up to %g s "
            "(ray.stop_grace_s), then exit 4 if any shard is left. A second signal stops at once.",
            name,
            self.grace_s,
        )

    @property
    def asked(self) -> bool:
        return self.asked_at is not None

    def check(self) -> None:
        """Raise Stopped once the grace after a stop signal has run out."""
        if self.asked_at is not None and time.monotonic() - self.asked_at > self.grace_s:
            raise Stopped(f"{self.signal}: stopped after the {self.grace_s:g} s grace (ray.stop_grace_s)")

    def reason(self) -> str:
        return f"{self.signal} received: stopped, with the shards whose rows were in committed"
