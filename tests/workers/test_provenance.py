"""Content Credentials from the writer: each file carries a signed C2PA manifest that c2pa's own
Reader validates, declaring it machine-made with its models, run and row; an altered file is
reported invalid; credentials that cannot sign are refused naming the files."""

from __future__ import annotations

import io
import json

import c2pa
import numpy as np
import pytest

from tests.harness.credentials import signing_chain
from workers.config import C2paConfig
from workers.provenance import DIGITAL_SOURCE, Credentials, ProvenanceError
from workers.write import WriteWorker


def read_credentials(data: bytes, mime: str = "image/png") -> dict:
    with c2pa.Reader(mime, io.BytesIO(data)) as reader:
        return json.loads(reader.json())


def _chain(tmp_path) -> C2paConfig:
    cert, key = signing_chain()
    (tmp_path / "chain.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    return C2paConfig(sign_cert=str(tmp_path / "chain.pem"), private_key=str(tmp_path / "key.pem"))


@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
def test_every_written_file_carries_valid_credentials_naming_its_models_run_and_row(tmp_path, image_format):
    import hashlib

    rng = np.random.default_rng(0)
    batch = {
        "id": np.array(["fox", "owl", "bad"], dtype=object),
        "prompt": np.array(["a fox", "an owl", ""], dtype=object),
        "negative_prompt": np.array(["", "", ""], dtype=object),
        "seed": np.array([1, 2, 3]),
        "status": np.array(["ok", "ok", "error"], dtype=object),
        "error": np.array(["", "", "seed: no"], dtype=object),
        "shard": np.array([0, 0, 0]),
        "stage1_image": rng.uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32),
        "stage1_model": np.array(["IF-I-tiny"] * 3, dtype=object),
        "encode_model": np.array(["IF-I-tiny"] * 3, dtype=object),
    }
    out = tmp_path / "out"
    writer = WriteWorker(str(out), "run7", "stage1_image", {0: 0}, image_format=image_format, c2pa=_chain(tmp_path))
    result = writer(batch)
    assert result["c2pa"][2] is None and result["image_key"][2] is None
    mime = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}[image_format]
    for i, row_id in enumerate(["fox", "owl"]):
        data = (out / result["image_key"][i]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == result["sha256"][i]  # the digest is of the signed file
        found = read_credentials(data, mime)
        assert found["validation_state"] == "Valid", found.get("validation_status")
        assert found["active_manifest"] == result["c2pa"][i]
        claim = found["manifests"][found["active_manifest"]]
        assert claim["claim_generator_info"][0]["name"] == "ifrender"
        [actions] = [a["data"]["actions"] for a in claim["assertions"] if a["label"].startswith("c2pa.actions")]
        assert actions[0]["action"] == "c2pa.created" and actions[0]["digitalSourceType"] == DIGITAL_SOURCE
        assert actions[0]["parameters"] == {
            "models": {"stage1": "IF-I-tiny", "encode": "IF-I-tiny"},
            "run_id": "run7",
            "row_id": row_id,
        }
    # A file altered after signing is reported invalid.
    data = bytearray((out / result["image_key"][0]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    assert read_credentials(bytes(data), mime)["validation_state"] == "Invalid"


def test_credentials_that_cannot_sign_are_refused_naming_the_files(tmp_path, monkeypatch):
    good = _chain(tmp_path)
    _, other = signing_chain()
    (tmp_path / "other.pem").write_bytes(other)  # a key that is not the certificate's
    with pytest.raises(ProvenanceError, match=r"chain.pem and key .*other.pem cannot sign"):
        Credentials(good.model_copy(update={"private_key": str(tmp_path / "other.pem")})).check()
    (tmp_path / "junk.pem").write_text("-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    with pytest.raises(ProvenanceError, match=r"junk.pem and key .*key.pem cannot sign"):
        Credentials(good.model_copy(update={"sign_cert": str(tmp_path / "junk.pem")})).check()
    with pytest.raises(ProvenanceError, match=r"output.c2pa.private_key: .*missing.pem not found"):
        Credentials(good.model_copy(update={"private_key": str(tmp_path / "missing.pem")}))
    with pytest.raises(ProvenanceError, match="IFRENDER_NO_SUCH_KEY, but that environment variable is not set"):
        Credentials(good.model_copy(update={"private_key": "env:IFRENDER_NO_SUCH_KEY"}))
    monkeypatch.setenv("IFRENDER_KEY", (tmp_path / "key.pem").read_text())
    Credentials(good.model_copy(update={"private_key": "env:IFRENDER_KEY"})).check()  # a secret in the environment
