"""Formats users load directly: committed rows in; a `datasets` Image column and WebDataset tars out.

The Image column goes into a shard's metadata file before its commit. A tar is derived from a
committed shard after its commit; a stamp names the attempt it was built from, so a run finds
tars that a kill left missing or that a retry made stale, and rebuilds them.
"""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa

from jobs.inputs import item_key
from jobs.storage import join, list_prefix, read_bytes, write_bytes

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_VALUE_TYPES = {
    pa.string(): "string",
    pa.int64(): "int64",
    pa.int32(): "int32",
    pa.float64(): "float64",
    pa.bool_(): "bool",
}
# Per-row fields a WebDataset sample's KEY.json carries.
SAMPLE_FIELDS = ("id", "row", "prompt", "negative_prompt", "seed", "width", "height", "sha256") + tuple(
    f"{s}_{k}" for s in ("encode", "stage1", "stage2", "upscale") for k in ("model", "params")
)


def with_image_column(table: pa.Table, images: list[bytes | None]) -> pa.Table:
    """Add `image` as a Hugging Face datasets Image feature (struct {bytes, path}), declared in
    the schema's `huggingface` metadata so load_dataset decodes it to PIL images."""
    paths = table.column("image_key").to_pylist()
    column = pa.array(
        [{"bytes": b, "path": p} if b is not None else None for b, p in zip(images, paths)], type=IMAGE_TYPE
    )
    table = table.append_column(pa.field("image", IMAGE_TYPE), column)
    features = {f.name: {"dtype": _VALUE_TYPES[f.type], "_type": "Value"} for f in table.schema if f.name != "image"}
    features["image"] = {"_type": "Image"}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    return table.replace_schema_metadata(meta)


def _stamp(shard: int) -> str:
    return f"webdataset/.stamps/{shard:06d}.json"


def tar_key(shard: int) -> str:
    return f"webdataset/{shard:06d}.tar"


def write_tar(out: str, shard: int, attempt: int, rows: list[dict], images: dict[int, bytes]) -> None:
    """The shard's successful rows as KEY.<ext>, KEY.txt (prompt), KEY.json; KEY is the global row
    index, zero-padded, as WebDataset keys must not hold dots. Then the stamp."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for r in rows:
            if r["status"] != "ok":
                continue
            index = r.get("image_index") or 0
            data = images.get(item_key(r["row"], index)) or read_bytes(join(out, r["image_key"]))
            key = f"{r['row']:09d}" + (f"_{index:02d}" if index else "")
            ext = r["image_key"].rsplit(".", 1)[-1]
            sample = {f: r.get(f) for f in SAMPLE_FIELDS}
            for name, payload in (
                (f"{key}.{ext}", data),
                (f"{key}.txt", r["prompt"].encode()),
                (f"{key}.json", json.dumps(sample).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    write_bytes(join(out, tar_key(shard)), buf.getvalue())
    write_bytes(join(out, _stamp(shard)), json.dumps({"shard": shard, "attempt": attempt}).encode())


def stale_tars(out: str, commits: dict) -> list[int]:
    """Committed shards whose tar is missing or was built from an earlier attempt."""
    built = {}
    for uri in list_prefix(join(out, "webdataset/.stamps/")):
        stamp = json.loads(read_bytes(uri) or b"{}")
        built[stamp.get("shard")] = stamp.get("attempt")
    return [s for s, c in sorted(commits.items()) if built.get(s) != c.attempt]
