"""Where the weights come from: the configured models or the smoke preset, prefetching them, and finding
them on this machine.

Only download_models reaches the Hugging Face Hub. The loaders read what it fetched through the locators
below, which look in the local cache alone, whatever HF_HUB_OFFLINE says.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from i2p2i_bot.config import BUILTIN_PRESET, PresetSettings, Settings
from i2p2i_bot.guides import GUIDE_KINDS, GUIDE_NAMES, GuideName
from i2p2i_bot.presets import Preset, Presets, detect_family, preset_from_settings
from i2p2i_bot.smoke import SMOKE_LOOK_WEIGHTS, SMOKE_WARNING, SmokeModels, ensure_smoke_models

log = logging.getLogger(__name__)


class ModelUnavailable(Exception):
    """A model cannot be loaded (not downloaded, wrong path); the message says what to do."""


class ModelNotDownloaded(ModelUnavailable):
    """Models named by a Hub id are not (or only partly) in the Hugging Face cache."""

    def __init__(self, *missing: str) -> None:
        self.missing = missing
        super().__init__(f"Not downloaded: {', '.join(missing)}; run `i2p2i download-models`")


@dataclass(frozen=True)
class ModelSources:
    """Concrete model references: hub ids, `ARCH/TAG` for open_clip, or local directories."""

    generator: str
    clip: str
    caption: str
    smoke: bool = False
    # The edges guide's ControlNet; None when [guides] does not enable edges.
    edges: str | None = None
    # The depth guide's ControlNet and depth estimator; None when [guides] does not enable depth.
    depth: str | None = None
    depth_estimator: str | None = None
    # The look guide's IP-Adapter (a repository or folder) and its weights file in there; None when
    # [guides] does not enable look.
    look: str | None = None
    look_weights: str | None = None
    # How results record a smoke CLIP (the smoke models have two); "" for "smoke:clip".
    recorded_clip: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"generator": self.generator, "clip": self.clip, "caption": self.caption}

    def recorded(self) -> dict[str, str]:
        """Model names as they should be recorded next to results (the smoke models by role alone)."""
        if self.smoke:
            return {key: f"smoke:{key}" for key in self.as_dict()} | {
                "clip": self.recorded_clip or "smoke:clip"
            }
        return self.as_dict()

    def recorded_guide(self, role: str, source: str) -> str:
        """A guide's model name as results record it (a smoke one by role alone)."""
        return f"smoke:{role}" if self.smoke else source


def resolve_models(settings: Settings) -> ModelSources:
    """The default preset's models as sources; the smoke preset builds its tiny models on first use."""
    return preset_sources(settings, resolve_presets(settings).get(None))


def preset_sources(settings: Settings, preset: Preset) -> ModelSources:
    """The models a preset's cards and images are made with: its generator, its CLIP, the caption model,
    and the guides' weights where they fit its family (SD 1.x alone)."""
    g = settings.guides
    edges, depth, look = (
        name in g.enabled and GUIDE_KINDS[name].fits(preset.family) for name in ("edges", "depth", "look")
    )
    if preset.smoke:
        smoke = ensure_smoke_models(settings.cache_path)
        return ModelSources(
            preset.generator,
            preset.clip,
            str(smoke.caption),
            smoke=True,
            edges=str(smoke.edges) if edges else None,
            depth=str(smoke.depth) if depth else None,
            depth_estimator=str(smoke.depth_estimator) if depth else None,
            look=str(smoke.look) if look else None,
            look_weights=SMOKE_LOOK_WEIGHTS if look else None,
            recorded_clip=_smoke_role(smoke, preset.clip),
        )
    m = settings.models
    return ModelSources(
        preset.generator,
        preset.clip,
        m.caption,
        edges=g.edges_model if edges else None,
        depth=g.depth_model if depth else None,
        depth_estimator=g.depth_estimator if depth else None,
        look=g.look_model if look else None,
        look_weights=g.look_weights if look else None,
    )


def guide_weights_here(settings: Settings, presets: Presets) -> tuple[GuideName, ...]:
    """The enabled guides a generator of this bot can keep once loaded: layout, and those whose weights
    are on this machine (found, not loaded) where a preset they fit is configured."""
    here = {"layout"} if "layout" in settings.guides.enabled else set()
    for preset in presets:
        s = preset_sources(settings, preset)
        wanted: dict[str, list[Callable[[], object]]] = {}
        if s.edges:
            wanted["edges"] = [functools.partial(controlnet_folder, s.edges)]
        if s.depth and s.depth_estimator:
            wanted["depth"] = [
                functools.partial(controlnet_folder, s.depth),
                functools.partial(depth_estimator_folder, s.depth_estimator),
            ]
        if s.look and s.look_weights:
            wanted["look"] = [functools.partial(look_folder, s.look, s.look_weights)]
        if not wanted:
            continue  # a family they do not fit: every preset they fit names the same weights
        for name, locators in wanted.items():
            try:
                for locate in locators:
                    locate()
            except ModelUnavailable:
                continue
            here.add(name)
        break
    return tuple(name for name in GUIDE_NAMES if name in here)


def resolve_presets(settings: Settings) -> Presets:
    """Every preset of this bot: the built-in sd-v1-4 (models.generator and models.clip) and
    [[models.presets]]; with the smoke models, tiny ones of each family instead of the real weights."""
    m = settings.models
    entries = [
        PresetSettings(name=BUILTIN_PRESET, generator=m.generator, clip=m.clip),
        *m.presets,
    ]
    smoke: SmokeModels | None = None
    if m.preset == "smoke":
        _warn_smoke()
        smoke = ensure_smoke_models(settings.cache_path)
        # Every family at [generate]'s size: the tiny models check an install, quickly.
        side = min(settings.generate.width, settings.generate.height)
        entries = [
            PresetSettings(name=BUILTIN_PRESET, generator=str(smoke.generator), clip=str(smoke.clip)),
            PresetSettings(name="sd2", generator=str(smoke.sd2), clip=str(smoke.sd2_clip), size=side),
            PresetSettings(name="sdxl", generator=str(smoke.sdxl), clip=str(smoke.clip), size=side),
            PresetSettings(
                name="sd1-file",
                generator=str(smoke.single_file),
                clip=str(smoke.clip),
                config=str(smoke.generator),
            ),
            *(p for p in m.presets if p.name not in ("sd2", "sdxl", "sd1-file")),
        ]
    by_name: dict[str, Preset] = {}
    for entry in entries:
        # A configured preset named like a built-in one replaces it.
        clip = None
        if smoke is not None:
            family = entry.family or detect_family(entry.generator)
            clip = str(smoke.sd2_clip if family == "sd2" else smoke.clip)
        by_name[entry.name] = preset_from_settings(
            entry, settings.generate, clip=clip, smoke=smoke is not None
        )
    return Presets(by_name, m.default_preset)


@functools.cache
def _warn_smoke() -> None:
    log.warning(SMOKE_WARNING)


def _smoke_role(smoke: SmokeModels, clip: str) -> str:
    """How results record a smoke CLIP: by its role, each CLIP its own (their embeddings differ)."""
    return "smoke:sd2-clip" if clip == str(smoke.sd2_clip) else "smoke:clip"


def quick_gelu_name(source: str) -> str:
    """open_clip's name for ARCH/TAG built with QuickGELU (ARCH-quickgelu/TAG), as results record it."""
    arch, sep, tag = source.partition("/")
    if not sep or arch.endswith("-quickgelu") or source.startswith(("local-dir:", "hf-hub:")):
        return source
    return f"{arch}-quickgelu/{tag}"


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
# A ControlNet's repository (lllyasviel/sd-controlnet-canny) also holds example images and a pickled copy.
CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
CONTROLNET_PICKLED = ("diffusion_pytorch_model.bin",)
# A depth estimator's config, its image processor's and its weights (Intel/dpt-hybrid-midas also holds a
# pickled copy; some older repositories only that).
DEPTH_ESTIMATOR_FILES = ("config.json", "preprocessor_config.json", "model.safetensors")
DEPTH_ESTIMATOR_PICKLED = ("pytorch_model.bin",)
# Where diffusers' load_ip_adapter reads an IP-Adapter's image encoder: image_encoder beside the weights.
IMAGE_ENCODER_FOLDER = "image_encoder"


def look_files(weights: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What the look guide reads of an IP-Adapter repository (h94/IP-Adapter holds adapters for several
    model families and their pickled copies): its weights file and its image encoder, and the pickled
    copies to read where safetensors are missing."""
    folder, _, name = weights.rpartition("/")
    encoder = f"{folder}/{IMAGE_ENCODER_FOLDER}" if folder else IMAGE_ENCODER_FOLDER
    stem = name.rsplit(".", 1)[0]
    pickled_weights = f"{folder}/{stem}.bin" if folder else f"{stem}.bin"
    return (
        (weights, f"{encoder}/config.json", f"{encoder}/model.safetensors"),
        (pickled_weights, f"{encoder}/config.json", f"{encoder}/pytorch_model.bin"),
    )


# The safety checker's folder (its weights are 1.2 GB): Generator.load passes safety_checker=None when
# generate.safety_checker is off, and diffusers then reads nothing from that folder.
SAFETY_CHECKER_FILES = ("safety_checker/*",)


# What a single-file generator needs of its config repository: every config and tokenizer, no weights but
# the safety checker's (a checkpoint has none of its own).
SINGLE_FILE_CONFIG_FILES = ("model_index.json", "*/*.json", "*/*.txt")
SINGLE_FILE_SAFETY_CHECKER = ("safety_checker/model.safetensors",)


def download_models(
    sources: ModelSources,
    *,
    safety_checker: bool,
    presets: Presets | None = None,
    describe_only: bool = False,
) -> list[str]:
    """Fetch every configured model into the Hugging Face cache; return a line per model.

    safety_checker is generate.safety_checker: when it is off, the loader never reads the safety checker,
    so it is not fetched either. A guide's weights are fetched only when [guides] enables it. With
    `presets`, every preset's generator and CLIP are fetched too (a single file must be on this machine;
    its config repository is fetched). `describe_only` fetches what a bot whose images GPU workers make
    loads (queue.backend "redis"): the caption model and every preset's CLIP, no generator and no guide.
    """
    skipped: tuple[str, ...] = () if safety_checker else SAFETY_CHECKER_FILES
    lines = []
    caption = ("caption", sources.caption, CAPTION_FILES, CAPTION_PICKLED, ())
    if describe_only:
        clips = list(dict.fromkeys([sources.clip, *(preset.clip for preset in presets or ())]))
        return [_fetched(*caption), *(_fetch_clip(clip) for clip in clips)]
    fetched = [("generator", sources.generator, GENERATOR_FILES, GENERATOR_PICKLED, skipped), caption]
    if sources.edges is not None:
        fetched.append(("edges", sources.edges, CONTROLNET_FILES, CONTROLNET_PICKLED, ()))
    if sources.depth is not None:
        fetched.append(("depth", sources.depth, CONTROLNET_FILES, CONTROLNET_PICKLED, ()))
    if sources.depth_estimator is not None:
        fetched.append(
            ("depth estimator", sources.depth_estimator, DEPTH_ESTIMATOR_FILES, DEPTH_ESTIMATOR_PICKLED, ())
        )
    if sources.look is not None and sources.look_weights is not None:
        fetched.append(("look", sources.look, *look_files(sources.look_weights), ()))
    clips = [sources.clip]
    for preset in presets or ():
        if preset.generator == sources.generator and preset.clip == sources.clip:
            continue
        label = f"preset {preset.name}"
        if preset.single_file:
            if not Path(preset.generator).expanduser().is_file():
                lines.append(f"{label}: {preset.generator} is not a file here; copy it to this machine")
            config_files = SINGLE_FILE_CONFIG_FILES + (SINGLE_FILE_SAFETY_CHECKER if safety_checker else ())
            fetched.append((f"{label} config", preset.config, config_files, (), ()))
        elif preset.generator != sources.generator:
            fetched.append((label, preset.generator, GENERATOR_FILES, GENERATOR_PICKLED, skipped))
        if preset.clip not in clips:
            clips.append(preset.clip)
    lines.extend(_fetched(*entry) for entry in fetched)
    lines.extend(_fetch_clip(clip) for clip in clips)
    return lines


def _fetched(
    label: str, source: str, files: tuple[str, ...], pickled: tuple[str, ...], ignored: tuple[str, ...]
) -> str:
    """One repository fetched into the Hugging Face cache, as download-models reports it."""
    if Path(source).expanduser().is_dir():
        return f"{label}: {source} is a local directory; nothing to download"
    line = f"{label}: {source} → {_repository_snapshot(source, files, pickled, ignored)}"
    if ignored:
        line += " (no safety checker: generate.safety_checker is off)"
    return line


def _repository_snapshot(
    source: str,
    files: tuple[str, ...],
    pickled: tuple[str, ...],
    ignored: tuple[str, ...],
    *,
    local_files_only: bool = False,
) -> str:
    from huggingface_hub import snapshot_download

    ignore = list(ignored) or None
    path = snapshot_download(
        source, allow_patterns=list(files), ignore_patterns=ignore, local_files_only=local_files_only
    )
    weights = [pattern for pattern in files if pattern.endswith(".safetensors")]
    if pickled and not any(next(Path(path).glob(pattern), None) for pattern in weights):
        path = snapshot_download(
            source, allow_patterns=list(pickled), ignore_patterns=ignore, local_files_only=local_files_only
        )
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


# --- finding the weights on this machine ----------------------------------------------------------------
#
# The loaders are handed folders and files, never Hub ids. Given an id, diffusers, transformers and open_clip
# ask the Hub for its latest revision first (retrying for most of a minute where there is no network); even
# with local_files_only=True, huggingface_hub's file lookup sends a request of its own (for a list it uses to
# build its User-Agent header). Listing a cached snapshot and try_to_load_from_cache send nothing.


def generator_folder(source: str, *, safety_checker: bool) -> str:
    """The folder Generator.load reads: source itself, or what download_models put in the cache for it."""
    ignored = () if safety_checker else SAFETY_CHECKER_FILES
    return _cached_repository("Stable Diffusion", source, GENERATOR_FILES, GENERATOR_PICKLED, ignored)


def single_file_config_folder(config: str, *, safety_checker: bool) -> str:
    """The folder of configs a single-file generator is read with: config itself, or its cached copy."""
    files = SINGLE_FILE_CONFIG_FILES + (SINGLE_FILE_SAFETY_CHECKER if safety_checker else ())
    return _cached_repository("Stable Diffusion config", config, files, (), ())


def generator_file(source: str) -> str:
    """A single-file generator, which must be on this machine (download-models fetches repositories)."""
    path = Path(source).expanduser()
    if not path.is_file():
        raise ModelUnavailable(f"The checkpoint {source} is not a file on this machine")
    return str(path)


def controlnet_folder(source: str) -> str:
    """The folder a guide's ControlNet is read from: source itself, or what download_models cached."""
    return _cached_repository("ControlNet", source, CONTROLNET_FILES, CONTROLNET_PICKLED, ())


def depth_estimator_folder(source: str) -> str:
    """The folder the depth guide's depth estimator is read from: source itself, or what download_models
    cached."""
    return _cached_repository("Depth estimator", source, DEPTH_ESTIMATOR_FILES, DEPTH_ESTIMATOR_PICKLED, ())


def look_folder(source: str, weights: str) -> str:
    """The folder the look guide's IP-Adapter is read from: source itself, or what download_models
    cached."""
    return _cached_repository("IP-Adapter", source, *look_files(weights), ())


def caption_folder(source: str) -> str:
    """The folder Captioner.load reads: source itself, or what download_models put in the cache for it."""
    return _cached_repository("BLIP", source, CAPTION_FILES, CAPTION_PICKLED, ())


def _cached_repository(
    label: str, source: str, files: tuple[str, ...], pickled: tuple[str, ...], ignored: tuple[str, ...]
) -> str:
    folder = Path(source).expanduser()
    if folder.is_dir():
        return str(folder)
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        # The same files download_models fetches; the cached listing of the repository says whether all
        # of them are here.
        return _repository_snapshot(source, files, pickled, ignored, local_files_only=True)
    except IncompleteSnapshotError as exc:
        raise ModelNotDownloaded(f"{label} {source} (in part)") from exc
    except LocalEntryNotFoundError as exc:
        raise ModelNotDownloaded(f"{label} {source}") from exc
    except HFValidationError as exc:
        raise ModelUnavailable(
            f"{label} model {source!r} is neither a folder nor a Hugging Face model id"
        ) from exc


@dataclass(frozen=True)
class ClipFiles:
    """open_clip's arguments for a CLIP source, with every file on this machine."""

    model_name: str  # an architecture, or local-dir:FOLDER
    pretrained: str | None = None  # the weights file, with an architecture
    # A pretrained tag's preprocessing, which open_clip applies by itself only when it is handed the tag.
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    image_interpolation: str | None = None
    image_resize_mode: str | None = None
    # Weights trained with QuickGELU (OpenAI's): open_clip 3 only warns when an architecture without it
    # loads them, and the embeddings come out wrong, so the tag's choice is forced.
    quick_gelu: bool = False
    # The folder of the Hugging Face tokenizer the model's config names, and that config's text part.
    hf_tokenizer: str | None = None
    text_cfg: Mapping[str, Any] = field(default_factory=dict)

    def tokenizer(self) -> Any:
        """open_clip's tokenizer for this model, read from local files alone."""
        import open_clip

        if self.hf_tokenizer is None:
            return open_clip.get_tokenizer(self.model_name)
        from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

        # What get_tokenizer builds for such a config, from the cached folder instead of the Hub id.
        return HFTokenizer(
            self.hf_tokenizer,
            context_length=self.text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
            tokenizer_mode=self.text_cfg.get("tokenizer_mode"),
            **self.text_cfg.get("tokenizer_kwargs", {}),
        )


def clip_files(source: str) -> ClipFiles:
    """What ClipEncoder.load reads for a CLIP source: a folder, a file, or what download_models cached."""
    from huggingface_hub.errors import HFValidationError

    name, pretrained = open_clip_name(source)
    if name.startswith("local-dir:"):
        return ClipFiles(name)
    label = f"CLIP {source}"
    try:
        if pretrained is None:
            return _cached_hub_clip(label, name.removeprefix("hf-hub:"))
        return _cached_pretrained_clip(label, name, pretrained)
    except HFValidationError as exc:
        raise ModelUnavailable(f"CLIP model {source!r} names no valid Hugging Face model id") from exc


def _cached_hub_clip(label: str, repo: str) -> ClipFiles:
    """hf-hub:ID: its snapshot folder holds the config and the weights, as a local-dir: source does."""
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    config = _cached_file(repo, HF_CONFIG_NAME)
    weights = (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME)
    if config is None or not any((config.parent / name).is_file() for name in weights):
        raise ModelNotDownloaded(label)
    text_cfg = json.loads(config.read_text(encoding="utf-8")).get("model_cfg", {}).get("text_cfg", {})
    return ClipFiles(f"local-dir:{config.parent}", **_tokenizer_files(label, text_cfg))


def _cached_pretrained_clip(label: str, name: str, pretrained: str) -> ClipFiles:
    """ARCH/TAG: the weights file open_clip would fetch for the tag, and the tag's preprocessing."""
    import open_clip
    from open_clip.constants import HF_WEIGHTS_NAME

    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ModelUnavailable(f"open_clip knows no model {name!r}")
    text_cfg = model_cfg.get("text_cfg", {})
    tag = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag:
        weights = Path(pretrained).expanduser()
        if not weights.is_file():
            raise ModelUnavailable(f"open_clip knows no pretrained weights {pretrained!r} for {name!r}")
        return ClipFiles(name, str(weights), **_tokenizer_files(label, text_cfg))
    if not tag.get("hf_hub"):
        raise ModelUnavailable(f"{label}: open_clip has these weights only at a URL; give the file instead")
    # Named as open_clip.download_pretrained names it, which is what download_models fetched.
    repo, filename = os.path.split(tag["hf_hub"])
    found = (_cached_file(repo, candidate) for candidate in _weights_files(filename or HF_WEIGHTS_NAME))
    weights_file = next((path for path in found if path is not None), None)
    if weights_file is None:
        raise ModelNotDownloaded(label)
    return ClipFiles(
        name,
        str(weights_file),
        image_mean=tag.get("mean"),
        image_std=tag.get("std"),
        image_interpolation=tag.get("interpolation"),
        image_resize_mode=tag.get("resize_mode"),
        quick_gelu=bool(tag.get("quick_gelu", False)),
        **_tokenizer_files(label, text_cfg),
    )


def _weights_files(filename: str) -> list[str]:
    """The files open_clip tries for a pretrained file on the Hub, in its order: a safetensors copy first."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME, filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _tokenizer_files(label: str, text_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """ClipFiles' tokenizer fields: open_clip's BPE needs no file; a Hugging Face tokenizer is cached."""
    name = text_cfg.get("hf_tokenizer_name")
    if not name:
        return {}
    config = _cached_file(name, "tokenizer_config.json")
    if config is None:
        raise ModelNotDownloaded(f"{label} (its tokenizer {name})")
    return {"hf_tokenizer": str(config.parent), "text_cfg": dict(text_cfg)}


def _cached_file(repo: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def check_downloaded(sources: ModelSources, *, generator: bool = True, safety_checker: bool = True) -> None:
    """Name every configured model that is not on this machine, at once and before loading any of them.

    generator=False leaves Stable Diffusion out, for work that makes no images; safety_checker is
    generate.safety_checker.
    """
    locators: list[Callable[[], object]] = [
        lambda: clip_files(sources.clip),
        lambda: caption_folder(sources.caption),
    ]
    if generator:
        locators.insert(0, lambda: generator_folder(sources.generator, safety_checker=safety_checker))
    _raise_missing(locators)


def check_preset(preset: Preset, *, safety_checker: bool) -> None:
    """Raise ModelUnavailable naming what of a preset's generator and CLIP is not on this machine."""
    if preset.single_file:
        generator_file(preset.generator)
        locators: list[Callable[[], object]] = [
            lambda: single_file_config_folder(preset.config, safety_checker=safety_checker)
        ]
    else:
        locators = [lambda: generator_folder(preset.generator, safety_checker=safety_checker)]
    _raise_missing([*locators, lambda: clip_files(preset.clip)])


def _raise_missing(locators: list[Callable[[], object]]) -> None:
    missing: list[str] = []
    for locate in locators:
        try:
            locate()
        except ModelNotDownloaded as exc:
            missing.extend(exc.missing)
    if missing:
        raise ModelNotDownloaded(*missing)
