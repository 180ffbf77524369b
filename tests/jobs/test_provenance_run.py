"""The shared render signs every image (its manifest holds output.c2pa with the test chain, as
environment secrets): each ok row's file validates with c2pa's Reader, its label is the row's
`c2pa`, its digest the row's `sha256`; failed rows have neither."""

from __future__ import annotations

import hashlib

import pytest

from tests.helpers import read_output
from tests.workers.test_provenance import read_credentials

pytestmark = pytest.mark.slow


def test_every_image_of_the_shared_render_is_signed_and_valid(local_run):
    rows, images = read_output(str(local_run.out))
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(r["c2pa"] is None and r["phash"] is None for r in rows if r["status"] != "ok")
    for row in ok:
        data = images[row["image_key"]]
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        found = read_credentials(data)
        assert found["validation_state"] == "Valid" and found["active_manifest"] == row["c2pa"], row["id"]
        assert len(row["phash"]) == 16 and int(row["phash"], 16) >= 0
        assert row["nsfw_score"] is not None and row["watermark_score"] is not None
