"""Item keys and seeds: what identifies an output row and its noise, shared by the driver, the read
tasks and the stage actors. Torch-free, so a read task never imports torch."""

from __future__ import annotations

import hashlib

IMAGES = "images/"  # the output folder of image files (jobs/output/layout.py lists every key)
MAX_IMAGES = 64  # images per input row; also the stride of item keys


def item_key(row: int, image_index: int) -> int:
    """One output row: an input row's global index and which of its images."""
    return row * MAX_IMAGES + image_index


def derive_seed(seed: int, salt: str) -> int:
    """A 63-bit seed from a seed and a salt (a row id, a stage name), stable across machines."""
    digest = hashlib.sha256(f"{seed}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def image_dir(shard: int, attempt: int, run_id: str) -> str:
    """One shard attempt's image folder in the output: its files are named by workers.write.image_name."""
    return f"{IMAGES}{shard:06d}-{attempt:03d}-{run_id}"
