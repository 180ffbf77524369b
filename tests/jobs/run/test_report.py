"""OUTPUT/report.html in a real headless Chromium (Debian's `chromium`; .ci/run installs it): the
shared tiny run with error rows and contact sheets writes the report, the page loads with every
picture decoded, and its screenshot shows the plots and the sheets where the page put them."""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess

import pytest
from PIL import Image

from jobs.run.report_job import EXTREMES
from tests.helpers import LINES, OK_COUNT, read_output
from workers.columns import SCORES

pytestmark = pytest.mark.slow
WIDTH = 1280  # the browser window the page is laid out in


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's package (apt-get install chromium)")
        pytest.skip("no chromium here: apt-get install chromium to run the browser test")
    return found


def browse(page: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *flags, f"file://{page}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_the_run_report_opens_in_a_browser_with_its_plots_and_sheets(local_run, tmp_path):
    """The shared render's report (three shards, three error rows, contact sheets on) as its run
    wrote it at the end."""
    summary = local_run.summary
    assert summary.error == len(LINES) - OK_COUNT and summary.ok == OK_COUNT and local_run.manifest.contact_sheets

    page = tmp_path / "report.html"  # self-contained: it opens from anywhere
    page.write_text(local_run.report)
    text = page.read_text()
    assert "http://" not in text.replace("http-equiv", "") and "https://" not in text  # nothing fetched
    assert "not-a-seed" in text  # the error table names the bad row's error
    assert "refresh" not in text  # the final report stops reloading
    # What was rendered: the input, each stage's model and the settings its rows ran with, the
    # sampled images with their prompts, seeds and ids, linked to their files; no absolute path.
    assert "prompts.jsonl" in text and str(local_run.out) not in text
    for stage in ("encode", "stage1", "stage2", "upscale"):
        assert f"<tr><th>{stage}</th><td><code>" in text
    assert "num_inference_steps 2" in text and "guidance_scale 7.0" in text and "as its rows ran" in text
    ok_rows = [r for r in read_output(str(local_run.out))[0] if r["status"] == "ok"]
    for row in ok_rows:
        assert html.escape(row["prompt"]) in text and f"seed {row['seed']}" in text
        assert f'href="{row["image_key"]}"' in text
    assert 'href="data/"' in text
    assert "lowest nsfw_score" in text and "highest watermark_score" in text
    assert "lowest clip_score" in text and "highest aesthetic_score" in text

    # The DOM dump and the screenshot lay the page out at one width: the boxes measured are where the pixels are.
    dom = browse(str(page), "--virtual-time-budget=5000", f"--window-size={WIDTH},1000", "--dump-dom")
    assert dom.returncode == 0, dom.stderr
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body))
    # throughput, busy timeline, the sample, the scores' histograms and each score's lowest and
    # highest images (all of them, for fewer than 2 x EXTREMES rows), a sheet per shard
    extremes = len(SCORES) * min(len(ok_rows), 2 * EXTREMES)
    assert int(attrs["images"]) == 3 + len(ok_rows) + extremes + summary.committed_shards, attrs
    assert attrs["broken"] == "", f"pictures that did not decode: {attrs['broken']}"
    boxes = json.loads(attrs["boxes"].replace("&quot;", '"'))

    shot_path = tmp_path / "report.png"
    width, height = WIDTH, int(max(b["y"] + b["h"] for b in boxes)) + 40
    # The same virtual time as the DOM dump: every picture decoded and painted before the shot.
    shot = browse(
        str(page), "--virtual-time-budget=5000", f"--window-size={width},{height}", f"--screenshot={shot_path}"
    )
    assert shot.returncode == 0 and shot_path.exists(), shot.stderr
    screen = Image.open(io.BytesIO(shot_path.read_bytes())).convert("RGB")
    for box in boxes:
        crop = screen.crop((int(box["x"]), int(box["y"]), int(box["x"] + box["w"]), int(box["y"] + box["h"])))
        colours = len(set(crop.resize((200, 100)).getdata()))
        assert box["w"] > 100 and box["h"] > 50, box
        assert colours > 20, f"{box['alt']} shows as a blank area ({colours} colours) in the screenshot"
    # The plots' own colours are on screen: the images line (blue), the throughput bars (green),
    # the stages' calls (orange at 35% on white).
    pixels = set(screen.getdata())
    near = lambda rgb, want, tol=30: all(abs(a - b) < tol for a, b in zip(rgb, want))  # noqa: E731
    for name, want in (("line", (31, 119, 180)), ("bars", (44, 160, 44)), ("calls", (255, 208, 166))):
        assert any(near(p, want) for p in pixels), f"no {name} colour {want} in the screenshot"
