"""What several test modules share: batches of rows, small images, the CLI in a subprocess, the
consumer's view of an output, and an S3 proxy that injects faults."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from workers.storage import join, list_prefix, read_bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(prompts, seeds=None, **extra):
    n = len(prompts)
    batch = {
        "id": np.array([f"r{i}" for i in range(n)], dtype=object),
        "prompt": np.array(prompts, dtype=object),
        "negative_prompt": np.array([""] * n, dtype=object),
        "seed": np.array(seeds if seeds is not None else range(100, 100 + n), dtype=np.int64),
        "status": np.array(["ok"] * n, dtype=object),
        "error": np.array([""] * n, dtype=object),
    }
    batch.update(extra)
    return batch


def stage_cfg(micro_batch: int) -> SimpleNamespace:
    """The fields StageWorker reads, for test stages without a model."""
    return SimpleNamespace(
        model="m", micro_batch=micro_batch, device="cpu", num_gpus=0, dtype="fp32", variant=None,
        watchdog_s=60, offload="none", attention="sdpa", compile=False,
    )  # fmt: skip


def take(batch, idx):
    return {k: v[idx] for k, v in batch.items()}


def png(color, size=32, mask=False) -> bytes:
    img = Image.new("L" if mask else "RGB", (size, size), color)
    if mask:  # the right half is repainted
        img.paste(255, (size // 2, 0, size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def ifrender(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def read_output(uri: str):
    """(metadata rows sorted by id, {image_key: bytes}) read the way a consumer does: the data
    files index.json names. Also checks that the index names exactly the files in data/, that
    each data file is its shard's committed attempt, and that nothing lies beside the committed
    files (no orphaned image or attempt)."""
    from jobs.output.commits import list_commits, read_metadata
    from jobs.output.layout import SCHEMA, data_key

    index = json.loads(read_bytes(join(uri, "index.json")))
    commits = list_commits(uri)
    rows = []
    for shard in index["shards"]:
        data = pq.read_table(pa.BufferReader(read_bytes(join(uri, shard["data"])))).to_pylist()
        assert [r["id"] for r in data] == [r["id"] for r in read_metadata(uri, commits[shard["shard"]])]
        rows += data
    rows.sort(key=lambda r: r["id"])
    images = {r["image_key"]: read_bytes(join(uri, r["image_key"])) for r in rows if r["image_key"]}
    assert set(list_prefix(uri, "images/")) == set(images), "orphaned images"
    shard_files = set(list_prefix(uri, "data/")) - {SCHEMA}
    assert shard_files == {data_key(s) for s in commits} == {s["data"] for s in index["shards"]}
    assert set(list_prefix(uri, "attempts/")) == {c.metadata for c in commits.values()}, "orphaned attempts"
    assert index["rows"] == len(rows) and index["ok"] == len(images)
    return rows, images


def check_exactly_once(out: str, n: int) -> None:
    """Every row once in the committed metadata, every image referenced, nothing else left."""

    rows, images = read_output(out)
    assert sorted(r["row"] for r in rows) == list(range(n))
    assert all(r["status"] == "ok" for r in rows) and len(images) == n


SLOW_DOWN = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>'


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultyS3Proxy:
    def __init__(
        self, upstream_port: int, slow_down_every: int = 5, drop_put_every: int = 7, ignore_conditions: bool = False
    ) -> None:
        """Every slow_down_every-th request answers 503, every drop_put_every-th PUT lands but loses
        its answer; with ignore_conditions, If-None-Match and If-Match never reach the server (a
        store that ignores conditional writes)."""
        self.upstream_port = upstream_port
        self.counts: Counter[str] = Counter()
        counter = itertools.count()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _proxy(self) -> None:
                n = next(counter)
                body = self._body()
                proxy.counts["requests"] += 1
                if n % slow_down_every == slow_down_every - 1:
                    proxy.counts["503"] += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                dropped = HOP_BY_HOP | ({"if-none-match", "if-match"} if ignore_conditions else set())
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                upstream.close()
                if self.command == "PUT" and n % drop_put_every == drop_put_every - 1:
                    proxy.counts["dropped"] += 1  # the write landed; its answer never arrives
                    self.close_connection = True
                    return
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyS3Proxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- the prompt file the end-to-end tests share: good rows and bad ones ----------------------

GOOD = [
    "a red fox in the snow",
    "a lighthouse in a storm",
    "a corgi on a skateboard",
    "a bowl of ramen",
    "a castle in fog",
]


LINES = [
    {"prompt": GOOD[0]},
    {"prompt": None},
    {"prompt": GOOD[1], "negative_prompt": "blurry"},
    {"prompt": GOOD[2], "seed": "not-a-seed"},
    {"prompt": GOOD[2], "id": "corgi/1", "seed": 42},
    "{broken json",
    {"prompt": GOOD[3]},
    {"prompt": GOOD[4]},
]


OK_COUNT = 5
# The shared render's settings (conftest's local_run): three shards, every output format on.
# The pipeline layout (a pool per stage) on local-tiny's models, which run as one replica there:
# the tests' base, so a test may size one stage's pool (stage1.batch_size=2) and see its own pool.
PER_STAGE_POOLS = (
    "groups=[]",
    *(f"{stage}.num_cpus=0.5" for stage in ("encode", "stage1", "stage2", "upscale")),
    "score.num_cpus=0.25",
    "score.batch_size=4",
    *(f"{stage}.batch_size=2" for stage in ("stage1", "stage2", "upscale")),
)
SCORED = ("score.enabled=true",)  # the score stage on, with the session's tiny CLIP and aesthetic head
SIGNED = ("output.c2pa.sign_cert=env:IFRENDER_TEST_C2PA_CERT", "output.c2pa.private_key=env:IFRENDER_TEST_C2PA_KEY")
# Not signed: a signed file's bytes differ per render (its manifest's label and time), and the
# shared render's digests are compared with other layouts' bit for bit. The mixed-modes render signs.
EVERY_FORMAT = ("input.shard_size=3", "output.embed_images=true", "output.webdataset=true", "contact_sheets=true")
# The shared render's settings (tests/conftest.py local_run): scored with embeddings, every format.
SHARED = (*SCORED, "score.embeddings=true", *EVERY_FORMAT)


def check_complete(rows, images, size):
    """Every input row exactly once; images decodable, of the right size, matching their digests."""
    assert len(rows) == len(LINES)
    assert sorted(r["row"] for r in rows) == list(range(len(LINES)))
    assert len({r["id"] for r in rows}) == len(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == OK_COUNT
    for r in rows:
        if r["status"] == "ok":
            data = images[r["image_key"]]
            assert hashlib.sha256(data).hexdigest() == r["sha256"]
            assert Image.open(io.BytesIO(data)).size == (size, size) == (r["width"], r["height"])
            assert r["error"] is None
        else:
            assert r["image_key"] is None and r["sha256"] is None and r["error"]
    assert len(images) == OK_COUNT


def readme_recipes() -> dict[str, str]:
    """The README's recipes for reading an output: the python blocks after `<!-- recipe: NAME -->`."""
    import re

    text = (Path(__file__).parents[1] / "README.md").read_text()
    return dict(re.findall(r"<!-- recipe: (\w+) -->\n```python\n(.*?)```", text, re.S))
