"""Init images and masks: a row's path, s3:// URI or bytes in, checked encoded bytes out. Paths
must lie under the job's image roots; sizes are checked before anything is read, pixels before
anything is decoded."""

from __future__ import annotations

import io
import os
import posixpath
from pathlib import Path
from typing import Any

from jobs.manifest import InputConfig
from workers.storage import bucket_key, is_s3, object_size, read_bytes


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def image_roots(cfg: InputConfig) -> list[str]:
    """Where a job's init images may come from: input.image_roots, else the input's directory
    (or its S3 bucket)."""
    if cfg.image_roots is not None:
        return [r.rstrip("/") for r in cfg.image_roots]
    if is_s3(cfg.path):
        return ["s3://" + bucket_key(cfg.path)[0]]
    path = Path(cfg.path)
    return [str(path if path.is_dir() else path.parent)]


def image_location(field: str, value: str, source: str, roots: list[str]) -> tuple[str, str]:
    """(uri, problem) of an image path: relative paths resolve against the input file's
    directory; the result must lie under one of `roots`. Decided on the path's text alone (and
    the links on its way), so a refused path gets the same answer whether or not it exists."""
    if "://" in value and not is_s3(value):
        return "", f"{field}: {_short(value)} has an unsupported scheme; expected a path or an s3:// URI"
    if is_s3(value):
        uri = value
    elif value.startswith("/"):
        uri = os.path.realpath(value)
    elif is_s3(source):
        uri = posixpath.normpath(posixpath.join(source.rsplit("/", 1)[0][len("s3://") :], value))
        uri = "s3://" + uri
    else:
        uri = os.path.realpath(os.path.join(os.path.dirname(source), value))
    for root in roots:
        if is_s3(root) == is_s3(uri) and (uri == root or uri.startswith(root + "/")) and "/../" not in uri + "/":
            return uri, ""
    return "", (
        f"{field}: {_short(value)} lies outside the image roots {roots}; expected a path inside them. "
        f"Fix: move the image there, or list its directory or s3:// prefix in input.image_roots"
    )


def load_image(field: str, value: Any, source: str, cfg: InputConfig) -> tuple[bytes | None, str]:
    """An init image or mask as encoded bytes, from bytes, a datasets Image struct, a path or an
    s3:// URI under the image roots; (None, problem) when unusable. Sizes are checked before
    anything is read, and pixels before anything is decoded."""
    from PIL import Image

    where = "the row's bytes"
    if isinstance(value, dict):  # a datasets Image column: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, str):
        where, problem = image_location(field, value.strip(), source, image_roots(cfg))
        if problem:
            return None, problem
        try:
            size = object_size(where)
            if size is None:
                return None, f"{field}: {where} not found; expected an image file (local path, s3:// URI) or bytes"
            if size > cfg.max_image_bytes:
                return None, f"{field}: {where} is {size} bytes, over input.max_image_bytes={cfg.max_image_bytes}"
            data = read_bytes(where)
        except Exception as err:  # noqa: BLE001 - any unreadable location fails the row only
            return None, f"{field}: cannot read {where} ({type(err).__name__}: {err})"
        if data is None:
            return None, f"{field}: {where} not found; expected an image file (local path, s3:// URI) or bytes"
    else:
        return None, f"{field}: expected an image path, s3:// URI or bytes, found {_short(value)}"
    if len(data) > cfg.max_image_bytes:
        return None, f"{field}: {where} is {len(data)} bytes, over input.max_image_bytes={cfg.max_image_bytes}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size  # from the header: nothing decoded yet
            if width * height > cfg.max_image_pixels:
                return None, (
                    f"{field}: {where} is {width}x{height} pixels, over input.max_image_pixels="
                    f"{cfg.max_image_pixels}; expected a smaller image (it is resized to the stage's size anyway)"
                )
            img.load()
    except Exception as err:  # noqa: BLE001 - bombs, truncation, garbage: the row fails, not the job
        return (
            None,
            f"{field}: {where} is not a readable image ({type(err).__name__}: {err}); expected PNG, JPEG or WebP",
        )
    return data, ""
