"""Each stage's typed settings, as the manifest holds them and the stage actors receive them.

jobs/manifest.py composes the job manifest from these. Every field has a description, unknown
fields are errors (`extra="forbid"`), and a stage has only the settings its worker applies.
`ROW_SETTINGS` names the fields a row may override (workers/overrides.py derives the per-row
columns, with these fields' bounds, from it).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

TIMESTEP_PRESETS = ("fast27", "smart27", "smart50", "smart100", "smart185", "super27", "super40", "super100")
Preset = Literal[TIMESTEP_PRESETS]  # type: ignore[valid-type]
# Schedulers a UNet stage may use instead of its checkpoint's own ("default": IF's DDPM, the
# upscaler's DDIM), each configured from the checkpoint's scheduler config (workers/models.py).
SCHEDULERS = ("default", "ddpm", "ddim", "dpmsolver_multistep", "unipc", "euler")
# Those whose set_timesteps takes a custom schedule, as the timestep presets are.
PRESET_SCHEDULERS = ("default", "ddpm", "dpmsolver_multistep", "euler")
Scheduler = Literal[SCHEDULERS]  # type: ignore[valid-type]


def _interval(value: tuple[float, float]) -> tuple[float, float]:
    start, end = value
    if not 0 <= start < end <= 1:
        raise ValueError(
            f"expected [start, end] with 0 <= start < end <= 1 (fractions of the stage's schedule), found "
            f"[{start:g}, {end:g}]. Fix: e.g. [0, 1] to guide every step, [0, 0.5] for the first half"
        )
    return (float(start), float(end))


def _interval_text(value: Any) -> Any:
    """A CSV or TSV cell ("0,0.5" or "[0, 0.5]") as the pair it names."""
    if isinstance(value, str):
        return [part.strip() for part in value.strip().strip("[]()").split(",")]
    return value


# Fractions [start, end) of a UNet stage's schedule on which classifier-free guidance runs.
GuidanceInterval = Annotated[tuple[float, float], BeforeValidator(_interval_text), AfterValidator(_interval)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolConfig(Strict):
    """How one stage's actor pool sits on Ray."""

    pool_size: int = Field(1, ge=1, description="Number of actors in this stage's pool.")
    max_pool_size: int | None = Field(
        None,
        ge=1,
        description="Grow the pool up to this many actors while the cluster has room: before each chunk "
        "of shards (ray.chunk_shards) the pool is sized to what the cluster holds then, so nodes that "
        "joined take work from the next chunk, and a pool shrinks (to one actor at least) after nodes "
        "left. None: always pool_size actors.",
    )
    batch_size: int = Field(4, ge=1, description="Rows per call of this stage's worker.")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per actor (fractions share a GPU).")
    num_cpus: float = Field(1, gt=0, description="Logical CPUs reserved per actor.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources reserved per actor, e.g. {ifrender_heavy: 1}: steers this "
        "stage's pool to the nodes (worker groups) that declare them.",
    )

    @field_validator("num_gpus")
    @classmethod
    def _whole_or_share(cls, value: float) -> float:
        # Ray refuses a fractional request above one GPU: it cannot split an actor across GPUs.
        if value > 1 and value != int(value):
            raise ValueError(
                f"expected a share of one GPU (below 1) or a whole number of GPUs, found {value:g}. "
                f"Fix: {int(value)} or {int(value) + 1}, or more actors of a smaller share"
            )
        return value

    @model_validator(mode="after")
    def _max_not_below_size(self):
        if self.max_pool_size is not None and self.max_pool_size < self.pool_size:
            raise ValueError(
                f"max_pool_size={self.max_pool_size} is below pool_size={self.pool_size}; expected the most "
                f"actors the pool may grow to. Fix: max_pool_size >= pool_size, or drop it for a fixed pool"
            )
        return self


POOL_FIELDS = tuple(PoolConfig.model_fields)


class ModelStageConfig(PoolConfig):
    """A stage that loads a model."""

    ROW_SETTINGS: ClassVar[tuple[str, ...]] = ()

    model: str = Field(
        description="Hub id (already staged in the Hugging Face cache) or local directory in "
        "the hub layout; 'tiny:' builds tiny random-weight models into the cache on first use."
    )
    dtype: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="Weights and compute dtype.")
    variant: str | None = Field(None, description="Weights file variant, e.g. fp16 (from_pretrained's variant).")
    micro_batch: int = Field(
        4,
        ge=1,
        description="Rows per model call (short calls are padded). Pixels are bit-identical "
        "for a fixed micro_batch whatever batch_size, pool size or neighbours; changing it can change "
        "them at float-rounding level, as kernels pick their algorithm by shape.",
    )
    watchdog_s: float = Field(
        1800,
        gt=0,
        description="Seconds one call may run before its actor is taken as hung, "
        "exits and has the batch retried on a fresh actor.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when num_gpus > 0, else CPU. cuda without a GPU is an error."
    )


class EncodeConfig(ModelStageConfig):
    """T5-XXL, loaded by transformers: no UNet, so no attention, compile or offload settings."""

    load_in_8bit: bool = Field(False, description="Load T5 in 8 bit through bitsandbytes.")
    clean_caption: bool = Field(True, description="Clean captions as IF does (needs bs4 and ftfy).")


class UNetStageConfig(ModelStageConfig):
    """A diffusers pipeline around a UNet: stages I and II and the upscaler."""

    offload: Literal["none", "model", "sequential"] = Field(
        "none",
        description="CPU offload for small GPUs: model (whole models move to the GPU when used; "
        "little slower) or sequential (layer by layer; least memory, much slower). CUDA only.",
    )
    attention: Literal["sdpa", "eager", "xformers"] = Field(
        "sdpa",
        description="Attention kernels: sdpa (PyTorch scaled_dot_product_attention), eager (plain "
        "matmuls, the reference), xformers (needs the xformers package).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the stage's UNet: slower start, faster steps on GPUs. Compiled "
        "graphs persist in $IFRENDER_COMPILE_CACHE (default ~/.cache/ifrender/inductor) on the node's "
        "disk, so a restarted or added actor loads them instead of compiling again.",
    )
    channels_last: bool = Field(
        False,
        description="Hold the UNet's (and the upscaler's VAE's) activations channels-last: faster "
        "convolutions on tensor-core GPUs; pixels can change at float-rounding level.",
    )
    scheduler: Scheduler = Field(
        "default",
        description="Denoising scheduler: default (the checkpoint's own), or "
        f"{', '.join(SCHEDULERS[1:])}, configured from the checkpoint's scheduler config. "
        "A faster scheduler at fewer steps is the guides' speed lesson.",
    )
    attention_slicing: bool = Field(
        False, description="Compute attention in slices: less memory on small GPUs, slower; replaces `attention`."
    )
    guidance_interval: GuidanceInterval = Field(
        (0.0, 1.0),
        description="[start, end]: the fractions of the schedule on which classifier-free guidance runs (step i "
        "of n sits at i / n). Outside it a step runs the UNet on the conditional half only, at half the cost. "
        "[0, 1]: every step, today's images bit for bit. Guidance matters least in the last steps (limited-"
        "interval guidance, Kynkaanniemi et al. 2024): e.g. [0, 0.6].",
    )
    max_pixels: int = Field(
        1 << 24,
        ge=64,
        description="Largest image (width x height) this stage renders, what its GPU memory is sized "
        "for; a larger row fails with the sizes.",
    )


class IFStageConfig(UNetStageConfig):
    """IF's stages I and II: timestep presets besides a step count."""

    ROW_SETTINGS: ClassVar[tuple[str, ...]] = (
        "guidance_scale",
        "guidance_interval",
        "num_inference_steps",
        "timesteps",
        "strength",
        "scheduler",
    )

    timesteps: Preset | None = Field(None, description=f"IF timestep preset, one of {', '.join(TIMESTEP_PRESETS)}.")

    @model_validator(mode="after")
    def _preset_needs_a_scheduler_that_takes_it(self):
        if self.timesteps and self.scheduler not in PRESET_SCHEDULERS:
            raise ValueError(
                f"timesteps: {self.timesteps} is a custom schedule, which scheduler {self.scheduler} cannot take; "
                f"expected one of {', '.join(PRESET_SCHEDULERS)}. Fix: drop timesteps (use num_inference_steps), "
                f"or choose one of those schedulers"
            )
        return self


class Stage1Config(IFStageConfig):
    num_inference_steps: int = Field(100, ge=1, le=1000, description="Denoising steps (ignored when timesteps is set).")
    max_pixels: int = Field(256 * 256, ge=64, description="Largest image (width x height) stage I renders.")
    guidance_scale: float = Field(7.0, ge=0, le=100, description="Classifier-free guidance scale (<= 1 disables it).")
    strength: float | None = Field(
        None,
        gt=0,
        le=1,
        description="How far img2img/inpainting rows move from their image; none: the diffusers "
        "default (0.7 img2img, 1.0 inpainting).",
    )


class Stage2Config(IFStageConfig):
    ROW_SETTINGS: ClassVar[tuple[str, ...]] = IFStageConfig.ROW_SETTINGS + ("noise_level",)

    num_inference_steps: int = Field(50, ge=1, le=1000, description="Denoising steps (ignored when timesteps is set).")
    max_pixels: int = Field(1024 * 1024, ge=64, description="Largest image (width x height) stage II renders.")
    guidance_scale: float = Field(4.0, ge=0, le=100, description="Classifier-free guidance scale (<= 1 disables it).")
    noise_level: int = Field(250, ge=0, le=1000, description="Noise added to the stage I image.")
    strength: float | None = Field(
        None, gt=0, le=1, description="img2img/inpainting strength at stage II; none: the diffusers default (0.8)."
    )


class UpscaleConfig(UNetStageConfig):
    ROW_SETTINGS: ClassVar[tuple[str, ...]] = (
        "guidance_scale",
        "guidance_interval",
        "num_inference_steps",
        "noise_level",
        "scheduler",
    )

    num_inference_steps: int = Field(75, ge=1, le=1000, description="Denoising steps.")
    guidance_scale: float = Field(9.0, ge=0, le=100, description="Classifier-free guidance scale.")
    noise_level: int = Field(100, ge=0, le=350, description="Noise added to the stage II image (max 350).")
    vae_slicing: bool = Field(
        False, description="Decode the 1024 px images one at a time: less peak memory at batch > 1."
    )
    vae_tiling: bool = Field(
        False, description="Decode each 1024 px image in overlapping tiles: far less memory; seams can show."
    )
    vae_decode: Literal["fp32", "stage"] = Field(
        "fp32",
        description="The 1024 px VAE decode's dtype: fp32 (what the x4 pipeline does in fp16, as this VAE "
        "can overflow there), or stage: the stage's dtype, half the memory traffic, with any image that "
        "comes out non-finite decoded again in fp32. Pixels differ from fp32's at rounding level.",
    )


class ScoreConfig(ModelStageConfig):
    """The score stage (workers/score.py): one CLIP model per actor gives each final image its
    clip_score against the prompt and, with LAION's aesthetic head on the same image embedding, its
    aesthetic_score."""

    enabled: bool | Literal["auto"] = Field(
        "auto",
        description="Score every ok image after the last image stage. auto: when both checkpoints are on this "
        "machine (a directory, the Hugging Face cache, a tiny: name) or at their s3:// mirror; true: required "
        "(a run without them fails before any model work); false: no score stage, the score columns null.",
    )
    model: str = Field(
        "openai/clip-vit-large-patch14",
        description="CLIP checkpoint (transformers layout: config.json, weights, tokenizer, preprocessor): a hub "
        "id already in the Hugging Face cache, a local directory, an s3:// mirror, or 'tiny:clip-tiny'.",
    )
    aesthetic_model: str = Field(
        "trl-lib/ddpo-aesthetic-predictor",
        description="LAION's aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE), a head on CLIP ViT-L/14 image "
        "embeddings: a hub id, directory or s3:// mirror holding aesthetic-model.pth, or 'tiny:aesthetic-tiny'.",
    )
    embeddings: bool = Field(
        False,
        description="Also keep each image's CLIP image embedding (projected, L2-normalised) as clip_embedding, "
        "a float16 list column: for your own filters, clustering or near-duplicate search.",
    )
    batch_size: int = Field(8, ge=1, description="Rows per call of the score stage's worker.")
    micro_batch: int = Field(
        8,
        ge=1,
        description="Images per CLIP call (short calls are padded): scores are the same for a fixed micro_batch "
        "whatever the batch, and within float rounding across micro_batch sizes.",
    )


class WriteConfig(PoolConfig):
    batch_size: int = Field(8, ge=1, description="Images encoded and stored per call.")
    num_cpus: float = Field(0.5, gt=0, description="Logical CPUs reserved per writer actor.")


class C2paConfig(Strict):
    """Content Credentials signed into every image file (workers/provenance.py)."""

    sign_cert: str = Field(
        description="The signing certificate chain, PEM (the signing certificate first, then its CA): a path, "
        "an s3:// URI, or env:NAME for a secret in the environment."
    )
    private_key: str = Field(description="The certificate's private key, PKCS#8 PEM: a path, an s3:// URI or env:NAME.")
    alg: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = Field(
        "es256", description="The signing algorithm, matching the key (es256: a P-256 key)."
    )
    tsa_url: str | None = Field(None, description="A time-stamping authority's URL; None: no trusted time stamp.")


class SafetyConfig(Strict):
    checker: bool | Literal["auto"] = Field(
        "auto",
        description="Run IF's safety checker on each final image and record its verdicts "
        "(nsfw_detected, watermark_detected). auto: when the weights provide one; true: required.",
    )
    watermark: bool | Literal["auto"] = Field(
        "auto", description="Apply IF's watermarker to each final image, as the IF pipelines do. auto: when provided."
    )
    model: str | None = Field(
        None,
        description="Checkpoint holding safety_checker/, feature_extractor/ and watermarker/ "
        "(default: stage1.model, the IF-I repo).",
    )
    nsfw_threshold: float = Field(0.5, description="NSFW head score above which an image is flagged.")
    watermark_threshold: float = Field(0.5, description="Watermark head score above which an image is flagged.")
    on_flagged: Literal["blank", "error"] = Field(
        "blank",
        description="A flagged image: blank (black image, as the IF pipelines return) or error (no "
        "image; the row fails with the verdict).",
    )

    def wanted(self) -> bool:
        """Whether the last stage finishes its images with the checker or the watermark."""
        return self.checker is not False or self.watermark is not False
