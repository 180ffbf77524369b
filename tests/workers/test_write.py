"""The writer: images of the last stage in; image files, keys and digests out, one bad row alone."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys

import imagehash
import numpy as np
from PIL import Image

from tests.helpers import rows
from workers.write import WriteWorker, image_name

PROMPTS = ["a red fox in the snow", "a lighthouse in a storm", "a red fox in the snow", "a corgi on a skateboard"]


def stage_images(column: str) -> dict:
    """A batch as the stage before the writer hands it on: upscaler images (B, 256, 256, 3) uint8,
    or stage I images (B, 3, 16, 16) in [-1, 1]."""
    rng = np.random.default_rng(0)
    if column == "upscale_image":
        images = rng.integers(0, 256, (len(PROMPTS), 256, 256, 3), dtype=np.uint8)
    else:
        images = rng.uniform(-1, 1, (len(PROMPTS), 3, 16, 16)).astype(np.float32)
    return rows(PROMPTS, **{column: images})


def test_write_stores_images_with_matching_digests(tmp_path):
    batch = stage_images("upscale_image")
    batch["id"] = np.array(["plain", "../escape", "a/b", "a_b"], dtype=object)
    batch["status"] = np.array(["ok", "ok", "ok", "error"], dtype=object)
    batch["shard"] = np.array([3, 3, 3, 3])
    out = WriteWorker(str(tmp_path), "r1", "upscale_image", {3: 0})(batch)
    assert "upscale_image" not in out
    keys = list(out["image_key"])
    assert keys[3] is None and out["status"][3] == "error"
    assert keys[0] == "images/000003-000-r1/plain.png"
    assert len(set(keys[:3])) == 3 and all(".." not in k and k.count("/") == 2 for k in keys[:3])
    for i, key in enumerate(keys[:3]):
        data = (tmp_path / key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == out["sha256"][i]
        image = Image.open(io.BytesIO(data))
        assert image.size == (256, 256)
        np.testing.assert_array_equal(np.asarray(image), batch["upscale_image"][i])
        # The perceptual hash of the file as written, as imagehash gives it to anyone who reads it.
        assert out["phash"][i] == str(imagehash.phash(image.convert("RGB"))) and len(out["phash"][i]) == 16
    assert out["phash"][3] is None
    assert sorted(p.name for p in (tmp_path / "images" / "000003-000-r1").iterdir()) == sorted(
        k.split("/")[2] for k in keys[:3]
    )


def test_write_converts_stage_images_and_fails_an_unwritable_row_alone(tmp_path):
    batch = dict(stage_images("stage1_image"), shard=np.zeros(4, dtype=np.int64))
    (tmp_path / "images" / "000000-002-r1" / "r1.jpg").mkdir(parents=True)  # a directory where the image should go
    out = WriteWorker(str(tmp_path), "r1", "stage1_image", {0: 2}, image_format="jpeg")(batch)
    assert list(out["status"]) == ["ok", "error", "ok", "ok"]
    assert out["error"][1].startswith("write: ") and out["image_key"][1] is None
    assert out["image_key"][0] == "images/000000-002-r1/r0.jpg"
    assert Image.open(tmp_path / "images/000000-002-r1/r0.jpg").size == (16, 16)


def test_image_names_are_distinct_for_distinct_ids():
    ids = ["a/b", "a_b", "a:b", "..", ".", "x" * 300, "tab\there", "nul\x00", "/etc/passwd", "ok-id_1.2"]
    names = [image_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert names[-1] == "ok-id_1.2"
    assert all("/" not in n and not n.startswith(".") and len(n) < 140 and n.isprintable() for n in names)


def test_ids_that_differ_only_in_case_get_names_distinct_when_case_folded():
    """A case-insensitive disk (macOS, Windows, some mounts) folds case: `Fox` and `fox` must not be one file."""
    ids = ["Fox", "fox", "FOX", "fOx", "Ok-Id", "ok-id", "a_B", "a_b"]
    names = [image_name(i) for i in ids]
    assert len({n.casefold() for n in names}) == len(ids), names
    assert image_name("fox") == "fox"  # a plain lower-case id stays its own name


def test_the_writers_process_imports_no_model_library():
    """The writer starts beside the model actors on the same cores: torch (2 s of imports on 2
    cores), diffusers and transformers are theirs alone. A replica's process defers them too,
    until it builds its stages' workers."""
    probe = (
        "import sys, workers.write, workers.group; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
