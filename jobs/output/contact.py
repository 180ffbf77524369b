"""Contact sheets: a grid of thumbnails per committed shard, each with its id and the start of
its prompt under it (contact/NNNNNN.jpg), and an overview of the shards (contact/job.jpg), so a
person can check a run at a glance."""

from __future__ import annotations

import io
import math
from typing import Any

from PIL import Image, ImageDraw

from jobs.output.layout import JOB_SHEET, sheet_key
from workers.storage import join, read_bytes, write_bytes

THUMB = 128  # px, the longer side of a tile on a shard's sheet
LABEL = 26  # px of text under each tile: two lines (the id, the prompt's start)
MAX_SHARDS = 64  # shards shown on the job sheet


def _grid(tiles, count: int, tile: int, title: str) -> bytes:
    """`count` tiles (image or None, label, ok), taken one at a time: only the sheet is held."""
    cols = max(1, min(16, math.ceil(math.sqrt(count))))
    rows = max(1, math.ceil(count / cols))
    sheet = Image.new("RGB", (cols * tile, LABEL + rows * (tile + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), title, fill="black")
    for n, (img, label, ok) in enumerate(tiles):
        x, y = (n % cols) * tile, LABEL + (n // cols) * (tile + LABEL)
        if img is None:  # a failed row: a red tile, so failures stand out
            draw.rectangle(
                (x + 2, y + 2, x + tile - 3, y + tile - 3), fill=(200, 40, 40) if not ok else (220, 220, 220)
            )
            draw.text((x + 6, y + tile // 2 - 6), "error" if not ok else "missing", fill="white")
        else:
            img.thumbnail((tile, tile))
            sheet.paste(img, (x + (tile - img.width) // 2, y + (tile - img.height) // 2))
        shown = "\n".join(line[: tile // 6] for line in label.split("\n")[:2])
        draw.text((x + 2, y + tile + 1), shown, fill="black" if ok else (200, 40, 40), spacing=1)
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _open(data: bytes | None) -> Image.Image | None:
    if not data:
        return None
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (THUMB * 2, THUMB * 2))  # JPEGs decode at a fraction of their size
    return img.convert("RGB")


def shard_sheet(out: str, rows: list[dict]) -> bytes:
    """A shard's sheet from its metadata rows, each image read back from its file."""
    rows = sorted(rows, key=lambda r: (r["row"], r["image_index"] or 0))
    tiles = (
        (
            _open(read_bytes(join(out, r["image_key"])) if r["image_key"] else None),
            f"{r['id']}\n{' '.join(str(r.get('prompt') or '').split())}",
            r["status"] == "ok",
        )
        for r in rows
    )
    ok = sum(r["status"] == "ok" for r in rows)
    shard = rows[0]["shard"] if rows else 0
    return _grid(tiles, len(rows), THUMB, f"shard {shard}: {ok}/{len(rows)} ok")


def write_shard_sheet(out: str, rows: list[dict], uri: str) -> None:
    write_bytes(uri, shard_sheet(out, rows))


def write_job_sheet(out: str, commits: dict[int, Any]) -> None:
    """One tile per committed shard (its own sheet, scaled down), the first MAX_SHARDS of them."""
    shown = sorted(commits)[:MAX_SHARDS]
    tiles = (
        (
            _open(read_bytes(join(out, sheet_key(s)))),
            f"shard {s}: {commits[s].ok} ok, {commits[s].error} failed",
            commits[s].error == 0,
        )
        for s in shown
    )
    rows = sum(c.ok + c.error for c in commits.values())
    ok = sum(c.ok for c in commits.values())
    more = f" (first {MAX_SHARDS} shown)" if len(commits) > MAX_SHARDS else ""
    write_bytes(join(out, JOB_SHEET), _grid(tiles, len(shown), 256, f"{len(commits)} shards, {ok}/{rows} ok{more}"))
