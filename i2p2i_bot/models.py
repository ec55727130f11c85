"""Where the weights come from: the configured models or the smoke preset, and prefetching them."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from i2p2i_bot.config import Settings
from i2p2i_bot.smoke import SMOKE_WARNING, ensure_smoke_models

log = logging.getLogger(__name__)


class ModelUnavailable(Exception):
    """A model cannot be loaded (not downloaded, wrong path); the message says what to do."""


@dataclass(frozen=True)
class ModelSources:
    """Concrete model references: hub ids, `ARCH/TAG` for open_clip, or local directories."""

    generator: str
    clip: str
    caption: str
    smoke: bool = False

    def as_dict(self) -> dict[str, str]:
        return {"generator": self.generator, "clip": self.clip, "caption": self.caption}


def resolve_models(settings: Settings) -> ModelSources:
    """Turn the models settings into sources; the smoke preset builds its tiny models on first use."""
    if settings.models.preset == "smoke":
        log.warning(SMOKE_WARNING)
        smoke = ensure_smoke_models(settings.cache_path)
        return ModelSources(str(smoke.generator), str(smoke.clip), str(smoke.caption), smoke=True)
    m = settings.models
    return ModelSources(m.generator, m.clip, m.caption)


def open_clip_name(source: str) -> tuple[str, str | None]:
    """Split a CLIP source into open_clip's (model_name, pretrained) arguments."""
    if source.startswith(("local-dir:", "hf-hub:")):
        return source, None
    if Path(source).expanduser().is_dir():
        return f"local-dir:{Path(source).expanduser()}", None
    arch, sep, tag = source.partition("/")
    if not sep or not tag:
        raise ModelUnavailable(
            f"CLIP model {source!r} must be ARCH/PRETRAINED (like ViT-L-14/openai), hf-hub:ID or a directory"
        )
    return arch, tag


def download_models(sources: ModelSources) -> list[str]:
    """Fetch every configured model into the Hugging Face cache; return a line per model."""
    import open_clip
    from huggingface_hub import snapshot_download

    lines = []
    for label, source in (("generator", sources.generator), ("caption", sources.caption)):
        if Path(source).expanduser().is_dir():
            lines.append(f"{label}: {source} is a local directory; nothing to download")
            continue
        path = snapshot_download(
            source, allow_patterns=_generator_patterns() if label == "generator" else None
        )
        lines.append(f"{label}: {source} → {path}")
    name, pretrained = open_clip_name(sources.clip)
    if pretrained is None:
        lines.append(f"clip: {sources.clip} needs no download")
    else:
        open_clip.create_model_and_transforms(name, pretrained=pretrained, device="cpu")
        lines.append(f"clip: {sources.clip} cached")
    return lines


def _generator_patterns() -> list[str]:
    # Only what StableDiffusionPipeline loads: skip the duplicate .ckpt and the non-EMA / flax weights.
    return [
        "model_index.json",
        "*/config.json",
        "*/*.json",
        "*/*.txt",
        "*/diffusion_pytorch_model.safetensors",
        "*/model.safetensors",
        "*/diffusion_pytorch_model.fp16.safetensors",
        "*/model.fp16.safetensors",
    ]
