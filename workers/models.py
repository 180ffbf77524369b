"""Load each stage's model offline: a hub id, local directory or S3 mirror in, a diffusers pipeline out.

The same code loads the random-weight checkpoints of jobs/plan/models.py and the real DeepFloyd
IF and x4 upscaler weights: `from_pretrained` with `local_files_only=True`, so a run never
reaches a hub. A checkpoint staged to s3:// (`ifrender stage-models`) is synced to the node's
disk first, once per node.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where a model loads: the checks here serve `validate` too, without torch
    import torch

from workers.errors import ModelLoadError, StagingError
from workers.storage import bucket_key, join, read_bytes, s3_client

log = logging.getLogger(__name__)


def torch_dtype(name: str) -> torch.dtype:
    """A stage's dtype setting (fp32, fp16, bf16) as torch's."""
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# Components a stage pipeline is built without: the safety checker and watermarker only act on
# PIL output, and the stage pipelines take embeddings from the encode stage.
_NO_SAFETY = dict(safety_checker=None, feature_extractor=None, watermarker=None)


def cache_root() -> Path:
    """Where ifrender keeps what it builds or copies on a machine (tiny models, synced mirrors, compiled
    graphs): $IFRENDER_CACHE, by default ~/.cache/ifrender."""
    return Path(os.environ.get("IFRENDER_CACHE", Path.home() / ".cache" / "ifrender"))


def staging_hint(stage: str, source: str) -> str:
    if is_local_path(source):
        return (
            f"{stage}: could not load model '{source}' offline. Expected a directory in the hub "
            f"layout there (model_index.json, unet/, scheduler/, ...). Fix: copy the checkpoint "
            f"there (`hf download REPO --local-dir {source}`; `ifrender tiny-models DIR` for tiny "
            f"ones), or set {stage}.model to a hub id already in the Hugging Face cache."
        )
    return (
        f"{stage}: could not load model '{source}' offline: it is not in the Hugging Face cache. "
        f"Fix: stage it once where the hub is reachable with `hf download {source}` (DeepFloyd "
        f"IF needs HF_TOKEN and its licence accepted), or set {stage}.model to a local copy."
    )


def is_local_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


# The file that marks a checkpoint's root: a diffusers pipeline's, or a transformers model's (the
# score stage's CLIP), or the aesthetic head's only file.
PIPELINE = "model_index.json"
TRANSFORMERS = "config.json"
AESTHETIC_FILE = "aesthetic-model.pth"


def check_model_available(stage: str, source: str, marker: str = PIPELINE) -> None:
    """Fail before any GPU work when a model's files are not on this machine (or its mirror)."""
    if source.startswith("s3://"):
        if not mirror_has_checkpoint(source, marker):
            raise ModelLoadError(
                f"{stage}: no staged checkpoint at {source} (expected {source.rstrip('/')}/{marker}). "
                f"Fix: stage it with `ifrender stage-models MANIFEST --to s3://BUCKET/PREFIX` and point "
                f"{stage}.model at the printed location."
            )
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / marker).is_file():
            raise ModelLoadError(staging_hint(stage, source) + f" ({path} has no {marker})")
        return
    if is_local_path(source):
        raise ModelLoadError(staging_hint(stage, source) + f" ({path} is not a directory)")
    if cached_file(source, marker) is None:
        raise ModelLoadError(staging_hint(stage, source))


def cached_file(repo: str, name: str) -> str | None:
    """A hub repo's file in the Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, name)
    return found if isinstance(found, str) else None


def pick_device(stage: str, device: str, num_gpus: float) -> torch.device:
    """auto means CUDA when the stage asked for GPUs; a GPU asked for and missing is an error."""
    if device == "auto":
        device = "cuda" if num_gpus > 0 else "cpu"
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"{stage}: device is cuda but this worker sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). "
            f"Fix: run on a GPU node, or set {stage}.device=cpu for a CPU run."
        )
    return torch.device(device)


def quiet_progress_bars() -> None:
    """Loading bars from every actor would bury the job's own progress lines."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def local_source(source: str, marker: str = PIPELINE) -> str:
    """An s3:// mirror is synced to this node's disk first (once per node); the rest load as given."""
    if source.startswith("s3://"):
        return str(sync_mirror(source, marker=marker))
    return source


def _load(stage: str, cls: Any, source: str, marker: str = PIPELINE, **kwargs: Any) -> Any:
    quiet_progress_bars()
    source = local_source(source, marker)
    try:
        return cls.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{staging_hint(stage, source)} Cause: {err}") from err


def load_encode_pipeline(cfg: Any, device: torch.device) -> Any:
    """IF-I's T5 encoder and tokenizer, wrapped in an IFPipeline without its UNet."""
    from diffusers import IFPipeline
    from transformers import BitsAndBytesConfig, T5EncoderModel

    extra: dict[str, Any] = {}
    if cfg.load_in_8bit:
        extra["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        extra["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    text_encoder = _load(
        "encode",
        T5EncoderModel,
        cfg.model,
        subfolder="text_encoder",
        dtype=torch_dtype(cfg.dtype),
        variant=cfg.variant,
        **extra,
    )
    pipe = _load("encode", IFPipeline, cfg.model, text_encoder=text_encoder, unet=None, **_NO_SAFETY)
    if not cfg.load_in_8bit:  # bitsandbytes places 8-bit weights itself
        pipe.to(device)
    return pipe


def recorded_settings(cfg: Any) -> dict[str, Any]:
    """The loading settings of a UNet stage, recorded with each row it renders."""
    names = (
        "offload",
        "attention",
        "compile",
        "channels_last",
        "attention_slicing",
        "vae_slicing",
        "vae_tiling",
        "vae_decode",
    )
    return {name: getattr(cfg, name) for name in names if hasattr(cfg, name)}


# The diffusers classes behind workers/config.py's SCHEDULERS names.
SCHEDULER_CLASSES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpmsolver_multistep": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


class Schedulers:
    """A stage's schedulers by setting name, each built once from the checkpoint's own config,
    so only the class changes: betas, timestep spacing, IF's thresholding carry over."""

    def __init__(self, default: Any) -> None:
        self.built = {"default": default}

    def __getitem__(self, name: str) -> Any:
        if name not in self.built:
            import inspect

            import diffusers

            cls = getattr(diffusers, SCHEDULER_CLASSES[name])
            config = dict(self.built["default"].config)
            # IF's UNets predict a variance too: a scheduler without a learned-variance mode is
            # told the variance is fixed, so the IF pipelines drop it before the step.
            learned = config.get("variance_type") in ("learned", "learned_range")
            if learned and "variance_type" not in inspect.signature(cls.__init__).parameters:
                config["variance_type"] = "fixed_small"
            self.built[name] = cls.from_config(config)
        return self.built[name]


def load_pipeline(stage: str, pipeline_cls: Any, cfg: Any, device: torch.device, **components: Any) -> Any:
    """A stage's diffusers pipeline (IFPipeline, IFSuperResolutionPipeline, the x4 upscaler),
    with the stage's attention kernels, offload and compile settings."""
    import torch

    pipe = _load(
        stage, pipeline_cls, cfg.model, dtype=torch_dtype(cfg.dtype), variant=cfg.variant, **components, **_NO_SAFETY
    )
    pipe.set_progress_bar_config(disable=True)
    set_attention(stage, pipe.unet, cfg.attention)
    if cfg.attention_slicing:
        pipe.enable_attention_slicing()
    if cfg.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        use_compile_cache()
        pipe.unet = torch.compile(pipe.unet)
    if cfg.offload == "none":
        return pipe.to(device)
    if device.type != "cuda":
        raise ValueError(
            f"{stage}.offload={cfg.offload} moves weights between CPU and a GPU, but this stage runs on "
            f"{device}. Fix: set {stage}.offload=none, or give the stage a GPU (num_gpus > 0)."
        )
    gpu = device.index or 0
    if cfg.offload == "model":
        pipe.enable_model_cpu_offload(gpu_id=gpu)
    else:
        pipe.enable_sequential_cpu_offload(gpu_id=gpu)
    return pipe


def load_clip(cfg: Any, device: torch.device) -> tuple[Any, Any]:
    """The score stage's CLIP model and its processor (tokenizer and image preprocessing)."""
    from transformers import CLIPModel, CLIPProcessor

    model = _load("score", CLIPModel, cfg.model, TRANSFORMERS, dtype=torch_dtype(cfg.dtype), variant=cfg.variant)
    processor = _load("score", CLIPProcessor, cfg.model, TRANSFORMERS)
    return model.to(device).eval(), processor


def aesthetic_weights(source: str) -> str:
    """The aesthetic head's file: in a directory, at an s3:// mirror (synced), or in the Hugging Face cache."""
    if source.startswith("s3://"):
        return str(sync_mirror(source, marker=AESTHETIC_FILE) / AESTHETIC_FILE)
    path = Path(source).expanduser()
    if is_local_path(source):
        found = path / AESTHETIC_FILE
        if not found.is_file():
            raise ModelLoadError(
                f"score.aesthetic_model: {path} has no {AESTHETIC_FILE}; expected LAION's aesthetic predictor v2 "
                f"there. Fix: `hf download trl-lib/ddpo-aesthetic-predictor {AESTHETIC_FILE} --local-dir {source}`, "
                f"or set score.enabled: false."
            )
        return str(found)
    found = cached_file(source, AESTHETIC_FILE)
    if found is None:
        raise ModelLoadError(
            f"score.aesthetic_model: {source}/{AESTHETIC_FILE} is not in the Hugging Face cache. Fix: stage it "
            f"with `hf download {source} {AESTHETIC_FILE}`, or set score.aesthetic_model to a local copy."
        )
    return found


def compile_cache_dir() -> Path:
    return Path(os.environ.get("IFRENDER_COMPILE_CACHE", cache_root() / "inductor"))


def use_compile_cache() -> None:
    """Inductor's compiled graphs and kernels on this node's disk, kept across processes: an actor
    that restarts, or joins later on the node, loads them instead of compiling again."""
    path = compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = True


def set_attention(stage: str, unet: Any, backend: str) -> None:
    """sdpa is diffusers' default processor set; eager the plain-matmul reference ones."""
    if backend == "eager":
        unet.set_default_attn_processor()
    elif backend == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except (ModuleNotFoundError, ValueError) as err:
            raise ValueError(
                f"{stage}.attention=xformers: {err}. Fix: pip install xformers matching torch, or use sdpa."
            ) from err


def preset_timesteps(name: str | None) -> list[int] | None:
    """An IF timestep preset (fast27, smart27, ...) by name."""
    if name is None:
        return None
    from diffusers.pipelines.deepfloyd_if import timesteps

    return list(getattr(timesteps, f"{name}_timesteps"))


# ---- an S3 mirror to local disk ---------------------------------------------------------


def model_cache_dir() -> Path:
    return Path(os.environ.get("IFRENDER_MODEL_CACHE", cache_root() / "models"))


def mirror_has_checkpoint(uri: str, marker: str = PIPELINE) -> bool:
    return read_bytes(join(uri, marker)) is not None


def sync_mirror(uri: str, cache: Path | None = None, marker: str = PIPELINE) -> Path:
    """Make a local copy of s3://bucket/prefix (a staged checkpoint) and return its directory.
    Actors on one node share the copy: a file lock lets one download while the others wait,
    and a stamp of (key, size, ETag) skips the download when the copy is current."""
    bucket, prefix = bucket_key(uri.rstrip("/") + "/")
    target = (cache or model_cache_dir()) / bucket / prefix.rstrip("/")
    target.mkdir(parents=True, exist_ok=True)
    client = s3_client()
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects += [(o["Key"][len(prefix) :], o["Size"], o["ETag"]) for o in page.get("Contents", [])]
    # Folder markers (keys ending in "/") hold nothing; a key that would land outside the cache
    # directory (an absolute or ".." path) is refused before anything is written.
    objects = [o for o in objects if o[0] and not o[0].endswith("/")]
    for name, _, _ in objects:
        if name.startswith("/") or ".." in Path(name).parts:
            raise StagingError(
                f"{uri}{name}: a key of the mirror that would be written outside {target}; expected keys of "
                f"a staged checkpoint (model_index.json, unet/...). Fix: remove it from the mirror."
            )
    if not any(name == marker for name, _, _ in objects):
        raise StagingError(
            f"{uri}: no staged checkpoint there (expected {uri.rstrip('/')}/{marker}). "
            f"Fix: stage it with `ifrender stage-models MANIFEST --to s3://BUCKET/PREFIX`."
        )
    stamp = target / ".ifrender-sync.json"
    wanted = json.dumps(sorted(objects))
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == wanted:
            return target
        stamp.unlink(missing_ok=True)
        for name, size, _ in objects:
            path = target / name
            if path.is_file() and path.stat().st_size == size and _etag_matches(path, name, objects):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.part")
            client.download_file(bucket, prefix + name, str(tmp))
            os.replace(tmp, path)
        stamp.write_text(wanted)
    log.info("synced %s -> %s (%d files)", uri, target, len(objects))
    return target


def _etag_matches(path: Path, name: str, objects: list) -> bool:
    """A single-part ETag is the MD5 of the bytes; a multipart one can't be checked cheaply, so a
    file of the right size is kept (a half-written file never has its final name)."""
    etag = next(e for n, _, e in objects if n == name).strip('"')
    if "-" in etag:
        return True
    md5 = hashlib.md5()
    with open(path, "rb") as f, contextlib.suppress(OSError):
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    return md5.hexdigest() == etag
