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

    def recorded(self) -> dict[str, str]:
        """Model names as they should be recorded next to results (the smoke models by role alone)."""
        if self.smoke:
            return {key: f"smoke:{key}" for key in self.as_dict()}
        return self.as_dict()


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


# What each loader reads from a Hugging Face repository, and nothing more: the repositories also hold the
# same weights as pickles, fp16 copies, checkpoints for other frameworks or non-EMA weights, which would more
# than double the download. Generator.load calls from_pretrained without variant=: it never reads fp16 files.
GENERATOR_FILES = (
    "model_index.json",
    "*/*.json",  # each component's config, the scheduler's and the tokenizer's files
    "*/*.txt",  # the tokenizer's merges
    "*/diffusion_pytorch_model.safetensors",  # unet, vae
    "*/model.safetensors",  # text_encoder, safety_checker
)
CAPTION_FILES = ("*.json", "*.txt", "model.safetensors", "model-*-of-*.safetensors")
# Read by the loaders only when a repository has no safetensors weights, as some older ones do not.
GENERATOR_PICKLED = ("*/diffusion_pytorch_model.bin", "*/pytorch_model.bin")
CAPTION_PICKLED = ("pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")
# The safety checker's folder (its weights are 1.2 GB): Generator.load passes safety_checker=None when
# generate.safety_checker is off, and diffusers then reads nothing from that folder.
SAFETY_CHECKER_FILES = ("safety_checker/*",)


def download_models(sources: ModelSources, *, safety_checker: bool) -> list[str]:
    """Fetch every configured model into the Hugging Face cache; return a line per model.

    safety_checker is generate.safety_checker: when it is off, the loader never reads the safety checker,
    so it is not fetched either.
    """
    skipped: tuple[str, ...] = () if safety_checker else SAFETY_CHECKER_FILES
    lines = []
    for label, source, files, pickled, ignored in (
        ("generator", sources.generator, GENERATOR_FILES, GENERATOR_PICKLED, skipped),
        ("caption", sources.caption, CAPTION_FILES, CAPTION_PICKLED, ()),
    ):
        if Path(source).expanduser().is_dir():
            lines.append(f"{label}: {source} is a local directory; nothing to download")
            continue
        line = f"{label}: {source} → {_fetch_repository(source, files, pickled, ignored)}"
        if ignored:
            line += " (no safety checker: generate.safety_checker is off)"
        lines.append(line)
    lines.append(_fetch_clip(sources.clip))
    return lines


def _fetch_repository(
    source: str, files: tuple[str, ...], pickled: tuple[str, ...], ignored: tuple[str, ...]
) -> str:
    from huggingface_hub import snapshot_download

    ignore = list(ignored) or None
    path = snapshot_download(source, allow_patterns=list(files), ignore_patterns=ignore)
    weights = [pattern for pattern in files if pattern.endswith(".safetensors")]
    if not any(next(Path(path).glob(pattern), None) for pattern in weights):
        path = snapshot_download(source, allow_patterns=list(pickled), ignore_patterns=ignore)
    return str(path)


def _fetch_clip(source: str) -> str:
    import open_clip

    name, pretrained = open_clip_name(source)
    if name.startswith("local-dir:"):
        return f"clip: {source} is a local directory; nothing to download"
    if pretrained is None:
        # hf-hub:ID: its config names the weights and the tokenizer, so fetch them the way the loader does.
        open_clip.create_model_and_transforms(name, device="cpu")
        open_clip.get_tokenizer(name)
        return f"clip: {source} cached"
    config = open_clip.get_pretrained_cfg(name, pretrained)
    if not config:
        if Path(pretrained).expanduser().is_file():
            return f"clip: {source} is a local file; nothing to download"
        raise ModelUnavailable(f"open_clip knows no pretrained weights {pretrained!r} for {name!r}")
    # The one file create_model_and_transforms reads for this tag (safetensors first), without building it.
    path = open_clip.download_pretrained(config)
    open_clip.get_tokenizer(name)  # packaged for most models; fetched from the Hub for a few (SigLIP)
    return f"clip: {source} → {path}"
