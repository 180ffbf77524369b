"""Stage the checkpoints a manifest names, for workers to load offline.

`ifrender stage-models` copies, from the hub (with a token) or a local directory, only the files
the manifest's stages load: the components each stage uses, in the weights variant it asks for,
safetensors before pickles. Renders then load that copy offline (HF_HUB_OFFLINE=1): from a
mounted directory, or from an s3:// mirror that each worker syncs to local disk when it starts
(workers/models.py).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from jobs.manifest import Manifest
from jobs.run.preflight import model_fields
from workers.errors import StagingError
from workers.models import AESTHETIC_FILE, PIPELINE, TRANSFORMERS, is_local_path
from workers.stages import SCORE
from workers.storage import bucket_key, is_s3, join, s3_client

log = logging.getLogger(__name__)

# Components a stage loads from its repo (upscale: all of them). The safety checker, its
# feature extractor and the watermarker go with the image stages that apply them.
SAFETY_COMPONENTS = ("safety_checker", "feature_extractor", "watermarker")
ENCODE_COMPONENTS = ("text_encoder", "tokenizer")

_WEIGHTS = re.compile(r"\.(safetensors|bin|ckpt|msgpack|h5|onnx|pb|pt|pth)$")
_SHARD = r"(-\d{5}-of-\d{5})?"


def stage_components(stage: str, components: set[str]) -> set[str]:
    """The component folders of a repo that `stage` loads (the safety ones are planned apart)."""
    if stage == "encode":
        return components & set(ENCODE_COMPONENTS)
    return components - set(ENCODE_COMPONENTS) - set(SAFETY_COMPONENTS)


def _pick_weights(names: list[str], variant: str | None) -> list[str]:
    """One set of weight files of one component folder: the variant's if it has one, else the
    plain ones; safetensors over .bin; other frameworks' formats never."""

    def of(v: str | None) -> list[str]:
        if v:
            pat = rf"^[\w]+\.{re.escape(v)}{_SHARD}\.(safetensors|bin)$|^[\w]+\.(safetensors|bin)\.index\.{re.escape(v)}\.json$"
        else:
            pat = rf"^[\w]+{_SHARD}\.(safetensors|bin)$|^[\w]+\.(safetensors|bin)\.index\.json$"
        return [n for n in names if re.match(pat, n)]

    chosen = (of(variant) if variant else []) or of(None)
    if any(n.endswith(".safetensors") or ".safetensors.index" in n for n in chosen):
        chosen = [n for n in chosen if n.endswith(".safetensors") or ".safetensors.index" in n]
    return chosen


def needed_files(listing: list[str], wanted: dict[str, str | None]) -> list[str]:
    """Files of a repo listing (paths relative to its root) that the stages need.
    `wanted` maps component folder -> weights variant (None: plain weights)."""
    by_folder: dict[str, list[str]] = {}
    for path in listing:
        folder, _, name = path.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    keep = [p for p in listing if p in (PIPELINE, AESTHETIC_FILE) or p.upper().startswith("LICENSE")]
    for folder, variant in sorted(wanted.items()):  # "": the repo's root (a transformers model's)
        names = by_folder.get(folder, [])
        other = [n for n in names if not _WEIGHTS.search(n) and ".index." not in n]
        other = [n for n in other if folder or n != PIPELINE and not n.upper().startswith(("LICENSE", "README"))]
        keep += [f"{folder}/{n}" if folder else n for n in sorted(other + _pick_weights(names, variant))]
    return keep


def repo_plan(manifest: Manifest, token: str | None = None) -> dict[str, dict[str, str | None]]:
    """source -> {component folder: variant}, over the stages the manifest runs."""
    plan: dict[str, dict[str, str | None]] = {}
    for stage in manifest.stages():
        cfg = getattr(manifest, stage)
        if stage == SCORE:  # CLIP's files sit at its repo's root; the aesthetic head is one file
            plan.setdefault(cfg.model, {})[""] = cfg.variant
            plan.setdefault(cfg.aesthetic_model, {})
            continue
        listing = _listing(cfg.model, token, folders_only=True)
        for component in stage_components(stage, set(listing)):
            plan.setdefault(cfg.model, {})[component] = cfg.variant
    safety = manifest.safety
    wanted = (("safety_checker", "feature_extractor") if safety.checker is not False else ()) + (
        ("watermarker",) if safety.watermark is not False else ()
    )
    if wanted:  # the last stage's checker and watermarker, from the IF-I checkpoint by default
        source = safety.model or manifest.stage1.model
        listing = _listing(source, token, folders_only=True)
        for component in set(wanted) & set(listing):
            plan.setdefault(source, {})[component] = manifest.stage1.variant
    return plan


def _listing(source: str, token: str | None, folders_only: bool = False) -> list[str]:
    """Files of a checkpoint (relative paths), or its top-level folders."""
    if is_local_path(source):
        root = Path(source).expanduser()
        markers = (PIPELINE, TRANSFORMERS, AESTHETIC_FILE)
        if not any((root / m).is_file() for m in markers):
            raise StagingError(f"{source}: expected a checkpoint directory with one of {markers}; found none there")
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    else:
        from huggingface_hub import HfApi

        try:
            files = sorted(HfApi(token=token).list_repo_files(source))
        except Exception as err:  # network, auth, gating: all end the same way for the user
            raise StagingError(
                f"{source}: could not list the repo on the hub ({type(err).__name__}: {err}). Fix: set HF_TOKEN "
                f"to a token whose account accepted the model's licence, on a machine that reaches the hub."
            ) from err
    if folders_only:
        return sorted({f.split("/")[0] for f in files if "/" in f})
    return files


def destination(dest: str, source: str) -> str:
    """Where a source lands: a hub id keeps its owner/name; a directory keeps its name."""
    name = Path(source).expanduser().resolve().name if is_local_path(source) else source
    return join(dest, name) if is_s3(dest) else str(Path(dest) / name)


def stage_models(manifest: Manifest, dest: str, token: str | None = None) -> dict[str, str]:
    """Copy what the manifest's stages load to `dest` (directory or s3://); the manifest field
    (`stage1.model`, `score.aesthetic_model`, ...) -> the copy."""
    copied: dict[str, str] = {}
    for source, wanted in repo_plan(manifest, token).items():
        files = needed_files(_listing(source, token), wanted)
        target = destination(dest, source)
        with tempfile.TemporaryDirectory() as tmp:
            if is_local_path(source):
                root = Path(source).expanduser()
            else:
                from huggingface_hub import snapshot_download

                root = Path(snapshot_download(source, allow_patterns=files, token=token, local_dir=tmp))
            size = sum((root / f).stat().st_size for f in files)
            log.info("staging %s: %d files, %.1f MB -> %s", source, len(files), size / 1e6, target)
            for f in files:
                _put(root / f, f"{target}/{f}" if is_s3(target) else str(Path(target) / f))
        copied[source] = target
    return {f"{s}.{f}": copied[getattr(getattr(manifest, s), f)] for s, f, _ in model_fields(manifest)}


def _put(src: Path, uri: str) -> None:
    if is_s3(uri):
        bucket, key = bucket_key(uri)
        s3_client().upload_file(str(src), bucket, key)  # multipart for large files
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    shutil.copyfile(src, tmp)
    os.replace(tmp, path)
