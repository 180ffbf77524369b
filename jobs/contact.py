"""Contact sheets: a grid of thumbnails with ids per committed shard (contact/NNNNNN.jpg) and an
overview of the shards (contact/job.jpg), so a person can check a run at a glance."""

from __future__ import annotations

import io
import math
from typing import Any

from PIL import Image, ImageDraw

from workers.keys import item_key
from workers.storage import join, read_bytes, write_bytes
from workers.write import THUMB, thumbnail

LABEL = 14  # px of text under each tile
MAX_SHARDS = 64  # shards shown on the job sheet


def _grid(tiles: list[tuple[Image.Image | None, str, bool]], tile: int, title: str) -> bytes:
    cols = max(1, min(16, math.ceil(math.sqrt(len(tiles)))))
    rows = max(1, math.ceil(len(tiles) / cols))
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
            img = img.copy()
            img.thumbnail((tile, tile))
            sheet.paste(img, (x + (tile - img.width) // 2, y + (tile - img.height) // 2))
        draw.text((x + 2, y + tile + 1), label[: tile // 6], fill="black" if ok else (200, 40, 40))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def shard_sheet(out: str, rows: list[dict], thumbs: dict[int, bytes]) -> bytes:
    """A shard's sheet from its metadata rows and the thumbnails the writers made; rows carried
    from an earlier attempt are read back from their image files."""
    tiles = []
    for r in sorted(rows, key=lambda r: (r["row"], r["image_index"] or 0)):
        ok = r["status"] == "ok"
        img = None
        if ok:
            data = thumbs.get(item_key(r["row"], r["image_index"] or 0))
            if data is None and r["image_key"]:
                full = read_bytes(join(out, r["image_key"]))
                data = thumbnail(full) if full else None
            img = Image.open(io.BytesIO(data)) if data else None
        tiles.append((img, str(r["id"]), ok))
    ok = sum(t[2] for t in tiles)
    shard = rows[0]["shard"] if rows else 0
    return _grid(tiles, THUMB, f"shard {shard}: {ok}/{len(tiles)} ok")


def sheet_key(shard: int) -> str:
    return f"contact/{shard:06d}.jpg"


def write_shard_sheet(out: str, shard: int, rows: list[dict], thumbs: dict[int, bytes]) -> None:
    write_bytes(join(out, sheet_key(shard)), shard_sheet(out, rows, thumbs))


def write_job_sheet(out: str, commits: dict[int, Any]) -> None:
    """One tile per committed shard (its own sheet, scaled down), the first MAX_SHARDS of them."""
    tiles = []
    shown = sorted(commits)[:MAX_SHARDS]
    for shard in shown:
        data = read_bytes(join(out, sheet_key(shard)))
        c = commits[shard]
        img = Image.open(io.BytesIO(data)) if data else None
        tiles.append((img, f"shard {shard}: {c.ok} ok, {c.error} failed", c.error == 0))
    rows = sum(c.ok + c.error for c in commits.values())
    ok = sum(c.ok for c in commits.values())
    more = f" (first {MAX_SHARDS} shown)" if len(commits) > MAX_SHARDS else ""
    write_bytes(join(out, "contact/job.jpg"), _grid(tiles, 256, f"{len(commits)} shards, {ok}/{rows} ok{more}"))
