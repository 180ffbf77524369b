"""Formats users load directly: committed rows in; a `datasets` Image column and WebDataset tars out.

The Image column goes into a shard's metadata file before its commit. A tar is derived from a
committed shard after its commit; a stamp names the attempt it was built from, so a run finds
tars that a kill left missing or that a retry made stale, and rebuilds them. Both use their
own libraries (`datasets`, `webdataset`: the `formats` extra), checked before any model work.
"""

from __future__ import annotations

import io
import json

import pyarrow as pa

from workers.errors import ManifestError
from workers.keys import item_key
from workers.stages import MODEL_STAGES
from workers.storage import join, list_prefix, read_bytes, write_bytes

# Per-row fields a WebDataset sample's KEY.json carries.
SAMPLE_FIELDS = ("id", "row", "prompt", "negative_prompt", "seed", "width", "height", "sha256") + tuple(
    f"{s}_{k}" for s in MODEL_STAGES for k in ("model", "params")
)
# Output option -> the package it needs.
PACKAGES = {"embed_images": "datasets", "webdataset": "webdataset"}


def check_packages(output) -> None:
    """An output format asked for without its package fails now, not at the first commit."""
    import importlib.util

    for option, package in PACKAGES.items():
        if getattr(output, option) and importlib.util.find_spec(package) is None:
            raise ManifestError(
                f"output.{option}: true needs the {package} package, which is not installed. "
                f"Fix: pip install 'ifrender[formats]', or set output.{option}: false."
            )


def with_image_column(table: pa.Table, images: list[bytes | None]) -> pa.Table:
    """Add `image` as a Hugging Face datasets Image feature (struct {bytes, path}), declared in
    the schema's `huggingface` metadata so load_dataset decodes it to PIL images."""
    import datasets

    features = datasets.Features.from_arrow_schema(table.schema)
    features["image"] = datasets.Image()
    paths = table.column("image_key").to_pylist()
    column = pa.array(
        [{"bytes": b, "path": p} if b is not None else None for b, p in zip(images, paths)],
        type=features.arrow_schema.field("image").type,
    )
    return table.append_column("image", column).replace_schema_metadata(features.arrow_schema.metadata)


def stamp_key(shard: int) -> str:
    return f"webdataset/.stamps/{shard:06d}.json"


def tar_key(shard: int) -> str:
    return f"webdataset/{shard:06d}.tar"


def write_tar(out: str, shard: int, attempt: int, rows: list[dict], images: dict[int, bytes]) -> None:
    """The shard's successful rows as KEY.<ext>, KEY.txt (prompt), KEY.json; KEY is the global row
    index, zero-padded, as WebDataset keys must not hold dots. Then the stamp."""
    import webdataset

    buf = io.BytesIO()
    with webdataset.TarWriter(buf, mtime=0) as tar:
        for r in rows:
            if r["status"] != "ok":
                continue
            index = r.get("image_index") or 0
            data = images.get(item_key(r["row"], index)) or read_bytes(join(out, r["image_key"]))
            ext = r["image_key"].rsplit(".", 1)[-1]
            tar.write(
                {
                    "__key__": f"{r['row']:09d}" + (f"_{index:02d}" if index else ""),
                    ext: data,
                    "txt": r["prompt"],
                    "json": json.dumps({f: r.get(f) for f in SAMPLE_FIELDS}).encode(),
                }
            )
    write_bytes(join(out, tar_key(shard)), buf.getvalue())
    write_bytes(join(out, stamp_key(shard)), json.dumps({"shard": shard, "attempt": attempt}).encode())


def stale_tars(out: str, commits: dict) -> list[int]:
    """Committed shards whose tar is missing or was built from an earlier attempt."""
    built = {}
    for key in list_prefix(out, "webdataset/.stamps/"):
        stamp = json.loads(read_bytes(join(out, key)) or b"{}")
        built[stamp.get("shard")] = stamp.get("attempt")
    return [s for s, c in sorted(commits.items()) if built.get(s) != c.attempt]
