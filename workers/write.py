"""write: the last stage's image column in; image files (local or S3) and their `image_key`, `sha256`, `width`, `height` out.

Images go under `images/<shard>-<attempt>-<run_id>/`, one directory per shard, attempt and run, so
a run that loses a shard's commit to another writer, or is killed, leaves nothing that a committed
row points at, and a commit's cleanup can tell an older attempt's files from a newer one's.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from typing import Any

import numpy as np
from PIL import Image

from workers.batch import Batch, pixels, require_columns
from workers.columns import ROW_COLUMNS, UNWRITTEN
from workers.errors import row_error, storage_failure
from workers.keys import image_dir
from workers.progress import Reporter, process_started
from workers.provenance import Credentials
from workers.stages import WRITE
from workers.storage import join, write_bytes

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]|\.{2,}")  # anything outside a plain name, and any ".."


def image_name(row_id: str) -> str:
    """A file name derived from a row id: the id itself when it is safe, else a cleaned id plus a
    short hash of the original, so two different ids never share a name. An id with a capital is
    not safe: on a case-insensitive disk (macOS, Windows, some mounts) `Fox` and `fox` would be one
    file, so it gets the hash and the names stay distinct when case-folded."""
    safe = _UNSAFE.sub("_", row_id)[:120]
    if safe == row_id and not row_id.startswith(".") and row_id == row_id.lower():
        return row_id
    return f"{safe.lstrip('.') or 'row'}-{hashlib.sha256(row_id.encode()).hexdigest()[:10]}"


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(pixels, mode="RGB")
    if image_format == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format=image_format.upper(), quality=quality)
    return buf.getvalue()


def perceptual_hash(data: bytes) -> str:
    """The image file's 64-bit perceptual hash (imagehash's DCT hash) as 16 hex digits: images
    that look alike have hashes a few bits apart, so near-duplicates are a GROUP BY or a Hamming
    distance away. Of the file as written, so a reader who hashes the file gets the same."""
    import imagehash

    with Image.open(io.BytesIO(data)) as img:
        return str(imagehash.phash(img.convert("RGB")))


class WriteWorker:
    stage = WRITE

    def __init__(
        self,
        output: str,
        run_id: str,
        image_column: str,
        attempts: dict[int, int],
        image_format: str = "png",
        quality: int = 95,
        c2pa: Any = None,
    ) -> None:
        self.output = output
        self.run_id = run_id
        self.attempts = attempts  # shard -> the attempt this run renders of it
        self.image_column = image_column
        self.image_format = image_format
        self.quality = quality
        # Signed here, in the writer pool: never in the driver, and once per file.
        self.report = Reporter(self.stage)
        self.report("loading", process_started())
        self.credentials = Credentials(c2pa) if c2pa is not None else None
        self.report("loaded")

    def __call__(self, batch: Batch) -> Batch:
        require_columns(self.stage, batch, ROW_COLUMNS + ("shard", self.image_column))
        n = len(batch["id"])
        self.report("started", n)
        images = [pixels(image) for image in batch[self.image_column]]  # rows may differ in size
        status, error = batch["status"].copy(), batch["error"].copy()
        keys = np.full(n, None, dtype=object)
        digests = np.full(n, None, dtype=object)
        hashes = np.full(n, None, dtype=object)
        labels = np.full(n, None, dtype=object)
        models = [c for c in batch if c.endswith("_model")]
        seconds = np.zeros(n)
        for i in np.flatnonzero(status == "ok"):
            start = time.perf_counter()
            shard = int(batch["shard"][i])
            folder = image_dir(shard, self.attempts[shard], self.run_id)
            key = f"{folder}/{image_name(str(batch['id'][i]))}.{EXTENSIONS[self.image_format]}"
            try:
                data = encode_image(images[i], self.image_format, self.quality)
                if self.credentials is not None:
                    used = {c[: -len("_model")]: str(batch[c][i]) for c in models if batch[c][i]}
                    data, labels[i] = self.credentials.sign(
                        data, self.image_format, key.rsplit("/", 1)[-1], used, self.run_id, str(batch["id"][i])
                    )
                write_bytes(join(self.output, key), data)
            except Exception as err:  # noqa: BLE001 - one unwritable image fails its row only
                cause = storage_failure(err)
                if cause:  # the storage's failure, not the row's: the driver stops the run
                    status[i], error[i] = UNWRITTEN, f"{join(self.output, key)}: {cause} ({type(err).__name__}: {err})"
                else:
                    status[i], error[i] = "error", row_error("write", err)
                continue
            keys[i], digests[i] = key, hashlib.sha256(data).hexdigest()
            hashes[i] = perceptual_hash(data)
            seconds[i] = time.perf_counter() - start

        result = {k: v for k, v in batch.items() if k != self.image_column}
        result.update(
            status=status,
            error=error,
            image_key=keys,
            sha256=digests,
            phash=hashes,
            c2pa=labels,
            width=np.array([image.shape[1] for image in images], dtype=np.int64),
            height=np.array([image.shape[0] for image in images], dtype=np.int64),
            write_seconds=seconds,
        )
        ok_out = int(np.count_nonzero(status == "ok"))
        self.report("finished", ok_out, int(np.count_nonzero(batch["status"] == "ok")) - ok_out)
        return result
