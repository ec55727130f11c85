"""What a member asks for: the one request type, and its validation against the settings.

The command line, the cogs and the queue all build a `GenerationRequest`; `plan()` checks it once, in the
spirit of diffusers' `check_inputs`, and fills in every setting left to the server's default and the first
seed. A planned request is what a job stores, what a reroll starts from and what the engine makes. Adding
a setting means a field here, its check in `plan()`, a migration adding the jobs column of the same name
(with a codec in the store if it is not a plain value), and the control that sets it. Nothing here imports
torch, so the job system stays light.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Collection
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING

from i2p2i_bot.config import BUILTIN_PRESET
from i2p2i_bot.guides import Guide, GuideError, check_guides
from i2p2i_bot.lookalikes import visible
from i2p2i_bot.loras import Lora, LoraError, LoraLibrary, strip_tags
from i2p2i_bot.prompt_syntax import PromptSyntaxError, check_weights

if TYPE_CHECKING:
    from i2p2i_bot.config import GenerateSettings

SEED_LIMIT = 2**32
MAX_SEED = SEED_LIMIT - 1
MAX_PROMPT_CHARS = 4000
SCHEDULERS = ("dpm", "pndm")
MAX_GUIDANCE = 30.0
_UNPLANNED = "the request has not been planned; plan() fills in its settings and seed"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Fields a planned request may leave empty: a request without guides has no source to keep from.
_OPTIONAL = frozenset({"guide_source"})


class GenerationError(Exception):
    """A request a member can fix (bad size, count, steps...); the message is one sentence for them."""


@dataclass(frozen=True)
class GenerationParams:
    """Everything that must be equal for images to share one GPU batch."""

    model: str
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str
    # The guides and their weights: images kept from their sources the same way share a batch.
    keep: tuple[Guide, ...] = ()
    # The LoRAs and their weights and files (loras.py): images made with the same set share a batch.
    loras: tuple[Lora, ...] = ()
    # The model preset (presets.py) whose pipeline makes the batch; `model` is its generator as recorded.
    preset: str = BUILTIN_PRESET
    # Whether the batch's images are upscales (GenerationRequest.upscale): a worker plans them again
    # within generate.upscale_max_side rather than max_side.
    upscale: bool = False


@dataclass(frozen=True)
class ImageSpec:
    """One image to make: its prompt, negative prompt and seed (the seed alone reproduces it)."""

    prompt: str
    negative_prompt: str
    seed: int
    # Normalised CLIP embedding of the source image, for the fidelity score; None when there is no source.
    source_embedding: tuple[float, ...] | None = None
    # The sha256 of the stored image this image's guides keep elements of; None without guides. Each image
    # of a batch has its own, so members who share a batch keep their own sources.
    guide_source: str | None = None
    # Whether an image the safety checker flags keeps its pixels, for a job whose channel may show it
    # (flagged.py); otherwise it is blacked out. Each image of a batch has its own.
    keep_flagged: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """N images of one prompt with one set of settings; None leaves a setting to the server's default.

    Image i gets seed + i (wrapping at 2**32), so each image can be made again from its seed alone.
    """

    prompt: str
    _: KW_ONLY
    negative_prompt: str | None = None
    count: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    # The generator as recorded: plan() fills it in from the preset, whatever a reroll brings.
    model: str | None = None
    # What the images keep of the source besides the prompt (guides.py); empty: only what the prompt says.
    keep: tuple[Guide, ...] = ()
    # The sha256 of the stored image the guides keep elements of: the member's upload, as a job's
    # source_sha256 names it, or (later) one of their results.
    guide_source: str | None = None
    # The LoRAs the prompt's <lora:NAME:WEIGHT> tags name, with their files' sha256 (loras.py); plan()
    # fills it in, and a job's set pins the files its rerolls may use.
    loras: tuple[Lora, ...] = ()
    # The model preset by name (presets.py); None: the bot's default preset.
    preset: str | None = None
    # An upscale (the hires fix, upscale_of): a result image made again at twice its size, kept from it
    # with layout; its sides may reach generate.upscale_max_side instead of max_side.
    upscale: bool = False

    @property
    def planned(self) -> bool:
        """Whether every setting and the seed are fixed, as `plan()` leaves them."""
        return all(
            getattr(self, f.name) is not None for f in dataclasses.fields(self) if f.name not in _OPTIONAL
        )

    @property
    def params(self) -> GenerationParams:
        """The batch key of a planned request."""
        m, steps, g, w, h, sched = (
            self.model,
            self.steps,
            self.guidance,
            self.width,
            self.height,
            self.scheduler,
        )
        if m is None or steps is None or g is None or w is None or h is None or sched is None:
            raise ValueError(_UNPLANNED)
        if self.preset is None:
            raise ValueError(_UNPLANNED)
        return GenerationParams(m, steps, g, w, h, sched, self.keep, self.loras, self.preset, self.upscale)

    @property
    def seeds(self) -> tuple[int, ...]:
        """One seed per image of a planned request."""
        if self.seed is None:
            raise ValueError(_UNPLANNED)
        return tuple((self.seed + i) % SEED_LIMIT for i in range(self.count))

    def spec(
        self, index: int, source_embedding: tuple[float, ...] | None = None, *, keep_flagged: bool = False
    ) -> ImageSpec:
        """Image `index` of a planned request."""
        source = self.guide_source if self.keep else None
        return ImageSpec(
            self.prompt, self.negative_prompt or "", self.seeds[index], source_embedding, source, keep_flagged
        )

    def specs(self, source_embedding: tuple[float, ...] | None = None) -> tuple[ImageSpec, ...]:
        return tuple(self.spec(i, source_embedding) for i in range(self.count))


# Aspect ratios a member may ask for, as (wide, high).
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1, 1),
    "3:2": (3, 2),
    "2:3": (2, 3),
    "16:9": (16, 9),
    "9:16": (9, 16),
}


def size_for_aspect(aspect: str, settings: GenerateSettings) -> tuple[int, int]:
    """The (width, height) for an aspect ratio at the model's size: the default size's shorter side kept and
    the other grown to the ratio, both scaled down to fit `max_side`; multiples of 8, as the UNet needs."""
    ratio = ASPECT_RATIOS.get(aspect.strip())
    if ratio is None:
        raise GenerationError(
            f"The aspect ratio must be one of {', '.join(ASPECT_RATIOS)} (got “{aspect.strip()[:20]}”)."
        )
    wide, high = ratio
    short = float(min(settings.width, settings.height))
    long = short * max(wide, high) / min(wide, high)
    if long > settings.max_side:
        short, long = short * settings.max_side / long, float(settings.max_side)
    short_side = max(settings.min_side, int(short) // 8 * 8)
    long_side = max(settings.min_side, int(long) // 8 * 8)
    return (long_side, short_side) if wide >= high else (short_side, long_side)


def upscale_of(request: GenerationRequest, *, seed: int, source: str, strength: float) -> GenerationRequest:
    """One image of a planned request made again at twice its width and height, as A1111's hires fix does:
    its prompt, negative prompt, settings and `seed`, kept from that image (stored as `source`, its sha256)
    with the layout guide at `strength`. One image, whatever the request's count."""
    if request.width is None or request.height is None:
        raise ValueError(_UNPLANNED)
    return dataclasses.replace(
        request,
        count=1,
        seed=seed,
        width=request.width * 2,
        height=request.height * 2,
        keep=(Guide("layout", strength),),
        guide_source=source,
        upscale=True,
    )


def upscale_fits(width: int, height: int, settings: GenerateSettings) -> bool:
    """Whether an image of this size may be upscaled: twice each side within generate.upscale_max_side."""
    return max(width, height) * 2 <= settings.upscale_max_side


def whole_number(text: str) -> int | None:
    """The number a member wrote with the digits 0–9 alone, or None for anything else.

    str.isdigit also passes "²", on which int() fails with its own message, and int() reads the digits of
    other scripts ("３"): a seed typed one way and shown another is not the seed the member meant to write.
    """
    return int(text) if text.isascii() and text.isdigit() else None


def check_count(count: int, settings: GenerateSettings) -> None:
    """The number of images one request may ask for, checked alone (before there is a prompt to plan)."""
    if not 1 <= count <= settings.max_count:
        raise GenerationError(
            f"The number of images must be between 1 and {settings.max_count} (got {count})."
        )


def check_length(text: str, *, negative: bool = False) -> None:
    """The one cap on a prompt or negative prompt, wherever it comes from (typed, replied, applied from a
    card's suggestion, a server's default), with the one sentence for it."""
    if len(text) <= MAX_PROMPT_CHARS:
        return
    if negative:
        raise GenerationError(
            f"The negative prompt is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}."
        )
    raise GenerationError(f"The prompt is {len(text)} characters; the limit is {MAX_PROMPT_CHARS}.")


def plan(
    request: GenerationRequest,
    settings: GenerateSettings,
    model: str,
    guides: Collection[str] = (),
    loras: LoraLibrary | None = None,
    preset: str = BUILTIN_PRESET,
) -> GenerationRequest:
    """Check a request against the settings; return it with every default filled in and its first seed.

    `settings`, `model` and `guides` are those of the request's preset, named `preset`: the caller chose
    it (presets.Presets.get). `guides` names the guides on offer, `loras` the LoRAs (None: none). Raises
    GenerationError, one sentence for the member, for anything out of bounds. A request that is planned
    already is checked again (the settings may have changed since) and keeps its seed; its LoRA set pins
    the files it used.
    """
    # Characters that draw nothing (zero-width spaces, soft hyphens...) are dropped from what is generated
    # and shown; a prompt of nothing else is empty, as it is once folded for matching banned terms.
    prompt = visible(request.prompt).strip()
    if not prompt:
        raise GenerationError("The prompt is empty; write what the image should show.")
    check_length(prompt)
    negative = visible(
        settings.negative_prompt if request.negative_prompt is None else request.negative_prompt
    ).strip()
    check_length(negative, negative=True)
    try:
        check_weights(strip_tags(prompt))
        check_weights(negative, "negative prompt")
    except PromptSyntaxError as exc:
        raise GenerationError(str(exc)) from None
    check_count(request.count, settings)
    steps = settings.steps if request.steps is None else request.steps
    if not 1 <= steps <= settings.max_steps:
        raise GenerationError(f"Steps must be between 1 and {settings.max_steps} (got {steps}).")
    guidance = settings.guidance if request.guidance is None else float(request.guidance)
    if not 0.0 <= guidance <= MAX_GUIDANCE:
        raise GenerationError(f"Guidance must be between 0 and {MAX_GUIDANCE:g} (got {guidance:g}).")
    width = settings.width if request.width is None else request.width
    height = settings.height if request.height is None else request.height
    if request.upscale and max(width, height) > settings.upscale_max_side:
        raise GenerationError(
            f"Upscaled, the image would be {width}×{height} pixels; an upscale may be at most "
            f"{settings.upscale_max_side} pixels on a side."
        )
    high = settings.upscale_max_side if request.upscale else settings.max_side
    for name, side in (("width", width), ("height", height)):
        if side % 8 or not settings.min_side <= side <= high:
            raise GenerationError(
                f"The {name} must be a multiple of 8 between {settings.min_side} and {high} (got {side})."
            )
    scheduler = settings.scheduler if request.scheduler is None else request.scheduler
    if scheduler not in SCHEDULERS:
        raise GenerationError(f"The scheduler must be one of {', '.join(SCHEDULERS)} (got {scheduler!r}).")
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise GenerationError(f"The seed must be a whole number from 0 to {MAX_SEED} (got {request.seed}).")
    keep, source = _check_keep(request, steps, guides)
    try:
        # Last: it may hash a LoRA file not seen before.
        lora_set = (loras or LoraLibrary(None)).resolve(prompt, negative, request.loras)
    except LoraError as exc:
        raise GenerationError(str(exc)) from None
    return GenerationRequest(
        prompt,
        negative_prompt=negative,
        count=request.count,
        seed=secrets.randbelow(SEED_LIMIT) if request.seed is None else request.seed,
        steps=steps,
        guidance=guidance,
        width=width,
        height=height,
        scheduler=scheduler,
        model=model,
        keep=keep,
        guide_source=source,
        loras=lora_set,
        preset=preset,
        upscale=request.upscale,
    )


def _check_keep(
    request: GenerationRequest, steps: int, offered: Collection[str]
) -> tuple[tuple[Guide, ...], str | None]:
    """The request's guides, checked, and their source; a source without guides is dropped (it would
    change nothing, and would keep the request from sharing a batch with plain ones)."""
    if not request.keep:
        if request.upscale:
            raise ValueError("an upscale keeps its source image's layout; upscale_of makes one")
        return (), None
    try:
        keep = check_guides(request.keep, offered)
    except GuideError as exc:
        raise GenerationError(str(exc)) from None
    if request.guide_source is None:
        names = " and ".join(g.name for g in keep)
        raise GenerationError(f"Keeping {names} needs a source image; give one, or keep nothing.")
    if not _SHA256.match(request.guide_source):
        raise ValueError(f"a guide source is the sha256 of a stored image (got {request.guide_source!r})")
    if request.upscale and [g.name for g in keep] != ["layout"]:
        raise ValueError(f"an upscale keeps its source image's layout alone (got {keep})")
    for guide in keep:
        # The pipeline runs int(steps * strength) of the steps: none would leave the source as it is.
        if guide.name == "layout" and int(steps * guide.weight) < 1:
            raise GenerationError(
                f"With {steps} steps, layout:{guide.weight:g} leaves no step to take; "
                "raise the steps or the layout weight."
            )
    return keep, request.guide_source
