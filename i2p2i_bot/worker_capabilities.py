"""What a GPU worker can run, which of the bot's batches that covers, and the BullMQ queue it takes them from.

Workers report their capabilities in their record in Redis. Workers with the same capabilities share one
BullMQ queue, named for them, and the bot sends a batch only to the queue of workers that can run it: every
worker on a queue can make every batch on it, so BullMQ's own stalled-job recovery hands a dead worker's
batch only to a worker that can make it, and no worker ever takes a batch it would refuse.

Today a capability is a guide (an engine's offered_guides). A model preset joins here once requests carry
one: a worker reports the presets it has loaded, `needs` adds a batch's preset, and `missing` names it.
Plain values, without torch, Redis or discord.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from i2p2i_bot.guides import GUIDE_NAMES
from i2p2i_bot.i18n import LIST_AND, N_
from i2p2i_bot.request import GenerationParams

# The queue of workers that offer nothing beyond the prompt (and of workers too old to say what they offer).
BASE_QUEUE = "i2p2i-batches"
# What a job waits for, for its member, while no live worker can make it.
WAITING_FOR_WORKER = N_("waiting for a GPU worker")
WAITING_FOR_GUIDES = N_("waiting for a GPU worker that can keep {guides}")


@dataclass(frozen=True)
class Capabilities:
    """The guides a worker offers (names, in GUIDE_NAMES' order)."""

    guides: tuple[str, ...] = ()

    @classmethod
    def of(cls, guides: Iterable[str]) -> Capabilities:
        offered = set(guides)
        return cls(tuple(name for name in GUIDE_NAMES if name in offered))

    @property
    def queue(self) -> str:
        """The BullMQ queue of the workers with exactly these capabilities."""
        if not self.guides:
            return BASE_QUEUE
        digest = hashlib.sha256(json.dumps(self.record()).encode()).hexdigest()[:12]
        return f"{BASE_QUEUE}-{digest}"

    def record(self) -> dict[str, str]:
        """The fields a worker's record in Redis holds for these capabilities."""
        return {"guides": json.dumps(list(self.guides))}

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> Capabilities:
        """A worker's capabilities from its record; a record that does not say offers nothing beyond the
        prompt (what the base queue's workers run)."""
        try:
            guides = json.loads(record.get("guides") or "[]")
            return cls.of(str(name) for name in guides)
        except (ValueError, TypeError):
            return cls()

    def missing(self, params: GenerationParams) -> tuple[str, ...]:
        """What a batch with these params needs that these capabilities lack; () when they can run it."""
        return tuple(name for name in needs(params).guides if name not in self.guides)

    def can_run(self, params: GenerationParams) -> bool:
        return not self.missing(params)


def needs(params: GenerationParams) -> Capabilities:
    """What a worker must offer to make a batch with these params."""
    return Capabilities.of(guide.name for guide in params.keep)


def waiting_reason(params: GenerationParams, live: Iterable[Capabilities]) -> str | None:
    """Why no live worker can make a batch with these params, for its member; None when one can."""
    live = list(live)
    if any(capabilities.can_run(params) for capabilities in live):
        return None
    wanted = needs(params).guides
    if not wanted:
        return WAITING_FOR_WORKER
    return WAITING_FOR_GUIDES.format(guides=LIST_AND.join(wanted))
