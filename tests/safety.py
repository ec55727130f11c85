"""Making the smoke model's safety checker flag every image, for tests of what happens to flagged ones."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def flagging_everything(pipe: Any) -> Iterator[None]:
    """Within the block, every concept of the pipeline's safety checker scores above its threshold."""
    checker = pipe.safety_checker
    saved = checker.concept_embeds_weights.data.clone()
    checker.concept_embeds_weights.data.fill_(-2.0)
    try:
        yield
    finally:
        checker.concept_embeds_weights.data.copy_(saved)
