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
    def ranked(self) -> tuple[Candidate, ...]:
        """The prompts this description offers with their scores, in the order a card lists them.

        A candidates description offers its candidates as ranked. A best description offers its prompt
        first, then the other prompts it was chosen from (caption, classic, fast), highest score first, each
        text once: they were scored from the same features, so listing them costs nothing. Other modes offer
        their one prompt.
        """
        if self.mode == "candidates":
            return tuple(c for c in self.candidates if c.mode != "negative")
        if self.mode == "best":
            # The card's own prompt first (named "best" where the chain is what won), then by score.
            order = sorted(
                self.candidates, key=lambda c: (c.prompt != self.prompt, c.mode != self.mode, -c.score)
            )
            unique: dict[str, Candidate] = {}
            if not order or order[0].prompt != self.prompt:
                unique[self.prompt] = Candidate(self.mode, self.prompt, self.score)
            for candidate in order:
                unique.setdefault(candidate.prompt, candidate)
            return tuple(unique.values())
        return (Candidate(self.mode, self.prompt, self.score),)

    @property
    def image_prompts(self) -> tuple[str, ...]:
        """The prompts this description offers for making images, in the order a card shows them (Use #k
        makes the k-th); the first is what Generate makes.

        A negative description's prompt says what the image is not: images are made from its caption.
        """
        if self.mode == "negative":
            return (self.caption,)
        return tuple(c.prompt for c in self.ranked)

    @property
    def image_negative(self) -> str | None:
        """The negative prompt images made from this description get: a negative description's own
        suggestion; None (the server's default) for the other modes."""
        return self.negative if self.mode == "negative" else None

    @property
    def negative_suggestion(self) -> str | None:
        """The negative prompt this description suggests for images of its prompts, where it made one (a
        candidates description does); a negative description's suggestion is its own prompt, applied
        already."""
        return self.negative if self.mode != "negative" else None
