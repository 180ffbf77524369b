"""The base stage contract: a failing row fails alone, out of memory fails rows with advice, a hung
or broken stage exits its process so Ray restarts it."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.helpers import (
    rows,
    stage_cfg,
)
from workers.base import StageWorker


def test_a_failing_row_fails_alone():
    class Picky(StageWorker):
        stage, needs = "picky", ("prompt",)

        def run(self, batch, rows, params):
            if any("bad" in p for p in batch["prompt"][rows]):
                raise ValueError("cannot draw that")
            return {"out": np.ones(len(rows))}

        def blank(self, batch, n):
            return {"out": np.zeros(n)}

    cfg = stage_cfg(micro_batch=2)
    out = Picky(cfg, {})(rows(["good", "bad one", "fine"]))
    assert list(out["status"]) == ["ok", "error", "ok"]
    assert out["error"][1] == "picky: ValueError: cannot draw that"
    assert list(out["out"]) == [1, 0, 1]


def test_out_of_memory_fails_rows_with_advice():
    class Greedy(StageWorker):
        stage, needs = "greedy", ("prompt",)

        def run(self, batch, rows, params):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        def blank(self, batch, n):
            return {}

    cfg = stage_cfg(micro_batch=4)
    out = Greedy(cfg, {})(rows(["a", "b"]))
    assert list(out["status"]) == ["error", "error"]
    assert "out of GPU memory at micro_batch=4; lower micro_batch" in out["error"][0]


HANG_OR_BREAK = """
import sys, time, types
import numpy as np
from workers.base import StageWorker

class Stuck(StageWorker):
    stage, needs = "stuck", ()
    def run(self, batch, rows, params):
        if sys.argv[1] == "hang":
            time.sleep(60)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    def blank(self, batch, n):
        return {}

cfg = types.SimpleNamespace(model="m", micro_batch=1, device="cpu", num_gpus=0, dtype="fp32", variant=None, watchdog_s=1,
                            offload="none", attention="sdpa", compile=False)
row = {k: np.array([v], dtype=object) for k, v in dict(id="a", prompt="p", negative_prompt="", seed=1, status="ok", error="").items()}
Stuck(cfg, {})(row)
print("returned")
"""


@pytest.mark.parametrize(
    ("mode", "message"), [("hang", "ran over watchdog_s=1"), ("fatal", "fatal device error: CUDA error")]
)
def test_hung_or_broken_stage_exits_its_process_for_a_restart(mode, message):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", HANG_OR_BREAK, mode], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "returned" not in result.stdout
    assert message in result.stderr and "exiting so Ray restarts this actor" in result.stderr
    assert time.monotonic() - started < 30
