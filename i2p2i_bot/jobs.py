"""The job model: what a member asks for, what the queue tracks, and what it tells subscribers."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from i2p2i_bot.flagged import FlaggedPolicy
from i2p2i_bot.request import GenerationRequest


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


# The origin of a job a member asked for by replying to the bot (discord.reply_edits): its status message
# is the bot's own reply, so it is edited through its channel, with no interaction token and no time limit.
FROM_REPLY = "reply"
# The origin of a job made by Upscale (2×) on one image of its parent job (request.upscale_of).
UPSCALE = "upscale"


@dataclass(frozen=True, kw_only=True)
class JobRequest:
    """A request with whose it is, where it came from and where its result goes.

    The cogs build drafts (Job.reroll too) whose request is as the member asked; start_job plans it, and
    the queue takes only planned ones (every setting and the first seed fixed, request.plan).
    """

    owner_id: int
    request: GenerationRequest
    origin: str = "discord"
    guild_id: int | None = None
    channel_id: int | None = None
    # The interrogation this prompt came from; its CLIP embedding scores the results for fidelity.
    interrogation_id: int | None = None
    source_sha256: str | None = None
    parent_job_id: int | None = None
    # Submitting a request with a key that is already stored returns the stored job instead of a new one.
    request_key: str | None = None
    # What flagged images of this job get; start_job decides from the server's setting and the channel.
    flagged_policy: FlaggedPolicy = FlaggedPolicy.WITHHOLD
    # The language of the job's messages, which the whole channel reads: the server's, or in a direct
    # message its owner's (replies.channel_locale); None for English.
    locale: str | None = None
    delivery: Delivery = field(default_factory=Delivery)


@dataclass(frozen=True, kw_only=True)
class Job(JobRequest):
    """A stored job: the request it was made from, and where it stands."""

    id: int
    status: JobStatus
    created_at: float
    attempts: int = 0
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    delivered_at: float | None = None
    # Why the finished job's result could not be posted anywhere, for its owner; None once delivered.
    delivery_error: str | None = None
    # When Delete hid it from everyone but admins, and who pressed it; None while it is visible.
    hidden_at: float | None = None
    hidden_by: int | None = None

    @classmethod
    def queued(cls, job_id: int, submitted: JobRequest, now: float) -> Job:
        """The job a request becomes once stored."""
        given = {f.name: getattr(submitted, f.name) for f in dataclasses.fields(JobRequest)}
        return cls(**given, id=job_id, status=JobStatus.QUEUED, created_at=now)

    def reroll(self, owner_id: int, *, origin: str = "reroll", **changes: Any) -> JobRequest:
        """This job's request with its seed left open (or `changes` made), for its owner to plan again.

        Everything else is the job's own: its steps, guidance, size, scheduler and model, whatever the
        server's defaults are now.
        """
        request = dataclasses.replace(self.request, **{"seed": None, **changes})
        return JobRequest(
            owner_id=owner_id,
            request=request,
            origin=origin,
            guild_id=self.guild_id,
            channel_id=self.channel_id,
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
    # Nothing can make the job's waiting images now (no live GPU worker offers what they need), or
    # something can again: `error` says why it waits, None once it no longer does. It never fails for it.
    WAITING = "waiting"
    # The GPU loads the model preset (`model`) that the job's next images need before it can make them.
    LOADING = "loading"

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
    # For LOADING events: the model preset being loaded.
    model: str | None = None


@dataclass(frozen=True)
class Position:
    """Where an active job stands: images the GPU makes before it starts, and when it should be done."""

    job_id: int
    status: JobStatus
    images_ahead: int
    images_left: int
    # Seconds until the job should be finished, from measured throughput; None before anything was measured.
    eta_s: float | None
    # Why nothing can make its waiting images now ("waiting for a GPU worker that can keep edges"); None
    # when something can (JobQueue.set_blocker).
    blocked: str | None = None
    # The model preset the GPU loads before it can make the job's next images; None when none is loading.
    loading: str | None = None
