"""An SD 1.x pipeline's weights in the original single-file layout (CompVis's, which A1111 users download).

The inverse of diffusers' own conversion (diffusers/loaders/single_file_utils.py: convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint), so that the smoke preset can write a checkpoint
that `from_single_file` reads back through the same code that reads members' downloads.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def original_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """The UNet, VAE and text encoder of an SD 1.x pipeline under their original names."""
    unet_config = pipe.unet.config
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in pipe.unet.state_dict().items():
        weights["model.diffusion_model." + _unet_name(name, unet_config)] = tensor
    blocks = len(pipe.vae.config.up_block_types)
    for name, tensor in pipe.vae.state_dict().items():
        original, conv = _vae_name(name, blocks)
        weights["first_stage_model." + original] = tensor[:, :, None, None] if conv else tensor
    for name, tensor in pipe.text_encoder.state_dict().items():
        # transformers 5.6 flattened CLIPTextModel; the original names keep its text_model level.
        inner = name if name.startswith("text_model.") else "text_model." + name
        weights["cond_stage_model.transformer." + inner] = tensor
    return {name: tensor.contiguous() for name, tensor in weights.items()}


def _unet_name(name: str, config: Any) -> str:
    per_block = int(config.layers_per_block) + 1  # input blocks per down block: resnets and a downsampler
    module, _, leaf = name.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{leaf}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_block + layer
        if kind == "resnets":
            return f"input_blocks.{index}.0.{_resnet(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{(int(m[1]) + 1) * per_block}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", name):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_block + layer
        if kind == "resnets":
            return f"output_blocks.{index}.0.{_resnet(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
        block = int(m[1])
        has_attention = "CrossAttn" in config.up_block_types[block]
        return f"output_blocks.{block * per_block + per_block - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise ValueError(f"no original name for UNet weight {name}")


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def _vae_name(name: str, blocks: int) -> tuple[str, bool]:
    """The original name of a VAE weight, and whether it was a 1x1 convolution there."""
    part, _, rest = name.partition(".")  # encoder, decoder, quant_conv, post_quant_conv
    module, _, leaf = rest.rpartition(".")
    if module in _VAE_TOP:
        return f"{part}.{_VAE_TOP[module]}.{leaf}", False
    if m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        block = int(m[2]) if m[1] == "down" else blocks - 1 - int(m[2])
        tail = m[4].replace("conv_shortcut", "nin_shortcut")
        return f"{part}.{m[1]}.{block}.block.{m[3]}.{tail}", False
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.(.*)", rest):
        return f"{part}.down.{m[1]}.downsample.{m[2]}", False
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest):
        return f"{part}.up.{blocks - 1 - int(m[1])}.upsample.{m[2]}", False
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{part}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}", False
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
        tail = m[1]
        for new, old in _VAE_ATTENTION:
            if tail.startswith(new + "."):
                tail = old + tail[len(new) :]
                break
        return f"{part}.mid.attn_1.{tail}", tail.endswith(".weight") and not tail.startswith("norm")
    return name, False
