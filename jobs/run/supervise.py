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
import threading
from collections.abc import Callable

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
INCOMPLETE = 4  # the CLI's exit code for "run the same command again"

# Lines Ray's C++ core writes straight to the driver's stderr (no Python logger to quiet), each
# with why it says nothing to a user; the parent drops them as it relays the child's stderr.
NATIVE_NOISE: tuple[tuple[bytes, str], ...] = (
    (
        b"has constructor arguments in the object store and max_restarts > 0",
        "Ray Data keeps each actor pool's map function in the object store and restarts its actors",
    ),
)


def supervised(job: Callable[[], int], out: str) -> int:
    """Run `job` in a child process. Returns the child's exit code in both processes (the child
    returns from here to exit normally, Ray's own shutdown included); where the child ends
    without one, the parent prints why and returns INCOMPLETE."""
    read_end, write_end = os.pipe()
    err_read, err_write = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.close(err_read)
        os.dup2(err_write, 2)
        os.close(err_write)
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
    os.close(err_write)
    relay = threading.Thread(target=_relay, args=(err_read, 2), name="ifrender-stderr", daemon=True)
    relay.start()
    for signum in FORWARDED:
        signal.signal(signum, lambda s, _frame: _forward(pid, s))
    _, status = _wait(pid)
    relay.join(timeout=5)  # Ray's processes, ending with the child, may hold the pipe a moment longer
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


def _relay(source: int, target: int) -> None:
    """Copy the child's stderr to ours as it comes, less NATIVE_NOISE's lines. A partial line
    goes at once (the live progress line is redrawn without a newline), unless it may be the
    start of a native log line ("[" opens them), which waits for its end."""
    held = b""
    while chunk := os.read(source, 65536):
        held += chunk
        *lines, held = held.split(b"\n")
        out = b"".join(line + b"\n" for line in lines if not any(n in line for n, _ in NATIVE_NOISE))
        if held and not held.startswith(b"["):
            out, held = out + held, b""
        if out:
            os.write(target, out)
    if held:
        os.write(target, held)
    os.close(source)


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
