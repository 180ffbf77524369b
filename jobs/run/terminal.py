"""What a person at the terminal sees of a run: one progress line of ifrender's own, redrawn in
place on a terminal and printed plainly every PLAIN_S when piped; log lines that clear it
first, so nothing interleaves with it; and the licence notice, once, at the start.

Everything else a run could print is quieted where it comes from: Ray Data's progress bars and
its INFO log (on with --verbose), and the libraries' known warnings (workers/noise.py)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

from jobs.manifest import Manifest
from jobs.output.card import IF_LICENCE, model_licences

PLAIN_S = 10  # one progress line per this many seconds when the output is not a terminal
# Set by the CLI for its run process, whose stderr is a pipe to the CLI: whether the CLI's stderr
# is a terminal, and how wide (a live line wider than the terminal would wrap and not be redrawn).
TTY, COLUMNS = "IFRENDER_TTY", "IFRENDER_COLUMNS"


class Display:
    """The progress line: `show` it as often as there is news, `end` it once."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = _is_terminal(self.stream) if live is None else live
        self.shown = ""  # the live line on screen now
        self.printed = 0.0

    def show(self, line: str) -> None:
        line = f"ifrender: {line}"
        if self.live:
            width = _width()
            self.shown = line if len(line) < width else line[: width - 4] + "..."
            self.stream.write("\r\x1b[K" + self.shown)
            self.stream.flush()
        elif time.monotonic() - self.printed >= PLAIN_S:
            self.printed = time.monotonic()
            self.stream.write(line + "\n")
            self.stream.flush()

    def clear(self) -> None:
        """Take the live line off the screen (before another line is printed)."""
        if self.live and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def restore(self) -> None:
        if self.live and self.shown:
            self.stream.write(self.shown)
            self.stream.flush()

    def end(self, line: str | None = None) -> None:
        """The last state of the line, kept on screen (a plain one printed whatever the interval)."""
        if line is not None:
            self.printed = 0.0
            self.show(line)
        if self.live and self.shown:
            self.stream.write("\n")
            self.stream.flush()
        self.shown = ""


class AroundDisplay(logging.Handler):
    """A log handler that prints each record on a line of its own, lifting the live line off
    the screen first and putting it back after."""

    def __init__(self, display: Display) -> None:
        super().__init__()
        self.display = display
        self.setFormatter(Named())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            self.display.clear()
            self.display.stream.write(text + "\n")
            self.display.restore()
        except Exception:  # noqa: BLE001 - logging never raises into the run
            self.handleError(record)


def attach(display: Display) -> AroundDisplay:
    """Route the root logger's output around the display for the run; detach with `detach`."""
    root = logging.getLogger()
    handler = AroundDisplay(display)
    handler.setLevel(logging.NOTSET)
    for old in list(root.handlers):
        if isinstance(old, logging.StreamHandler) and old.stream in (sys.stderr, sys.stdout):
            root.removeHandler(old)
    root.addHandler(handler)
    return handler


def detach(handler: AroundDisplay) -> None:
    root = logging.getLogger()
    root.removeHandler(handler)
    root.addHandler(logging.StreamHandler(sys.stderr))
    root.handlers[-1].setFormatter(Named())


class Named(logging.Formatter):
    """ifrender's own records as "ifrender: ...", a library's under its logger's name."""

    def format(self, record: logging.LogRecord) -> str:
        ours = record.name.split(".")[0] in ("jobs", "workers")
        return f"{'ifrender' if ours else record.name}: {record.getMessage()}"


def licence_notice(manifest: Manifest) -> str | None:
    """The model licences that apply to this job's images, in ifrender's words, or None for
    ifrender's own random-weight models (no licence: they are built here). The dataset card
    names the same (jobs/output/card.py)."""
    found = model_licences(manifest)
    if not found:
        return None
    lines = []
    for name, link, stages in found:
        models = ", ".join(f"{s} {getattr(manifest, s).model}" for s in stages)
        line = f"the weights of {models} are under the {name} ({link})"
        if name == IF_LICENCE[0]:
            checker = manifest.safety.checker
            shown = f"{checker}" if checker != "auto" else "auto (on where the checkpoint has it)"
            line += (
                f", which asks that the safety checker stays on for anything public-facing (safety.checker: {shown})"
            )
        lines.append(line)
    return "licence: " + "; ".join(lines) + "."


def _is_terminal(stream: TextIO) -> bool:
    if os.environ.get(TTY) is not None:
        return os.environ[TTY] == "1"
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _width() -> int:
    """The terminal's columns; 160 where it says none (a pseudo-terminal nobody sized says 0)."""
    columns = os.environ.get(COLUMNS, "")
    if not columns.isdigit():
        try:
            columns = str(os.get_terminal_size(2).columns)
        except OSError:
            columns = "0"
    return int(columns) if int(columns) >= 40 else 160
