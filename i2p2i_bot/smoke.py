"""Tiny random models of the real classes, for checking an install and for tests.

They are written with the libraries' own savers and loaded back through the same loaders as the real
weights, so everything but the numbers is exercised. Their images are noise and their prompts nonsense.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Bump when the tiny architectures change, so old caches are rebuilt instead of half-matching.
SMOKE_VERSION = 3
SMOKE_WARNING = (
    "Using the smoke models: tiny random networks, so the images are noise and the prompts nonsense."
)

# Words for the tiny caption model's vocabulary, so its random captions are at least made of words.
_CAPTION_WORDS = (
    "a an the of with on in and at by near under over photo picture painting drawing image view close up "
    "man woman child dog cat bird horse tree trees flower flowers house city street road car boat river lake "
    "sea beach mountain mountains sky cloud clouds sun moon night day snow rain forest field garden room "
    "table chair window door wall book cup plate food bread fruit apple orange red blue green yellow black "
    "white brown grey pink purple small large old young tall short happy sitting standing walking running "
    "holding looking wearing hat shirt dress coat glasses astronaut space rocket suit flag helmet coffee "
    "cake kitten painting portrait landscape statue bridge tower castle church train plane bicycle"
).split()


# The scheduler settings of CompVis/stable-diffusion-v1-4, shared by every pipeline we build ourselves.
SD14_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


@dataclass(frozen=True)
class SmokeModels:
    """Directories of the tiny models, each loadable by the production loaders."""

    generator: Path
    clip: Path
    caption: Path
    # The ControlNet of the edges guide, made for the tiny generator's UNet.
    edges: Path
    # The other families, each loaded as its real models are: an SD 2.x (v-prediction, no safety checker)
    # with its own, wider CLIP for interrogation; an SDXL; and the SD 1.x generator as one single-file
    # checkpoint in the original layout, read with the SD 1.x folder as its config.
    sd2: Path
    sd2_clip: Path
    sdxl: Path
    single_file: Path


def ensure_smoke_models(cache_dir: Path) -> SmokeModels:
    """Build the tiny models under cache_dir once; later calls reuse them."""
    root = cache_dir / f"smoke-v{SMOKE_VERSION}"
    models = SmokeModels(
        root / "generator",
        root / "clip",
        root / "caption",
        root / "edges",
        root / "sd2",
        root / "sd2-clip",
        root / "sdxl",
        root / "sd1-single-file.safetensors",
    )
    if (root / "complete").exists():
        return models
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smoke-", dir=cache_dir))
    try:
        log.info("building smoke models in %s", root)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _build_clip(staging / "clip")
            _build_caption(staging / "caption")
            pipe = _build_generator(staging / "generator")
            _build_controlnet(staging / "edges", pipe.unet)
            _build_single_file(staging / models.single_file.name, pipe)
            _build_clip(staging / "sd2-clip", width=48)
            _build_sd2(staging / "sd2")
            _build_sdxl(staging / "sdxl")
        (staging / "complete").write_text("ok\n")
        try:
            os.rename(staging, root)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (root / "complete").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return models


def clip_tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's real BPE vocabulary and merges, from the copy shipped in open_clip's wheel."""
    import open_clip.tokenizer as oc_tok

    byte_values = list(oc_tok.bytes_to_unicode().values())
    with gzip.open(oc_tok.default_bpe()) as f:
        merges_text = f.read().decode("utf-8").split("\n")
    merges = [(a, b) for a, b in (m.split() for m in merges_text[1 : 49152 - 256 - 2 + 1])]
    tokens = byte_values + [v + "</w>" for v in byte_values] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _build_clip(directory: Path, width: int = 32) -> None:
    import open_clip
    from safetensors.torch import save_model

    model_cfg = {
        "embed_dim": width,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": width, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width, "heads": 2, "layers": 2},
    }
    directory.mkdir(parents=True)
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}), encoding="utf-8"
    )
    model = open_clip.CLIP(**model_cfg)
    save_model(model, str(directory / "open_clip_model.safetensors"))


def _build_caption(directory: Path) -> None:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    directory.mkdir(parents=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = specials + sorted(set(_CAPTION_WORDS))
    tokenizer = BertTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        do_lower_case=True,
        bos_token="[DEC]",
        model_max_length=512,
    )
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 64, "width": 64}), tokenizer=tokenizer
    )
    config = BlipConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "encoder_hidden_size": 32,
            "max_position_embeddings": 64,
            "bos_token_id": vocab.index("[DEC]"),
            "pad_token_id": vocab.index("[PAD]"),
            "sep_token_id": vocab.index("[SEP]"),
            "eos_token_id": vocab.index("[SEP]"),
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 64,
            "patch_size": 16,
        },
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def _tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = clip_tokenizer_vocab()
    # The tokenizers backend wants (a, b) pairs, though the annotation says strings.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def _text_config(**changes: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        **{
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
            **changes,
        }
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # Four blocks, like SD's VAE, so latents are 1/8 of the image side as with the real model.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )


def _build_generator(directory: Path) -> Any:
    """The tiny Stable Diffusion pipeline, saved and returned (the tiny ControlNet copies its UNet)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextModel

    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(_text_config())
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = _vae()
    scheduler = PNDMScheduler(**SD14_SCHEDULER)
    safety_checker = StableDiffusionSafetyChecker(
        CLIPConfig(
            text_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "vocab_size": 1000,
                "bos_token_id": 0,
                "eos_token_id": 2,
                "pad_token_id": 1,
            },
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 8,
            },
            projection_dim=32,
        )
    )
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=True,
    )
    pipe.save_pretrained(directory)
    return pipe


def _build_single_file(path: Path, pipe: Any) -> None:
    """The SD 1.x pipeline's weights as one file in the original layout, as checkpoints are shared."""
    from safetensors.torch import save_file

    from i2p2i_bot.checkpoint_layout import original_state_dict

    save_file(original_state_dict(pipe), str(path))


def _build_sd2(directory: Path) -> None:
    """A tiny SD 2.x: v-prediction in its scheduler config, linear projections, no safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    pipe: Any = StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(hidden_size=48, hidden_act="gelu")),
        tokenizer=_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler(**SD14_SCHEDULER, prediction_type="v_prediction"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)


def _build_sdxl(directory: Path) -> None:
    """A tiny SDXL: two text encoders (the second with a projection), size and crop conditioning."""
    from diffusers import PNDMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # The pooled text embedding (32) and six size numbers of 8 each.
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    pipe: Any = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config()),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=32)),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(),
        unet=unet,
        scheduler=PNDMScheduler(**SD14_SCHEDULER),
    )
    pipe.save_pretrained(directory)


def _build_controlnet(directory: Path, unet: Any) -> None:
    """A ControlNet made from the tiny UNet, as ControlNet training starts, saved as the Hub's are.

    A new ControlNet's output convolutions start at zero, so that it changes nothing until trained; the
    smoke one's are random, so that the edges guide has an effect the tests can see. Its control image
    embedding has no biases and a large last convolution, so that what it adds depends on the control
    image (each member's own) rather than being the same for every image.
    """
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet)
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        torch.nn.init.normal_(conv.weight, std=0.3)
        torch.nn.init.zeros_(conv.bias)
    embedding = controlnet.controlnet_cond_embedding
    for module in embedding.modules():
        if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)
    torch.nn.init.normal_(embedding.conv_out.weight, std=50.0)
    controlnet.save_pretrained(directory)
