"""What describing an image yields: the prompt, its candidates with their CLIP scores, and the embedding.

Plain values, without torch, so the store, the cache and the cogs can hold them without loading a model.
"""

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

    @property
    def image_prompts(self) -> tuple[str, ...]:
        """The prompts this description offers for making images, in the order a card shows them.

        A negative description's prompt says what the image is not: images are made from its caption.
        """
        if self.mode == "candidates":
            return tuple(c.prompt for c in self.candidates if c.mode != "negative")
        if self.mode == "negative":
            return (self.caption,)
        return (self.prompt,)

    @property
    def image_negative(self) -> str | None:
        """The negative prompt images made from this description get: a negative description's own
        suggestion; None (the server's default) for the other modes."""
        return self.negative if self.mode == "negative" else None
