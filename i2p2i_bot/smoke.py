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
SMOKE_VERSION = 5
# The smoke IP-Adapter's weights file, where h94/IP-Adapter keeps ip-adapter_sd15's.
SMOKE_LOOK_WEIGHTS = "models/ip-adapter_sd15.safetensors"
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
    # The ControlNets of the edges and depth guides, made for the tiny generator's UNet.
    edges: Path
    depth: Path
    # The depth guide's depth estimator: a tiny hybrid DPT, the architecture of MiDaS's dpt-hybrid.
    depth_estimator: Path
    # The look guide's IP-Adapter for the tiny UNet, laid out as h94/IP-Adapter: weights and image encoder.
    look: Path
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
        root / "depth",
        root / "depth-estimator",
        root / "look",
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
            _build_controlnet(staging / "depth", pipe.unet)
            _build_depth_estimator(staging / "depth-estimator")
            _build_look(staging / "look", pipe.unet)
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
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextModel

    tokenizer = _tokenizer()
    text_encoder = CLIPTextModel(_text_config())
    unet = _tiny_unet(cross_attention_dim=32, attention_head_dim=4)
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


def _tiny_unet(**family: Any) -> Any:
    """The tiny UNet every smoke generator shares the shape of, with its family's own settings."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        **family,
    )


def _build_sd2(directory: Path) -> None:
    """A tiny SD 2.x: v-prediction in its scheduler config, linear projections, no safety checker."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    unet = _tiny_unet(cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True)
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
    from diffusers import PNDMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = _tiny_unet(
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # The pooled text embedding (32) and six size numbers of 8 each.
        projection_class_embeddings_input_dim=80,
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


def write_smoke_lora(
    generator: Path,
    target: Path,
    *,
    seed: int,
    text_encoder: bool = True,
    unet_layers: bool = True,
    metadata: dict[str, str] | None = None,
    unet: Any | None = None,
) -> Path:
    """A tiny random LoRA for the smoke generator's UNet and text encoder (or either alone), written as
    diffusers writes LoRAs (`save_lora_weights`) to `target` (a .safetensors file); returns target.

    Its up matrices are random rather than zero (as a fresh LoRA's are), so that it changes the images.
    `metadata` is added to the file's header, as trainers add theirs. `unet` replaces the smoke UNet: a
    LoRA made for another UNet is one of another family.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: dict[str, Any] = {}
        if unet_layers:
            model = unet or UNet2DConditionModel.from_pretrained(generator / "unet")
            model.add_adapter(
                LoraConfig(
                    r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]
                )
            )
            layers["unet_lora_layers"] = get_peft_model_state_dict(model)
        if text_encoder:
            encoder = CLIPTextModel.from_pretrained(generator / "text_encoder")
            encoder.add_adapter(
                LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
            )
            layers["text_encoder_lora_layers"] = get_peft_model_state_dict(encoder)
    target.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(target.parent, weight_name=target.name, **layers)
    if metadata:
        from safetensors import safe_open

        with safe_open(str(target), framework="pt") as file:
            header = dict(file.metadata() or {})
        save_file(load_file(str(target)), str(target), metadata={**header, **metadata})
    return target


def _build_depth_estimator(directory: Path) -> None:
    """A tiny DPTForDepthEstimation with a BiT backbone (the hybrid of Intel/dpt-hybrid-midas) and its
    image processor, saved as the Hub's are."""
    from transformers import BitConfig, DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=64,
        patch_size=16,
        is_hybrid=True,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 32, 32],
        reassemble_factors=[4, 2, 1, 0.5],
        fusion_hidden_size=16,
        backbone_featmap_shape=[1, 32, 4, 4],
        neck_ignore_stages=[0, 1],
        readout_type="project",
        # BitConfig takes out_features through its backbone mixin, which its annotations do not show.
        backbone_config=BitConfig(  # type: ignore[call-arg]
            global_padding="same",
            layer_type="bottleneck",
            depths=[1, 1, 1],
            hidden_sizes=[8, 16, 32],
            embedding_size=8,
            num_groups=4,
            embedding_dynamic_padding=True,
            out_features=["stage1", "stage2", "stage3"],
        ),
    )
    DPTForDepthEstimation(config).save_pretrained(directory)
    # As Intel/dpt-hybrid-midas's: a square input, which its hybrid embedding requires.
    processor = DPTImageProcessor(size={"height": 64, "width": 64}, keep_aspect_ratio=False)
    processor.save_pretrained(directory)


def _build_look(directory: Path, unet: Any) -> None:
    """An IP-Adapter for the tiny UNet with a tiny image encoder; its projections are large, so that the
    guide's effect shows through the tiny random UNet."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        )
    )
    write_ip_adapter(directory, unet, encoder, weights_std=2.0)


def write_ip_adapter(
    directory: Path, unet: Any, encoder: Any, *, weights_std: float, dtype: torch.dtype = torch.float32
) -> None:
    """A random IP-Adapter for `unet` in the file layout diffusers' load_ip_adapter reads (h94/IP-Adapter's):
    `encoder` (a CLIPVisionModelWithProjection) in models/image_encoder, the weights in
    models/ip-adapter_sd15.safetensors.

    The weights are those of diffusers' own ImageProjection and of one key and value projection per
    cross-attention layer, named as IP-Adapter's checkpoints name them: `image_proj.*`, and
    `ip_adapter.{1,3,5...}.to_{k,v}_ip.weight` in the UNet's order of attention processors. `unet` may
    live on the meta device: only its structure is read.
    """
    from diffusers.models.embeddings import ImageProjection
    from safetensors.torch import save_file

    embed_dim = encoder.config.projection_dim
    cross_dim = unet.config.cross_attention_dim
    encoder.to(dtype).save_pretrained(directory / "models" / "image_encoder")
    projection = ImageProjection(
        image_embed_dim=embed_dim, cross_attention_dim=cross_dim, num_image_text_embeds=4
    )
    tensors = {
        f"image_proj.{key.replace('image_embeds', 'proj')}": value.to(dtype).contiguous()
        for key, value in projection.state_dict().items()
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for which in ("to_k_ip", "to_v_ip"):
            weight = torch.randn(hidden, cross_dim) * weights_std
            tensors[f"ip_adapter.{key_id}.{which}.weight"] = weight.to(dtype)
        key_id += 2
    save_file(tensors, str(directory / SMOKE_LOOK_WEIGHTS))
