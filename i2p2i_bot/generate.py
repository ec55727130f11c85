"""Stable Diffusion service: validated requests in, typed results out, one generator per image."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

StepCallback = Callable[[int, int], None]


class GenerationError(Exception):
    """A request a user can fix (bad size, count, steps...); the message is one sentence for them."""


@dataclass(frozen=True)
class GenerationParams:
    """Everything that must be equal for images to share one GPU batch."""

    model: str
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str


@dataclass(frozen=True)
class ImageSpec:
    """One image to make: its prompt, negative prompt and seed (the seed alone reproduces it)."""

    prompt: str
    negative_prompt: str
    seed: int
    # Normalised CLIP embedding of the source image, for the fidelity score; None when there is no source.
    source_embedding: tuple[float, ...] | None = None


@dataclass(frozen=True)
class GeneratedImage:
    spec: ImageSpec
    image: Image.Image
    nsfw: bool
    # Cosine of the CLIP image embeddings of source and result, in [-1, 1]; None without a source.
    fidelity: float | None


@dataclass(frozen=True)
class BatchResult:
    images: tuple[GeneratedImage, ...]
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
