"""Models for the benchmarks: the smoke models, or the real architectures with random weights.

A network's speed does not depend on its weights' values, so a machine that cannot download anything
still measures the real Stable Diffusion v1-4, open_clip ViT-L-14 and BLIP-large networks: they are built
from their published configurations, initialised at random, written once with the libraries' own savers
(fp16, ~4.3 GB in all) and loaded back through the production loaders. Their images are noise and their
prompts nonsense, and a random BLIP never emits its end token, so every caption runs to the token limit.

The guides' models are built the same way when a benchmark asks for them (GUIDE_COMPONENTS, ~2.3 GB):
an SD 1.x ControlNet (lllyasviel/sd-controlnet-canny's and -depth's architecture, one folder that the
edges and depth guides each load as their own model), MiDaS DPT-Hybrid (Intel/dpt-hybrid-midas) as the
depth estimator, and h94/IP-Adapter's ip-adapter_sd15 with its ViT-H/14 image encoder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from i2p2i_bot.smoke import (
    SD14_SCHEDULER,
    SMOKE_LOOK_WEIGHTS,
    clip_tokenizer_vocab,
    ensure_smoke_models,
    write_ip_adapter,
)

log = logging.getLogger(__name__)

# Bump when an architecture below changes, so old caches are rebuilt instead of half-matching.
RANDOM_WEIGHTS_VERSION = 1
COMPONENTS = ("generator", "clip", "caption")
# The guides' models, built only for the benchmarks that keep guides.
GUIDE_COMPONENTS = ("controlnet", "depth_estimator", "ip_adapter")

# open_clip's ViT-L-14 as OpenAI trained it (their weights use QuickGELU).
VIT_L_14: dict[str, Any] = {
    "embed_dim": 768,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
}

# Salesforce/blip-image-captioning-large: a ViT-L/16 at 384 px and a BERT-base-sized decoder.
BLIP_LARGE_TEXT: dict[str, Any] = {
    "vocab_size": 30524,
    "hidden_size": 768,
    "encoder_hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 512,
    "bos_token_id": 30522,
    "pad_token_id": 0,
    "sep_token_id": 102,
    "eos_token_id": 102,
}
BLIP_LARGE_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 16,
    # The library default (1e-10) would leave a random vision tower at zero.
    "initializer_range": 0.02,
}
# BERT's special tokens keep their real ids; [DEC] and [ENC] are BLIP's two additions.
_BLIP_SPECIALS = {
    "[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "[DEC]": 30522, "[ENC]": 30523,
}  # fmt: skip

# CompVis/stable-diffusion-v1-4's component configurations (diffusers' defaults fill in the rest).
SD_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# The safety checker's CLIP ViT-L/14 image tower; its text tower is described but never built.
SD_SAFETY_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
}

# lllyasviel/sd-controlnet-canny and -depth: the SD v1 UNet's encoder half and its conditioning embedding.
SD_CONTROLNET: dict[str, Any] = {
    "in_channels": 4,
    "conditioning_channels": 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
}
# Intel/dpt-hybrid-midas: a ViT-B/16 over a BiT-ResNet stem at 384 px (ControlNet depth's own annotator).
DPT_HYBRID: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "image_size": 384,
    "patch_size": 16,
    "is_hybrid": True,
    "backbone_out_indices": [2, 5, 8, 11],
    "neck_hidden_sizes": [256, 512, 768, 768],
    "reassemble_factors": [4, 2, 1, 0.5],
    "fusion_hidden_size": 256,
    "backbone_featmap_shape": [1, 1024, 24, 24],
    "neck_ignore_stages": [0, 1],
    "readout_type": "project",
}
DPT_HYBRID_BACKBONE: dict[str, Any] = {
    "global_padding": "same",
    "layer_type": "bottleneck",
    "depths": [3, 4, 9],
    "out_features": ["stage1", "stage2", "stage3"],
    "embedding_dynamic_padding": True,
}
# h94/IP-Adapter's models/image_encoder: OpenCLIP ViT-H/14's image tower as a CLIPVisionModelWithProjection.
IP_ADAPTER_ENCODER: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}


@dataclass(frozen=True)
class BenchModels:
    """Where the benchmark's models lie; each is loadable by the production loaders."""

    kind: str  # "smoke" or "random-weights"
    generator: Path
    clip: Path
    caption: Path
    # The guides' models (loaded by guided.load_guide_models); the random-weights edges and depth guides
    # share one folder, each loading its own ControlNet from it.
    edges: Path
    depth: Path
    depth_estimator: Path
    look: Path
    look_weights: str = SMOKE_LOOK_WEIGHTS

    @property
    def random_weights(self) -> bool:
        return self.kind == "random-weights"


def bench_models(
    cache_dir: Path,
    *,
    random_weights: bool,
    components: Iterable[str] = COMPONENTS,
    device: torch.device | None = None,
) -> BenchModels:
    """The smoke models, or the named real architectures with random weights, built once under cache_dir.

    Random weights are initialised on `device` (fast on a GPU) and stored as fp16; building them takes a
    minute or two and ~8 GB of host memory. `components` may name GUIDE_COMPONENTS too; the smoke models
    always have their guides.
    """
    if not random_weights:
        s = ensure_smoke_models(cache_dir)
        return BenchModels(
            "smoke", s.generator, s.clip, s.caption, s.edges, s.depth, s.depth_estimator, s.look
        )
    root = cache_dir / f"random-weights-v{RANDOM_WEIGHTS_VERSION}"
    models = BenchModels(
        "random-weights",
        root / "generator",
        root / "clip",
        root / "caption",
        root / "controlnet",
        root / "controlnet",
        root / "depth-estimator",
        root / "ip-adapter",
    )
    folders = {
        "generator": models.generator,
        "clip": models.clip,
        "caption": models.caption,
        "controlnet": models.edges,
        "depth_estimator": models.depth_estimator,
        "ip_adapter": models.look,
    }
    builders: dict[str, Callable[[Path, torch.device], None]] = {
        "generator": _build_stable_diffusion,
        "clip": _build_vit_l_14,
        "caption": _build_blip_large,
        "controlnet": _build_controlnet,
        "depth_estimator": _build_dpt_hybrid,
        "ip_adapter": _build_ip_adapter,
    }
    for name in components:
        _ensure(folders[name], builders[name], device or torch.device("cpu"))
    return models


def _ensure(directory: Path, build: Callable[[Path, torch.device], None], device: torch.device) -> None:
    """Build into a staging folder and rename it into place, so a half-written model is never used."""
    if (directory / "complete").exists():
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        log.warning("building %s with random weights in %s (once)", directory.name, directory)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            build(staging / "model", device)
        (staging / "model" / "complete").write_text("ok\n")
        if directory.exists():
            shutil.rmtree(directory)
        try:
            os.rename(staging / "model", directory)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (directory / "complete").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_vit_l_14(directory: Path, device: torch.device) -> None:
    import open_clip
    from safetensors.torch import save_model

    directory.mkdir(parents=True)
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": VIT_L_14, "preprocess_cfg": {}}), encoding="utf-8"
    )
    with torch.device(device):
        model = open_clip.CLIP(**VIT_L_14)
    save_model(model.half().cpu(), str(directory / "open_clip_model.safetensors"))


def _build_blip_large(directory: Path, device: torch.device) -> None:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    vocab = _blip_vocab(BLIP_LARGE_TEXT["vocab_size"])
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]", model_max_length=512)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 384, "width": 384}), tokenizer=tokenizer
    )
    config = BlipConfig(text_config=BLIP_LARGE_TEXT, vision_config=BLIP_LARGE_VISION, projection_dim=512)
    with torch.device(device):
        model = BlipForConditionalGeneration(config)
    model.half().cpu().save_pretrained(directory)
    processor.save_pretrained(directory)


def _blip_vocab(size: int) -> dict[str, int]:
    """A tokenizer vocabulary of the model's full size: BERT's special ids, the rest filled with words.

    The filler words are CLIP's most frequent whole words, so a random caption costs CLIP about one token
    per word, as a real one does.
    """
    clip_vocab, _ = clip_tokenizer_vocab()
    words = (t[:-4] for t in clip_vocab if t.endswith("</w>"))
    fillers = (w for w in dict.fromkeys(words) if w.isascii() and w.isalpha() and w.islower())
    ids = sorted(set(range(size)) - set(_BLIP_SPECIALS.values()))
    vocab = dict(_BLIP_SPECIALS)
    for i, word in zip(ids, fillers, strict=False):
        vocab[word] = i
    if len(vocab) != size:
        raise RuntimeError(f"only {len(vocab)} of {size} vocabulary entries could be filled")
    return dict(sorted(vocab.items(), key=lambda item: item[1]))


def _build_stable_diffusion(directory: Path, device: torch.device) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = clip_tokenizer_vocab()
    # The tokenizers backend wants (a, b) pairs, though the annotation says strings.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]
    scheduler = PNDMScheduler(**SD14_SCHEDULER)
    with torch.device(device):
        # Any: diffusers' model classes do not declare nn.Module's half() to type checkers.
        unet: Any = UNet2DConditionModel(**SD_UNET)
        vae: Any = AutoencoderKL(**SD_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD_TEXT))
        safety_checker = StableDiffusionSafetyChecker(
            CLIPConfig(
                text_config={**SD_TEXT, "num_hidden_layers": 1},
                vision_config=SD_SAFETY_VISION,
                projection_dim=768,
            )
        )
    # nn.Module.half rather than the pipeline's .to, which warns about fp16 on a CPU it will never run on.
    pipe: Any = StableDiffusionPipeline(
        vae=vae.half().cpu(),
        text_encoder=text_encoder.half().cpu(),
        tokenizer=tokenizer,
        unet=unet.half().cpu(),
        scheduler=scheduler,
        safety_checker=safety_checker.half().cpu(),
        feature_extractor=CLIPImageProcessor(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
        ),
        requires_safety_checker=True,
    )
    pipe.save_pretrained(directory)


def _build_controlnet(directory: Path, device: torch.device) -> None:
    from diffusers import ControlNetModel

    with torch.device(device):
        controlnet: Any = ControlNetModel(**SD_CONTROLNET)
    controlnet.half().cpu().save_pretrained(directory)


def _build_dpt_hybrid(directory: Path, device: torch.device) -> None:
    from transformers import BitConfig, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    # BitConfig takes out_features through its backbone mixin, which its annotations do not show.
    config = DPTConfig(**DPT_HYBRID, backbone_config=BitConfig(**DPT_HYBRID_BACKBONE))
    with torch.device(device):
        model = DPTForDepthEstimation(config)
    model.half().cpu().save_pretrained(directory)
    # As Intel/dpt-hybrid-midas's: a square 384 px input, which its hybrid embedding requires.
    DPTImageProcessor(size={"height": 384, "width": 384}, keep_aspect_ratio=False).save_pretrained(directory)


def _build_ip_adapter(directory: Path, device: torch.device) -> None:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    # Only the UNet's structure is read: its attention layers and their widths.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD_UNET)
    with torch.device(device):
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**IP_ADAPTER_ENCODER))
    write_ip_adapter(directory, unet, encoder.cpu(), weights_std=0.02, dtype=torch.float16)
