"""CLIP Interrogator service: image → prompt in several modes, with CLIP scores."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """One prompt and its CLIP cosine similarity to the image, in [-1, 1]."""

    mode: str
    prompt: str
    score: float


@dataclass(frozen=True)
class Interrogation:
    """The result of describing one image in one mode."""

    mode: str
    prompt: str
    score: float
    caption: str
    negative: str | None
    candidates: tuple[Candidate, ...]
    # Normalised CLIP image embedding, kept so results can later be scored for fidelity to this source.
    image_embedding: tuple[float, ...]
    models: dict[str, str] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
