"""Shard commits: output in, what is done out. This is what makes output exactly-once and resumable.

A shard is committed when its marker `commits/<shard>-<attempt>.json` exists. The marker is
created last and once (`create_exclusive`): of two writers, one wins and the other cleans up.
It names the shard's metadata file, which names its images. Readers and resume trust markers,
never a bare listing; `index.json` lists the committed shards for consumers. A retry of a
shard's failed rows commits the next attempt, and the highest attempt of a shard is the one
that counts.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from jobs.manifest import MODEL_STAGES, Manifest
from jobs.storage import create_exclusive, is_s3, join, list_prefix, read_bytes, write_bytes

_MARKER = re.compile(r"(\d{6})-(\d{3})\.json$")
# Settings that change no pixel and no row: free to differ between a run and its resume.
_RUNTIME_FIELDS = (
    "pool_size",
    "batch_size",
    "num_gpus",
    "num_cpus",
    "device",
    "watchdog_s",
    "resources",
    "offload",
    "attention",
    "compile",
)


class ChangedManifestError(RuntimeError):
    pass


@dataclass
class Commit:
    shard: int
    attempt: int
    metadata: str  # key of the shard's metadata file, relative to the output
    rows: int
    ok: int
    error: int
    run: str
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return marker_key(self.shard, self.attempt)


def marker_key(shard: int, attempt: int) -> str:
    return f"commits/{shard:06d}-{attempt:03d}.json"


def list_commits(out: str) -> dict[int, Commit]:
    """The committed attempt of every committed shard (the highest attempt wins)."""
    latest: dict[int, tuple[int, str]] = {}
    for uri in list_prefix(join(out, "commits/")):
        match = _MARKER.search(uri)
        if match:
            shard, attempt = int(match[1]), int(match[2])
            if attempt >= latest.get(shard, (-1, ""))[0]:
                latest[shard] = (attempt, uri)

    def read(uri: str) -> Commit:
        data = read_bytes(uri)
        if data is None:
            raise RuntimeError(f"{uri}: listed as a commit marker but cannot be read; run again to retry")
        return Commit(**json.loads(data))

    uris = [uri for _, uri in latest.values()]
    if not is_s3(out):
        return dict(zip(latest, map(read, uris)))
    # Markers are small and many: on S3 read them side by side, not one round trip after another.
    with ThreadPoolExecutor(16) as pool:
        return dict(zip(latest, pool.map(read, uris)))


def try_commit(out: str, commit: Commit) -> bool:
    """Create the shard's marker; False when another writer committed this attempt first."""
    return create_exclusive(join(out, commit.key), json.dumps(asdict(commit), indent=1).encode())


def write_index(out: str, commits: dict[int, Commit]) -> dict[str, Any]:
    shards = [asdict(commits[s]) for s in sorted(commits)]
    index = {
        "shards": [{k: c[k] for k in ("shard", "attempt", "metadata", "rows", "ok", "error")} for c in shards],
        "rows": sum(c["rows"] for c in shards),
        "ok": sum(c["ok"] for c in shards),
        "error": sum(c["error"] for c in shards),
    }
    write_bytes(join(out, "index.json"), json.dumps(index, indent=1).encode())
    return index


# ---- the job record: refuse to mix two different jobs in one output -----------------------


def fingerprint(manifest: Manifest) -> dict[str, Any]:
    """The manifest fields that decide which rows exist and what their images look like."""
    data = manifest.model_dump(mode="json")
    for stage in MODEL_STAGES:
        for name in _RUNTIME_FIELDS:
            data[stage].pop(name)
    for name in ("name", "write", "ray", "contact_sheets"):
        data.pop(name)
    # webdataset is left out on purpose: turned on later, it derives tars for committed shards
    data["output"] = {k: data["output"][k] for k in ("image_format", "quality", "embed_images")}
    return data


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{path}.{k}".strip("."))]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def check_job(out: str, manifest: Manifest, allow_changed: bool) -> None:
    """Record the job in a new output; refuse a resume whose manifest would render differently."""
    uri = join(out, "job.json")
    new = fingerprint(manifest)
    existing = read_bytes(uri)
    if existing is not None:
        changes = _diff(json.loads(existing)["fingerprint"], new)
        if not changes:
            return
        if not allow_changed:
            raise ChangedManifestError(
                f"output.path {out} holds a job rendered with other settings: "
                + "; ".join(changes[:8])
                + ". Fix: choose another output.path, pass --allow-changed to render the rest with "
                "the new settings, or --overwrite to start over."
            )
    record = {"fingerprint": new, "manifest": manifest.model_dump(mode="json")}
    write_bytes(uri, json.dumps(record, indent=1).encode())
