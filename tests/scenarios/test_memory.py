"""The driver holds no images: a run of 2,000 rows with embedded images and WebDataset tars
keeps the driver's Python memory under a bound that one shard's images would break."""

from __future__ import annotations

import tracemalloc

import pytest

from jobs.render import run
from tests.helpers import read_output
from workers.storage import list_prefix

ROWS = 2000
BOUND_MB = 80  # the driver's traced Python memory at its peak, above where the run started: measured 57.5


@pytest.mark.slow
def test_the_driver_memory_does_not_hold_the_images_of_2000_rows(ray_local, tmp_path, tiny_manifest):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}: a lighthouse at dusk, oil on canvas\n" for i in range(ROWS)))
    out = tmp_path / "out"
    manifest = tiny_manifest(
        f"input.path={prompts}",
        "input.shard_size=1000",
        "last_stage=stage2",
        "stage1.num_inference_steps=1",
        "stage2.num_inference_steps=1",
        *[f"{s}.batch_size=50" for s in ("encode", "stage1", "stage2")],
        *[f"{s}.micro_batch=50" for s in ("stage1", "stage2")],
        "output.embed_images=true",
        "output.webdataset=true",
        output=str(out),
    )
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        summary = run(manifest, progress=False)
        peak = (tracemalloc.get_traced_memory()[1] - start) / 2**20
    finally:
        tracemalloc.stop()
    rows, images = read_output(str(out))
    assert summary.ok == ROWS and len(images) == ROWS
    image_mb = sum(map(len, images.values())) / 2**20
    shard_mb = image_mb / 2  # one shard's images: what the driver held at each commit before
    tar_mb = sum((out / k).stat().st_size for k in list_prefix(str(out), "webdataset/")) / 2**20
    print(
        f"driver: peak traced Python memory {peak:.1f} MB over {ROWS} rows (bound {BOUND_MB} MB); "
        f"images {image_mb:.1f} MB in all, {shard_mb:.1f} MB a shard; tars {tar_mb:.1f} MB; "
        f"driver peak RSS {summary.driver_peak_rss_mb:.0f} MB; {summary.images_per_second:.1f} images/s"
    )
    assert peak < BOUND_MB
