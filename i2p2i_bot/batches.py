"""The batch seam: what the scheduler hands to whatever runs images, and what comes back.

A batch is images that share one GPU call; the local GPU thread runs them now, GPU workers on other
machines may later. Plain values and a protocol, without torch.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image

from i2p2i_bot.request import GenerationParams, ImageSpec

# Called from the GPU thread as denoising goes: (step, total_steps).
StepCallback = Callable[[int, int], None]


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


@dataclass(frozen=True)
class BatchItem:
    job_id: int
    index: int
    spec: ImageSpec


@dataclass(frozen=True)
class Batch:
    """Images that share one GPU call; results must come back in the order of `items`."""

    id: int
    params: GenerationParams
    items: tuple[BatchItem, ...]

    @functools.cached_property
    def specs(self) -> tuple[ImageSpec, ...]:
        return tuple(item.spec for item in self.items)

    @functools.cached_property
    def job_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(item.job_id for item in self.items))


class FailureKind(enum.StrEnum):
    # The jobs cannot succeed as asked (a user-fixable error, out of memory at one image, a timeout).
    PERMANENT = "permanent"
    # Something went wrong that may not happen again: retry, charging an attempt where the blame is clear.
    TRANSIENT = "transient"
    # The worker stopped before finishing: put the images back, charging nobody.
    INTERRUPTED = "interrupted"
    # The GPU broke while the batch ran and only a new process gets it back: the jobs stay in flight in the
    # store, so the next start charges each an attempt and runs it alone. A job that breaks the GPU every
    # time fails after max_attempts starts; the jobs that shared its batch finish.
    FAULTED = "faulted"


@dataclass(frozen=True)
class BatchFailure:
    reason: str
    kind: FailureKind = FailureKind.TRANSIENT


class BatchSource(Protocol):
    """The seam between the scheduler and what runs batches: the GPU thread now, remote workers later."""

    async def next_batch(self) -> Batch | None:
        """Wait for the next batch; None means the source is closed and the worker should stop."""
        ...

    def batch_progress(self, batch: Batch, step: int, total_steps: int) -> None:
        """Report denoising progress; cheap and never blocking."""
        ...

    def models_resident(self, presets: Iterable[str]) -> None:
        """The model presets the GPU holds now, so the scheduler can prefer batches for them."""
        ...

    def batch_loading(self, batch: Batch, preset: str) -> None:
        """The GPU loads `preset` before it can start the batch (it was not resident)."""
        ...

    async def batch_result(self, batch: Batch, outcome: BatchResult | BatchFailure) -> None:
        """Hand back a batch's images (in item order) or why it failed; returns once the result is stored."""
        ...

    def close(self) -> None:
        """Stop handing out batches; results of batches already out are still taken."""
        ...


@runtime_checkable
class ModelKeeper(Protocol):
    """A BatchMaker that keeps some model presets loaded and loads others when a batch needs them."""

    @property
    def resident_presets(self) -> tuple[str, ...]:
        """The presets loaded on the GPU now, the most recently used last; safe to read off the GPU thread."""
        ...


class BatchMaker(Protocol):
    """What runs a batch: the engine on the GPU thread here, a GPU worker elsewhere."""

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: StepCallback | None = None
    ) -> BatchResult:
        """One image per spec, in order; blocking; calls on_step(step, total_steps) from the GPU thread."""
        ...
