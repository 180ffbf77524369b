"""Content Credentials: a signed C2PA manifest embedded in every image file the writer stores
(output.c2pa), with c2pa-python. The manifest declares the image machine-made (a `c2pa.created`
action whose digitalSourceType is IPTC's trainedAlgorithmicMedia), names ifrender and its version
as the claim generator, and records every stage's model, the run id and the row id. It proves who
signed the file and that its pixels have not changed since; it does not prove what the prompt
was meant to show, nor survive a re-encode (IF's invisible watermark, applied to the pixels,
is the mark that does)."""

from __future__ import annotations

import io
import json
import os
from importlib import metadata
from typing import Any

from workers.errors import StorageError
from workers.storage import read_bytes

DIGITAL_SOURCE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ProvenanceError(StorageError):
    """A certificate or key that cannot sign; the message names the file."""


def version() -> str:
    try:
        return metadata.version("ifrender")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def read_secret(ref: str, field: str) -> bytes:
    """A PEM from `env:NAME` (a secret in the environment), an s3:// URI or a local path."""
    if ref.startswith("env:"):
        value = os.environ.get(ref[len("env:") :])
        if not value:
            raise ProvenanceError(
                f"output.c2pa.{field}: {ref}, but that environment variable is not set. Fix: set it to the PEM "
                f"text (a Kubernetes secret as an env var), or give a path or s3:// URI."
            )
        return value.encode()
    try:
        data = read_bytes(ref if "://" in ref else os.path.expanduser(ref))
    except Exception as err:  # noqa: BLE001 - any unreadable location is named the same way
        raise ProvenanceError(f"output.c2pa.{field}: {ref} cannot be read ({err}).") from err
    if data is None:
        raise ProvenanceError(f"output.c2pa.{field}: {ref} not found. Expected a PEM file, an s3:// URI or env:NAME.")
    return data


class Credentials:
    """The job's signer, built once per writer actor."""

    def __init__(self, cfg: Any) -> None:
        import c2pa

        self.cfg = cfg
        cert, key = read_secret(cfg.sign_cert, "sign_cert"), read_secret(cfg.private_key, "private_key")
        try:
            info = c2pa.C2paSignerInfo(alg=cfg.alg.encode(), sign_cert=cert, private_key=key, ta_url=cfg.tsa_url)
            self.signer = c2pa.Signer.from_info(info)
        except Exception as err:  # noqa: BLE001 - c2pa's errors are its own classes
            raise ProvenanceError(self.refused(err)) from err

    def refused(self, err: Exception) -> str:
        return (
            f"output.c2pa: the certificate {self.cfg.sign_cert} and key {self.cfg.private_key} cannot sign with "
            f"{self.cfg.alg} ({type(err).__name__}: {err}). Expected a PEM chain (the signing certificate first, "
            f"then its CA; not self-signed; keyUsage digitalSignature) and its PKCS#8 private key. Fix: the "
            f"certificate and key that belong together, or output.c2pa.alg matching the key."
        )

    def sign(self, data: bytes, image_format: str, title: str, models: dict[str, str], run_id: str, row_id: str):
        """(the signed file's bytes, its manifest's label)."""
        import c2pa

        agent = {"name": "ifrender", "version": version()}
        manifest = {
            "claim_generator_info": [agent],
            "title": title,
            "format": MIME[image_format],
            "assertions": [
                {
                    "label": "c2pa.actions.v2",
                    "data": {
                        "actions": [
                            {
                                "action": "c2pa.created",
                                "digitalSourceType": DIGITAL_SOURCE,
                                "softwareAgent": agent,
                                "parameters": {"models": models, "run_id": run_id, "row_id": row_id},
                            }
                        ]
                    },
                }
            ],
        }
        signed = io.BytesIO()
        with c2pa.Builder(json.dumps(manifest)) as builder:
            builder.sign(self.signer, MIME[image_format], io.BytesIO(data), signed)
        with c2pa.Reader(MIME[image_format], io.BytesIO(signed.getvalue())) as reader:
            label = json.loads(reader.json())["active_manifest"]
        return signed.getvalue(), label

    def check(self) -> None:
        """Sign a 1-pixel PNG: a certificate or key that cannot sign fails here, before any model work."""
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (1, 1)).save(buf, format="PNG")
        import c2pa

        try:
            signed, _ = self.sign(buf.getvalue(), "png", "check.png", {}, "check", "check")
            with c2pa.Reader("image/png", io.BytesIO(signed)) as reader:
                found = json.loads(reader.json())
        except ProvenanceError:
            raise
        except Exception as err:  # noqa: BLE001 - c2pa's errors are its own classes
            raise ProvenanceError(self.refused(err)) from err
        if found.get("validation_state") not in ("Valid", "Trusted"):
            codes = [s.get("code") for s in found.get("validation_status", [])]
            raise ProvenanceError(self.refused(ValueError(f"what it signs does not validate: {codes}")))
