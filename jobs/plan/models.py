"""Build random-weight checkpoints of the real IF cascade offline: configs in, hub-layout dirs out.

One builder, three presets. `full` is the published architectures (jobs/perf/configs, copied
from the reference configs) for GPU benchmarks; `tiny` (tests and the demo) and `bench` keep each
model's block layout (attention at the same relative resolutions, the same embedding types) with
tiny widths, `bench` with a T5 wide enough that the encoder does real work per batch. The
production loaders in workers/models.py load all of them unchanged. Tokenizers are trained here
on a few lines of text because nothing can be fetched from a hub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"

# Bumped whenever the tiny architectures change, so cached copies are rebuilt.
TINY_VERSION = "6"

# Reduced resolutions of the tiny widths: stage I at 16 px, stage II at 64 px, the x4 upscaler to 256 px.
STAGE1_SIZE = 16
STAGE2_SIZE = 64

# Per preset, the T5 encoder's size (None: the full T5-XXL config).
T5_PRESETS = {
    "tiny": dict(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2),
    "bench": dict(d_model=384, d_ff=1536, d_kv=48, num_heads=8, num_layers=8),
    "full": None,
}


def repo_names(preset: str = "tiny") -> dict[str, str]:
    """Folder names of a preset's repos, mirroring DeepFloyd/IF-I-XL-v1.0, DeepFloyd/IF-II-L-v1.0
    and stabilityai/stable-diffusion-x4-upscaler."""
    return {"stage1": f"IF-I-{preset}", "stage2": f"IF-II-{preset}", "upscale": f"x4-upscaler-{preset}"}


# The score stage's checkpoints, tiny only: a CLIP in the transformers layout (openai/clip-vit-large-patch14's
# stand-in) and LAION's aesthetic head on its embeddings (trl-lib/ddpo-aesthetic-predictor's).
SCORE_REPOS = {"model": "clip-tiny", "aesthetic_model": "aesthetic-tiny"}

# `tiny:NAME` in a manifest: the presets built on demand on a CPU (full size needs a GPU's time).
ALL_REPOS = {name: preset for preset in ("tiny", "bench") for name in repo_names(preset).values()} | {
    name: "tiny" for name in SCORE_REPOS.values()
}
CLIP_DIM = 32

_CORPUS = """a photo of a red fox sitting in the snow at dawn
an oil painting of a lighthouse on a rocky coast during a storm
a watercolor illustration of a small village in the mountains
a close-up photograph of a hummingbird drinking from a flower
a futuristic city skyline at night with neon lights and flying cars
a bowl of ramen with soft boiled egg, studio lighting, 35mm
a corgi wearing sunglasses riding a skateboard on the beach
an astronaut reading a newspaper on the moon, digital art
a sign that says "hello world" in bold letters
the quick brown fox jumps over the lazy dog 0123456789
macro shot of dew drops on a spider web in the morning light
a medieval castle surrounded by fog, fantasy concept art
a cozy library with tall shelves, a fireplace and an armchair
portrait of an old fisherman with a white beard, black and white
a glass of orange juice on a wooden table next to a croissant
an abstract painting with bright colors and geometric shapes
a robot gardener watering tomatoes in a greenhouse
a snowy forest road under a starry sky, long exposure
a vintage car parked in front of a diner, 1950s style
a pencil sketch of a cat sleeping on a windowsill
""".splitlines()


def _config(name: str) -> dict:
    cfg = json.loads((CONFIGS / name).read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def build_t5_tokenizer():
    """A SentencePiece-style Unigram tokenizer with T5's special tokens and 100 extra ids."""
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5Tokenizer

    trainer = SentencePieceUnigramTokenizer()
    trainer.train_from_iterator(
        _CORPUS * 4, vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    vocab = [tuple(piece) for piece in json.loads(trainer.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=77)


def build_clip_tokenizer():
    """A byte-level BPE with CLIP's `</w>` word suffix and start/end tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=900, end_of_word_suffix="</w>", initial_alphabet=byte_chars, show_progress=False
    )
    bpe.train_from_iterator([line.lower() for line in _CORPUS] * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    # CLIP's vocab holds every byte alone and at a word's end, then the merges, then the specials.
    vocab: dict[str, int] = {}
    for token in sorted(byte_chars) + [c + "</w>" for c in sorted(byte_chars)]:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_t5_encoder(vocab_size: int, preset: str = "tiny"):
    from transformers import T5Config, T5EncoderModel

    cfg = _config("t5-v1_1-xxl_encoder_config.json")
    cfg.pop("architectures", None)
    if T5_PRESETS[preset] is not None:
        cfg.update(**T5_PRESETS[preset], vocab_size=vocab_size)
    return T5EncoderModel(T5Config(**cfg)).eval()


def t5_dim(preset: str) -> int:
    return (T5_PRESETS[preset] or _config("t5-v1_1-xxl_encoder_config.json"))["d_model"]


def build_stage1_unet(preset: str = "tiny"):
    from diffusers import UNet2DConditionModel

    cfg = _config("IF-I-XL-v1.0_unet_config.json")
    if preset == "full":
        return UNet2DConditionModel(**cfg).eval()
    cfg.update(
        block_out_channels=[16, 32, 48, 64],
        layers_per_block=1,
        attention_head_dim=8,
        addition_embed_type_num_heads=2,
        cross_attention_dim=64,
        encoder_hid_dim=t5_dim(preset),
        norm_num_groups=8,
        sample_size=STAGE1_SIZE,
    )
    return UNet2DConditionModel(**cfg).eval()


def build_stage2_unet(preset: str = "tiny"):
    from diffusers import UNet2DConditionModel

    cfg = _config("IF-II-L-v1.0_unet_config.json")
    if preset == "full":
        return UNet2DConditionModel(**cfg).eval()
    cfg.update(
        block_out_channels=[8, 16, 32, 48, 64],
        layers_per_block=[1, 1, 1, 1, 1],
        attention_head_dim=8,
        addition_embed_type_num_heads=2,
        cross_attention_dim=64,
        encoder_hid_dim=t5_dim(preset),
        time_embedding_dim=64,
        norm_num_groups=8,
        sample_size=STAGE2_SIZE,
    )
    return UNet2DConditionModel(**cfg).eval()


def build_upscale_components(tokenizer, preset: str = "tiny"):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg = _config("sd-x4-upscaler_unet_config.json")
    vae_cfg = _config("sd-x4-upscaler_vae_config.json")
    clip_cfg = _config("sd-x4-upscaler_text_encoder_config.json")
    for key in ("architectures", "torch_dtype", "transformers_version"):
        clip_cfg.pop(key, None)
    if preset != "full":
        unet_cfg.update(
            block_out_channels=[16, 32, 32, 64],
            layers_per_block=1,
            attention_head_dim=8,
            cross_attention_dim=CLIP_DIM,
            norm_num_groups=8,
            sample_size=STAGE2_SIZE,
        )
        vae_cfg.update(
            block_out_channels=[8, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=4 * STAGE2_SIZE
        )
        clip_cfg.update(
            hidden_size=CLIP_DIM,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=CLIP_DIM,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return (
        UNet2DConditionModel(**unet_cfg).eval(),
        AutoencoderKL(**vae_cfg).eval(),
        CLIPTextModel(CLIPTextConfig(**clip_cfg)).eval(),
    )


def build_safety_components():
    """IF-I's safety checker (a CLIP vision tower with NSFW and watermark heads), its image
    processor, and the watermarker, tiny. The heads' biases sit far below the 0.5 threshold, so
    random weights flag nothing unless a manifest lowers the thresholds; the watermark is an
    opaque white square, so applying it is visible."""
    import torch
    from diffusers.pipelines.deepfloyd_if.safety_checker import IFSafetyChecker
    from diffusers.pipelines.deepfloyd_if.watermark import IFWatermarker
    from transformers import CLIPConfig, CLIPImageProcessor

    vision = dict(
        hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
        image_size=32, patch_size=8, projection_dim=8,
    )  # fmt: skip
    checker = IFSafetyChecker(CLIPConfig(vision_config=vision, text_config=dict(hidden_size=16, projection_dim=8)))
    with torch.no_grad():
        for head in (checker.p_head, checker.w_head):
            head.weight.mul_(0.01)
            head.bias.fill_(-10.0)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    watermarker = IFWatermarker()
    watermarker.watermark_image.fill_(255.0)
    return checker.eval(), processor, watermarker


def _save(pipe, path: Path, preset: str) -> None:
    """Full-precision weights plus an fp16 variant (`*.fp16.safetensors`), as the hub repos have.
    The variant goes first so the configs left behind are the fp32 ones. Full size: fp16 only."""
    import torch

    pipe.to(torch.float16).save_pretrained(path, variant="fp16", safe_serialization=True)
    if preset != "full":
        pipe.to(torch.float32).save_pretrained(path, safe_serialization=True)


def _scheduler(cls, name: str):
    return cls.from_config(_config(name))


def build_models(root: str | Path, seed: int = 0, preset: str = "tiny") -> dict[str, Path]:
    """Write the three repos of a preset under `root`; returns {stage: repo dir}. Idempotent."""
    import torch

    root = Path(root)
    repos = {stage: root / name for stage, name in repo_names(preset).items()}
    scorers = {field: root / name for field, name in SCORE_REPOS.items()} if preset == "tiny" else {}
    stamp = root / ("TINY_VERSION" if preset == "tiny" else f"TINY_VERSION.{preset}")
    if (
        stamp.exists()
        and stamp.read_text().strip() == TINY_VERSION
        and all((d / "model_index.json").exists() for d in repos.values())
        and all(d.is_dir() for d in scorers.values())
    ):
        return repos

    from workers.models import quiet_progress_bars

    quiet_progress_bars()
    logging.getLogger(__name__).info("building %s models in %s", preset, root)
    torch.manual_seed(seed)
    _build_if(repos, preset)
    _build_upscaler(repos["upscale"], preset)
    if scorers:
        build_score_models(scorers["model"], scorers["aesthetic_model"])
    stamp.write_text(TINY_VERSION + "\n")
    return repos


def _build_if(repos: dict[str, Path], preset: str) -> None:
    """IF-I (with T5) and IF-II. The safety checker and watermarker come with the tiny widths
    only: random full-size heads would flag at random."""
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline

    t5_tokenizer = build_t5_tokenizer()
    t5 = build_t5_encoder(len(t5_tokenizer), preset)
    no_safety = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    # IF-I carries the safety checker, its feature extractor and the watermarker, as on the hub.
    safety = no_safety
    if preset != "full":
        checker, processor, watermarker = build_safety_components()
        safety = dict(
            safety_checker=checker, feature_extractor=processor, watermarker=watermarker, requires_safety_checker=True
        )
    stage1 = IFPipeline(
        tokenizer=t5_tokenizer,
        text_encoder=t5,
        unet=build_stage1_unet(preset),
        scheduler=_scheduler(DDPMScheduler, "IF-I-XL-v1.0_scheduler_config.json"),
        **safety,
    )
    _save(stage1, repos["stage1"], preset)
    del stage1
    # The IF-II repo on the hub lists a tokenizer and text encoder too; stage II is always
    # loaded with text_encoder=None and fed embeddings from the encode stage.
    stage2 = IFSuperResolutionPipeline(
        tokenizer=t5_tokenizer,
        text_encoder=t5,
        unet=build_stage2_unet(preset),
        scheduler=_scheduler(DDPMScheduler, "IF-II-L-v1.0_scheduler_config.DERIVED.json"),
        image_noising_scheduler=_scheduler(DDPMScheduler, "IF-II-L-v1.0_image_noising_scheduler_config.DERIVED.json"),
        **no_safety,
    )
    _save(stage2, repos["stage2"], preset)


def _build_upscaler(path: Path, preset: str) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    clip_tokenizer = build_clip_tokenizer()
    unet, vae, clip = build_upscale_components(clip_tokenizer, preset)
    upscale = StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        unet=unet,
        low_res_scheduler=_scheduler(DDPMScheduler, "sd-x4-upscaler_low_res_scheduler_config.json"),
        scheduler=_scheduler(DDIMScheduler, "sd-x4-upscaler_scheduler_config.json"),
        max_noise_level=350,
    )
    _save(upscale, path, preset)


def clip_config(preset: str = "tiny"):
    """CLIP ViT-L/14's config (full), or tiny widths with the same structure."""
    from transformers import CLIPConfig

    cfg = _config("clip-vit-large-patch14_config.json")
    if preset != "full":
        cfg["projection_dim"] = 16
        cfg["text_config"].update(
            hidden_size=CLIP_DIM, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=16
        )
        cfg["vision_config"].update(
            hidden_size=CLIP_DIM, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
            patch_size=8, projection_dim=16,
        )  # fmt: skip
    return CLIPConfig(**cfg)


def build_score_models(clip_dir: Path, aesthetic_dir: Path) -> None:
    """The score stage's tiny checkpoints: a CLIP (model, tokenizer, image processor) saved as
    transformers saves openai/clip-vit-large-patch14, and an aesthetic head saved as LAION's
    release is (a state dict in aesthetic-model.pth). Random CLIP towers would give cosines around
    zero, so clip_score (floored at 0) would be 0 for half the images: both towers end in one
    shared bias through one shared projection, so scores are positive and still differ per image.
    The head's last bias puts its scores near LAION's scale."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    from workers.models import AESTHETIC_FILE
    from workers.score import AestheticHead

    tokenizer = build_clip_tokenizer()
    config = clip_config("tiny")
    config.text_config.update(
        dict(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.text_projection.weight.copy_(model.visual_projection.weight)
        shared = torch.randn(CLIP_DIM)
        model.vision_model.post_layernorm.bias.copy_(shared)
        model.text_model.final_layer_norm.bias.copy_(shared)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(clip_dir, safe_serialization=True)
    processor.save_pretrained(clip_dir)
    head = AestheticHead(config.projection_dim)
    with torch.no_grad():  # centred on 5 with a spread of 0.5 over pictures' embeddings, as LAION's scale
        pictures = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
        embeds = model.get_image_features(
            pixel_values=processor(images=list(pictures), return_tensors="pt")["pixel_values"]
        ).pooler_output
        raw = head(embeds / embeds.norm(dim=-1, keepdim=True))
        scale = 0.5 / raw.std()
        last = head.layers[-1]
        last.weight.mul_(scale)
        last.bias.copy_(scale * (last.bias - raw.mean()) + 5.0)
    aesthetic_dir.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), aesthetic_dir / AESTHETIC_FILE)
