"""Planned requests for tests that build jobs without the engine: every setting given, as plan() leaves."""

from __future__ import annotations

import random
from typing import Any

from i2p2i_bot.jobs import JobRequest
from i2p2i_bot.request import SEED_LIMIT, GenerationParams, GenerationRequest


def planned(
    prompt: str,
    params: GenerationParams,
    *,
    count: int = 1,
    seed: int | None = None,
    negative_prompt: str = "",
    guide_source: str | None = None,
) -> GenerationRequest:
    """A planned request with these parameters (their guides too, kept of `guide_source`); a random first
    seed unless one is given, as plan() picks."""
    return GenerationRequest(
        prompt,
        negative_prompt=negative_prompt,
        count=count,
        seed=random.randrange(SEED_LIMIT) if seed is None else seed,
        steps=params.steps,
        guidance=params.guidance,
        width=params.width,
        height=params.height,
        scheduler=params.scheduler,
        model=params.model,
        keep=params.keep,
        guide_source=guide_source,
        loras=params.loras,
        preset=params.preset,
    )


def job_request(
    owner_id: int,
    prompt: str,
    params: GenerationParams,
    *,
    count: int = 1,
    seed: int | None = None,
    negative_prompt: str = "",
    guide_source: str | None = None,
    **submission: Any,
) -> JobRequest:
    """What the queue takes: a planned request of `owner_id`'s, with any of JobRequest's other fields."""
    request = planned(
        prompt, params, count=count, seed=seed, negative_prompt=negative_prompt, guide_source=guide_source
    )
    return JobRequest(owner_id=owner_id, request=request, **submission)
