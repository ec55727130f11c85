"""The job model: what a member asks for, what the queue tracks, and what it tells subscribers."""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from i2p2i_bot.generate import GenerationParams, ImageSpec

SEED_LIMIT = 2**32


class JobRefused(Exception):
    """A request or change the queue will not make; the message is one sentence for the member."""


class JobStatus(enum.StrEnum):
    """Explicit job states; the last three are final."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.COMPLETE, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class Delivery:
    """Where a job's results go: the channel and message to update, and the interaction token."""

    channel_id: int | None = None
    message_id: int | None = None
    interaction_token: str | None = field(default=None, repr=False)
    token_expires_at: float | None = None


@dataclass(frozen=True)
class JobRequest:
    """One member's request for `count` images with one parameter set."""

    owner_id: int
    prompt: str
    params: GenerationParams
    count: int = 1
    negative_prompt: str = ""
    # Image i gets seed + i (wrapping at 2**32); None picks a random first seed.
    seed: int | None = None
    origin: str = "discord"
    guild_id: int | None = None
    channel_id: int | None = None
    # The interrogation this prompt came from; its CLIP embedding scores the results for fidelity.
    interrogation_id: int | None = None
    source_sha256: str | None = None
    parent_job_id: int | None = None
    # Submitting a request with a key that is already stored returns the stored job instead of a new one.
    request_key: str | None = None
    delivery: Delivery = field(default_factory=Delivery)

    def seeds(self, rng: random.Random | None = None) -> tuple[int, ...]:
        """One seed per image: the given seed counting up, or a random start."""
        first = self.seed if self.seed is not None else (rng or random).randrange(SEED_LIMIT)
        return tuple((first + i) % SEED_LIMIT for i in range(self.count))


@dataclass(frozen=True)
class Job:
    """A stored job: its request, its seeds and where it stands."""

    id: int
    owner_id: int
    prompt: str
    negative_prompt: str
    params: GenerationParams
    seeds: tuple[int, ...]
    status: JobStatus
    created_at: float
    origin: str = "discord"
    guild_id: int | None = None
    channel_id: int | None = None
    interrogation_id: int | None = None
    source_sha256: str | None = None
    parent_job_id: int | None = None
    request_key: str | None = None
    attempts: int = 0
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    delivery: Delivery = field(default_factory=Delivery)
    delivered_at: float | None = None
    # Why the finished job's result could not be posted anywhere, for its owner; None once delivered.
    delivery_error: str | None = None

    @property
    def count(self) -> int:
        return len(self.seeds)

    def spec(self, index: int, source_embedding: tuple[float, ...] | None = None) -> ImageSpec:
        return ImageSpec(self.prompt, self.negative_prompt, self.seeds[index], source_embedding)

    def reroll(
        self,
        owner_id: int,
        *,
        channel_id: int | None = None,
        seed: int | None = None,
        count: int | None = None,
    ) -> JobRequest:
        """The same prompt and parameters with fresh seeds (or the given one), as a new request."""
        return JobRequest(
            owner_id=owner_id,
            prompt=self.prompt,
            params=self.params,
            count=self.count if count is None else count,
            negative_prompt=self.negative_prompt,
            seed=seed,
            origin="reroll",
            guild_id=self.guild_id,
            channel_id=self.channel_id if channel_id is None else channel_id,
            interrogation_id=self.interrogation_id,
            source_sha256=self.source_sha256,
            parent_job_id=self.id,
        )


class EventKind(enum.StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    STEP = "step"
    IMAGE = "image"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # The GPU failed while the job's images were on it: the job waits, unfinished, for the bot's restart.
    HELD = "held"

    @property
    def terminal(self) -> bool:
        return self in (EventKind.FINISHED, EventKind.FAILED, EventKind.CANCELLED)


@dataclass(frozen=True)
class JobEvent:
    """Something that happened to a job, announced only after it was committed to the store."""

    kind: EventKind
    job_id: int
    owner_id: int
    images_done: int
    count: int
    step: int = 0
    total_steps: int = 0
    # For IMAGE events: which image is ready and where its PNG lies.
    image_index: int | None = None
    image_path: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Position:
    """Where an active job stands: images the GPU makes before it starts, and when it should be done."""

    job_id: int
    status: JobStatus
    images_ahead: int
    images_left: int
    # Seconds until the job should be finished, from measured throughput; None before anything was measured.
    eta_s: float | None
