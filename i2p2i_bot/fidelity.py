"""How faithful made images are, as CLIP sees them: to their source image and to their prompt.

Fidelity is the cosine of an image's CLIP embedding with its source image's (the score every result gets,
from the interrogation's embedding of the source); adherence is the cosine of its CLIP embedding with its
prompt's text embedding (what `bench/fidelity.py` reports beside it). Both take normalised embeddings from
the interrogation CLIP (`ClipEncoder.encode_images`, `encode_pixels`, `encode_texts`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fidelity_scores(images: torch.Tensor, sources: Sequence[Sequence[float]]) -> list[float]:
    """Each image's fidelity to its own source: row i of `images` ([N, D], normalised) against source i."""
    embeds = images.float().cpu()
    scores = []
    for row, source_values in enumerate(sources):
        source = torch.tensor(source_values, dtype=torch.float32)
        scores.append(float(embeds[row] @ (source / source.norm())))
    return scores


def adherence_scores(images: torch.Tensor, prompts: torch.Tensor) -> list[float]:
    """Each image's adherence to its own prompt: row i of `images` against row i of `prompts` (text
    embeddings of `prompt_encoding.prompt_words`), both normalised."""
    return [float(v) for v in (images.float().cpu() * prompts.float().cpu()).sum(dim=-1)]
