"""The run's process, watched from outside: `ifrender run` renders in a child process, and the
parent only waits. When the local Ray dies under the driver (a killed raylet, a lost object
store), Ray ends the driver from its C++ core at once (exit 1, no Python handler runs); and the
kernel's OOM killer ends it with SIGKILL. The parent sees the child end without reporting its
exit code, and says so in ifrender's words: what committed stays, run the same command again
(exit 4).

Signals reach the child through the parent, once each: the child leads a process group of its
own, so a terminal's Ctrl-C (sent to the foreground group) and a pod's SIGTERM (sent to the
container's first process) both arrive at the parent, which passes them on. The child's own
handler (jobs/run/stop.py) then drains. A parent killed outright (SIGKILL of its process group,
as a preempted node's) takes the child with it: the child asks the kernel for SIGKILL when its
parent dies (Linux), and Ray's local processes share the child's fate the same way.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
INCOMPLETE = 4  # the CLI's exit code for "run the same command again"


def supervised(job: Callable[[], int], out: str) -> int:
    """Run `job` in a child process. Returns the child's exit code in both processes (the child
    returns from here to exit normally, Ray's own shutdown included); where the child ends
    without one, the parent prints why and returns INCOMPLETE."""
    read_end, write_end = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setpgid(0, 0)
        _die_with(parent)
        code = 1
        try:
            code = job()
        finally:
            os.write(write_end, str(code).encode())
            os.close(write_end)
        return code
    os.close(write_end)
    for signum in FORWARDED:
        signal.signal(signum, lambda s, _frame: _forward(pid, s))
    _, status = _wait(pid)
    reported = b""
    while chunk := os.read(read_end, 64):
        reported += chunk
    os.close(read_end)
    if reported:
        return int(reported)
    cause = (
        f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        if os.WIFSIGNALED(status)
        else f"ended with status {os.WEXITSTATUS(status)}"
    )
    print(
        f"ifrender: stopped: the run's process {cause} before it could finish: its Ray went away (a "
        f"raylet or object store that died ends the driver at once) or the machine ran out of memory. "
        f"{_committed(out)} Fix: run the same command again to render the rest; if it happens again, "
        f"look at the end of /tmp/ray/session_latest/logs/raylet.out and the kernel log (dmesg) for the cause.",
        file=sys.stderr,
    )
    return INCOMPLETE


def _die_with(parent: int) -> None:
    """SIGKILL this process when `parent` dies (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request: follow it now
        os._exit(INCOMPLETE)


def _wait(pid: int) -> tuple[int, int]:
    while True:
        try:
            return os.waitpid(pid, 0)
        except InterruptedError:  # a forwarded signal interrupted the wait
            continue


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _committed(out: str) -> str:
    """What the output holds now, for the message."""
    try:
        from jobs.output.commits import list_commits

        commits = list_commits(out)
    except Exception as err:  # noqa: BLE001 - the message stands without the count
        return f"What committed stays committed ({out} could not be listed: {err})."
    return f"{len(commits)} shard(s) of {out} are committed and stay so."
