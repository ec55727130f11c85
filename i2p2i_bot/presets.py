"""Model presets: the generators members may choose by name, each with its family, CLIP and defaults.

A preset is what a request, a job row and a batch key name (`GenerationRequest.preset`); the engine loads
its pipeline on first use. Nothing here imports torch: the cogs list and check presets without the GPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from i2p2i_bot.config import BUILTIN_PRESET, GenerateSettings, PresetSettings
from i2p2i_bot.i18n import tr
from i2p2i_bot.request import GenerationError
from i2p2i_bot.server_settings import ServerSettings

Family = Literal["sd1", "sd2", "sdxl"]
FAMILIES: tuple[Family, ...] = ("sd1", "sd2", "sdxl")
# The interrogator's CLIP that pairs with each family's text encoder.
FAMILY_CLIP: dict[Family, str] = {
    "sd1": "ViT-L-14/openai",
    "sd2": "ViT-H-14/laion2b_s32b_b79k",
    "sdxl": "ViT-L-14/openai",
}
# The side each family was trained at; sd1's is generate.width x height.
FAMILY_SIZE: dict[Family, int] = {"sd1": 512, "sd2": 768, "sdxl": 1024}
# Where a single file's configs and tokenizers come from when its preset names none.
FAMILY_CONFIG: dict[Family, str] = {
    "sd1": "CompVis/stable-diffusion-v1-4",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
# The pipeline class each family loads with.
FAMILY_PIPELINE: dict[Family, str] = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# A Hub id as a generator names it ("org/name"); a path starts otherwise ("/", "./", "~") or goes deeper.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

log = logging.getLogger("i2p2i.presets")


class UnknownPreset(GenerationError):
    """A request names a preset this bot does not have; the message lists those it has."""


@dataclass(frozen=True)
class Preset:
    """A generator members may choose, resolved: its family, its CLIP and its request defaults."""

    name: str
    generator: str
    family: Family
    clip: str
    # The request defaults and bounds of this preset ([generate] with the preset's changes).
    generate: GenerateSettings
    # For a single file: the folder or Hub id of the configs it is loaded with; "" for a diffusers model.
    config: str = ""
    # Built by the smoke preset: recorded by role alone.
    smoke: bool = False
    # The entry's own defaults (size, steps...), applied over whatever [generate] a server has.
    changes: PresetSettings = dataclasses.field(default_factory=PresetSettings)

    @property
    def single_file(self) -> bool:
        return self.generator.lower().endswith(SINGLE_FILE_SUFFIXES)

    @property
    def safety_checker(self) -> bool:
        """Whether the family's pipelines ship a safety checker (SD 2.x and SDXL repositories do not)."""
        return self.family == "sd1" and self.generate.safety_checker

    @property
    def weights(self) -> str:
        """What identifies this preset's weights on every machine: its family and its generator's name
        (weights_name). Workers and the bot compare it, so that a preset name means the same model on both."""
        return f"{self.family}:{weights_name(self.generator)}"

    @property
    def recorded_generator(self) -> str:
        """The generator as jobs record it (a smoke one by role, and the preset's name past the first)."""
        if not self.smoke:
            return self.generator
        return "smoke:generator" if self.name == BUILTIN_PRESET else f"smoke:generator-{self.name}"


@dataclass(frozen=True)
class Presets:
    """The presets of this bot, by name, and which one a request without a preset gets."""

    by_name: Mapping[str, Preset]
    default: str = BUILTIN_PRESET

    def __iter__(self) -> Iterator[Preset]:
        return iter(self.by_name.values())

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.by_name)

    def get(self, name: str | None) -> Preset:
        """The preset a request names (None: the default); UnknownPreset says which there are."""
        chosen = self.default if name is None else name.strip()
        found = self.by_name.get(chosen)
        if found is None:
            raise UnknownPreset(
                tr(
                    None,
                    "There is no model preset “{name}”; choose one of {names}.",
                    name=chosen[:40],
                    names=", ".join(self.names),
                )
            )
        return found

    def server_model(self, server: ServerSettings, guild_id: int | None = None) -> str | None:
        """The preset a server's requests get when the member names none; None: the bot's default, also
        where the server chose a preset the config no longer has (logged, never a member's error)."""
        if server.model is None or server.model in self.by_name:
            return server.model
        log.warning(
            "server %s chose model preset %r, which the config no longer has; using %r",
            guild_id,
            server.model,
            self.default,
        )
        return None

    def settings_for(
        self, name: str | None, server: ServerSettings | None, base: GenerateSettings
    ) -> GenerateSettings:
        """A preset's request settings: `base` ([generate]) with a server's changes, then the preset's
        own (its family's size wins over a server's, which is for the built-in family)."""
        preset = self.get(name)
        settings = base if server is None else server.generate(base)
        return preset_generate(preset.changes, preset.family, settings)

    def without_safety_checker(self) -> list[str]:
        """Presets whose images no safety checker looks at, though [generate] asks for one."""
        return [p.name for p in self if p.generate.safety_checker and not p.safety_checker]

    def safety_notice(self, locale: str | None = None) -> str | None:
        """One sentence for admins (at start, in /admin) naming the presets whose images go unchecked."""
        unchecked = self.without_safety_checker()
        if not unchecked:
            return None
        return tr(
            locale,
            "No safety checker looks at the images of {presets}: SD 2.x and SDXL ship none, so their "
            "images are posted unchecked.",
            presets=", ".join(unchecked),
        )


def preset_from_settings(
    entry: PresetSettings, generate: GenerateSettings, *, clip: str | None = None, smoke: bool = False
) -> Preset:
    """A configured preset resolved: its family found where not given, the family's defaults filled in.

    `clip` replaces the family's CLIP where the entry names none (the smoke models' tiny CLIP).
    """
    family: Family = entry.family or detect_family(entry.generator)
    return Preset(
        name=entry.name,
        generator=entry.generator,
        family=family,
        clip=entry.clip or clip or FAMILY_CLIP[family],
        generate=preset_generate(entry, family, generate),
        config=(entry.config or FAMILY_CONFIG[family]) if _is_single_file(entry.generator) else "",
        smoke=smoke,
        changes=entry,
    )


def preset_generate(entry: PresetSettings, family: Family, generate: GenerateSettings) -> GenerateSettings:
    """[generate] with a preset's defaults: its family's size (the largest side scaled with it) and its
    own steps, guidance and negative prompt where it sets them."""
    changes: dict[str, object] = {}
    size = entry.size or (0 if family == "sd1" else FAMILY_SIZE[family])
    if size:
        # The largest side grows with the default, as generate.max_side relates to generate.width x height.
        ratio = generate.max_side / max(generate.width, generate.height)
        changes.update(width=size, height=size, max_side=max(generate.max_side, int(size * ratio) // 8 * 8))
    if entry.steps:
        changes.update(steps=entry.steps, max_steps=max(generate.max_steps, entry.steps))
    if entry.guidance != -1.0:
        changes["guidance"] = entry.guidance
    if entry.negative_prompt:
        changes["negative_prompt"] = entry.negative_prompt
    return dataclasses.replace(generate, **changes)  # type: ignore[arg-type]


def weights_name(generator: str) -> str:
    """A generator as every machine names it, from its setting alone: a Hub id as written, a file or
    folder by its own name (the folders above it differ between machines). Nothing is read: the bot in
    redis mode has no generator weights to read, so a size or a hash could not be compared with its own."""
    text = generator.strip()
    if not _is_single_file(text) and _HUB_ID.fullmatch(text):
        return text
    return PurePosixPath(text.replace("\\", "/").rstrip("/")).name or text


def _is_single_file(generator: str) -> bool:
    return generator.lower().endswith(SINGLE_FILE_SUFFIXES)


def detect_family(generator: str) -> Family:
    """A generator's family from its files where they are here: a diffusers folder's configs or a single
    file's tensor names; otherwise from its name, sd1 where that says nothing."""
    path = Path(generator).expanduser()
    if path.is_file():
        return _single_file_family(path)
    if path.is_dir():
        return _folder_family(path)
    lowered = generator.lower()
    if "xl" in lowered:
        return "sdxl"
    if "stable-diffusion-2" in lowered or "sd2" in lowered:
        return "sd2"
    return "sd1"


def _folder_family(folder: Path) -> Family:
    index = _read_json(folder / "model_index.json")
    if "XL" in str(index.get("_class_name", "")):
        return "sdxl"
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    unet = _read_json(folder / "unet" / "config.json")
    if scheduler.get("prediction_type") == "v_prediction" or unet.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def _single_file_family(path: Path) -> Family:
    """SDXL checkpoints hold `conditioner.embedders`, SD 2.x an OpenCLIP text model, SD 1.x neither."""
    if path.suffix.lower() != ".safetensors":
        return "sd1"  # a pickle is not opened to look: its preset should say its family
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        names = json.loads(f.read(length)).keys()
    if any(name.startswith("conditioner.embedders.") for name in names):
        return "sdxl"
    if any(name.startswith("cond_stage_model.model.") for name in names):
        return "sd2"
    return "sd1"


def _read_json(path: Path) -> dict[str, object]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}
