"""The speed presets: `ifrender plan` prints each one's TFLOP per image and images per hour per
GPU, the numbers follow from the FLOP counts (steps, guidance and its interval), and the README's
table says what the command prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs.plan.costs import FORWARD_TFLOP, VAE_DECODE_TFLOP
from tests.helpers import ifrender

README = Path(__file__).resolve().parents[3] / "README.md"


def guided(steps: int, start: float, end: float) -> int:
    return sum(start <= i / steps < end for i in range(steps))


# Each preset's TFLOP per image, from its settings written out by hand: steps x (1 + guided share).
EXPECTED = {
    "production.yaml": FORWARD_TFLOP["encode"] * 2
    + FORWARD_TFLOP["stage1"] * 100 * 2
    + FORWARD_TFLOP["stage2"] * 50 * 2
    + FORWARD_TFLOP["upscale"] * 75 * 2
    + VAE_DECODE_TFLOP
    + FORWARD_TFLOP["score"],
    "production-fast.yaml": FORWARD_TFLOP["encode"] * 2
    + FORWARD_TFLOP["stage1"] * (27 + guided(27, 0, 0.8))  # fast27
    + FORWARD_TFLOP["stage2"] * (27 + guided(27, 0, 0.8))  # smart27
    + FORWARD_TFLOP["upscale"] * (40 + guided(40, 0, 0.5))
    + VAE_DECODE_TFLOP
    + FORWARD_TFLOP["score"],
}


@pytest.fixture(scope="module")
def printed() -> dict[str, tuple[float, float]]:
    """preset -> (TFLOP per image, images/hour per GPU) as `ifrender plan` prints them."""
    found = {}
    for name in EXPECTED:
        result = ifrender("plan", f"manifests/{name}", "--gpus", "8", "--gpu-memory", "80")
        assert result.returncode == 0, result.stderr
        cost = re.search(r"cost: ([\d,.]+) TFLOP per image .*; ([\d,]+) images/hour per GPU", result.stdout)
        assert cost, result.stdout
        found[name] = (float(cost[1].replace(",", "")), float(cost[2].replace(",", "")))
    return found


def test_plan_prints_each_presets_cost_as_the_flop_counts_give_it(printed):
    for name, tflop in EXPECTED.items():
        assert printed[name][0] == pytest.approx(tflop, abs=0.05), name
    fast, slow = printed["production-fast.yaml"], printed["production.yaml"]
    assert fast[0] < slow[0] / 2.5  # the presets, the intervals and fewer upscaler steps
    # Both are replicas of one whole cascade per GPU: the rate follows the cost.
    assert fast[1] / slow[1] == pytest.approx(slow[0] / fast[0], rel=0.01)


def test_the_readmes_table_says_what_plan_prints(printed):
    table = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] in EXPECTED:
            table[cells[0]] = (float(cells[4].replace(",", "")), float(cells[5].replace(",", "")))
    assert table == printed
