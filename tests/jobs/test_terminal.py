"""What a person at a terminal sees of `ifrender run`: a run in a pseudo-terminal, as a user's
shell gives it, with Ray's token auth at its default. ifrender's progress line and nothing of
Ray's display or the libraries' known warnings; an ETA before the first shard commits; the
summary last, naming the report."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

from jobs.manifest import DEFAULT_MANIFEST, load_manifest
from jobs.run.supervise import NATIVE_NOISE
from jobs.run.terminal import licence_notice
from workers.noise import NOISE

ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")


def _in_pty(args: list[str], timeout: float = 300) -> tuple[int, str]:
    """Run `args` with stdin, stdout and stderr on a pseudo-terminal; (exit code, what it showed)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    shown, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed: every process on it has ended
                break
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    code = proc.wait(timeout=max(1, deadline - time.monotonic()))
    os.close(master)
    return code, ANSI.sub(b"", shown).decode(errors="replace")


def test_a_run_in_a_terminal_shows_ifrenders_line_and_the_summary_last(tiny_root, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(8)))
    out = tmp_path / "out"
    sets = {
        "input.path": prompts,
        "input.shard_size": 8,  # one shard: its first rows finish well before it commits
        "output.path": out,
        "last_stage": "stage2",
        "score.enabled": "false",  # local-tiny's one replica, here of encode, stage1 and stage2
        "encode.model": tiny_root / "IF-I-tiny",
        "stage1.model": tiny_root / "IF-I-tiny",
        "stage2.model": tiny_root / "IF-II-tiny",
        "stage1.num_inference_steps": 4,
        "stage2.num_inference_steps": 4,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    code, shown = _in_pty([sys.executable, "-m", "jobs.cli", "run", *args])
    assert code == 0, shown[-3000:]
    print(shown[-2500:])
    # Redrawn in place: each redraw starts with a carriage return.
    frames = [f.strip() for f in re.split(r"[\r\n]", shown) if f.strip()]
    progress = [f for f in frames if re.match(r"ifrender: \d+/8 rows", f)]
    assert progress, shown[-3000:]
    assert "\r" in shown.split("ifrender: 0/8 rows", 1)[-1], "the progress line is not redrawn in place"
    # Nothing of Ray's display or log, nor the named warnings.
    for noise in ("Running Dataset", "logging_progress", "Execution plan", "Started a local Ray", "row/s]",
                  "Token authentication is enabled", "Progress bars disabled"):  # fmt: skip
        assert noise not in shown, noise
    for _logger, start, _why in NOISE:
        assert start not in shown, start
    for line, _why in NATIVE_NOISE:
        assert line.decode() not in shown
    # An ETA before the shard committed: from the first finished rows, not the first shard.
    early = [f for f in progress if "0/1 shards committed" in f and re.search(r"ETA \d+m\d\ds", f)]
    assert early, "\n".join(progress)
    # The summary comes last and names where to look.
    tail = frames[frames.index(next(f for f in frames if " done in " in f)) :]
    assert [f.split(":")[0] for f in tail[1:6]] == ["report", "data", "images", "contact sheet", "read it"], tail
    assert tail[1].endswith(f"{out}/report.html") and "ifrender:" not in "".join(tail[1:])
    assert "start-up: pools sized at" in shown and "first shard committed at" in shown
    # Each stage's start-up in its parts, in the order they happen; in one replica the stages load in turn.
    parts = re.search(r"start-up by stage, s into the run \(median of its actors\): [^:]+: (.*)", shown).group(1)
    ends = {s.split(" ")[0]: [float(v) for v in s.split(" ", 1)[1].split(" / ")] for s in parts.strip().split("; ")}
    assert set(ends) == {"encode", "stage1", "stage2", "write"}, parts
    for stage in ends:
        assert len(ends[stage]) == 5 and ends[stage] == sorted(ends[stage]), parts
    assert ends["encode"][2] <= ends["stage1"][1] <= ends["stage1"][2] <= ends["stage2"][1], parts


def test_the_licence_notice_names_real_weights_only(tiny_manifest):
    tiny = tiny_manifest()
    assert licence_notice(tiny) is None  # ifrender's own random-weight builds, in tiny_root
    assert licence_notice(load_manifest(DEFAULT_MANIFEST)) is None  # tiny:NAME
    real = tiny.model_copy(
        update={
            s: getattr(tiny, s).model_copy(update={"model": m})
            for s, m in (
                ("encode", "DeepFloyd/IF-I-XL-v1.0"),
                ("stage1", "DeepFloyd/IF-I-XL-v1.0"),
                ("upscale", "stabilityai/stable-diffusion-x4-upscaler"),
            )
        }
    )
    notice = licence_notice(real)
    assert "DeepFloyd IF License Agreement" in notice and "stage1 DeepFloyd/IF-I-XL-v1.0" in notice
    assert "stage2 " not in notice and "CreativeML Open RAIL++-M" in notice
