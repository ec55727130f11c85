"""What a GPU worker can run, which of the bot's batches that covers, and the BullMQ queue it takes them from.

Workers report their capabilities in their record in Redis: the guides they offer, the model presets whose
weights they have (name and what identifies the weights: family and generator, Preset.weights) and the
LoRA files they hold (name and sha256, as a batch pins them). A batch needs its preset as the bot's config
resolves it: a worker whose config gives the name other weights does not have that preset, so it never
takes such a batch, and the bot names both sides to its admins (Mismatch). Workers with the
same capabilities share one BullMQ queue, named for them, and the bot sends a batch only to the queue of
workers that can run it: every worker on a queue can make every batch on it, so BullMQ's own stalled-job
recovery hands a dead worker's batch only to a worker that can make it, and no worker ever takes a batch it
would refuse. A batch that several queues can run goes to one of them (remote.py picks it); a queue is
never shared by workers that differ, so there are as many queues as distinct worker setups, however many
presets and LoRAs there are.

A worker reads its capabilities when it starts and again every queue.worker_rescan_s: when they change
(a LoRA copied in or removed, a preset downloaded) it moves, between batches, to the queue of its new set.
Plain values, without torch, Redis or discord.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from i2p2i_bot.guides import GUIDE_NAMES
from i2p2i_bot.i18n import LIST_AND, N_
from i2p2i_bot.loras import Lora
from i2p2i_bot.presets import Presets
from i2p2i_bot.request import GenerationParams

# The queue of workers that offer nothing (and of workers too old to say what they offer: they get nothing).
BASE_QUEUE = "i2p2i-batches"
# What a job waits for, for its member, while no live worker can make it.
WAITING_FOR_WORKER = N_("waiting for a GPU worker")
WAITING_FOR_GUIDES = N_("waiting for a GPU worker that can keep {guides}")
WAITING_FOR_MODEL = N_("waiting for a GPU worker that has the model {model}")
WAITING_FOR_LORA = N_("waiting for a GPU worker that has the LoRA {lora}")
WAITING_FOR_LORAS = N_("waiting for a GPU worker that has the LoRAs {loras}")

# A LoRA file as workers offer and batches need it: its name and its sha256.
LoraFileId = tuple[str, str]
# A model preset as workers offer and batches need it: its name and what identifies its weights.
PresetId = tuple[str, str]
# The bot's presets: what identifies each one's weights (Preset.weights), by name.
PresetWeights = Mapping[str, str]


@dataclass(frozen=True)
class Capabilities:
    """The guides a worker offers (in GUIDE_NAMES' order), the presets it has and its LoRA files (sorted)."""

    guides: tuple[str, ...] = ()
    presets: tuple[PresetId, ...] = ()
    loras: tuple[LoraFileId, ...] = ()

    @classmethod
    def of(
        cls, guides: Iterable[str] = (), presets: Iterable[PresetId] = (), loras: Iterable[LoraFileId] = ()
    ) -> Capabilities:
        offered = set(guides)
        return cls(
            tuple(name for name in GUIDE_NAMES if name in offered),
            tuple(sorted(set(presets))),
            tuple(sorted(set(loras), key=lambda lora: (lora[0].casefold(), lora[1]))),
        )

    @property
    def queue(self) -> str:
        """The BullMQ queue of the workers with exactly these capabilities."""
        if self == Capabilities():
            return BASE_QUEUE
        digest = hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:12]
        return f"{BASE_QUEUE}-{digest}"

    def record(self) -> dict[str, str]:
        """The fields a worker's record in Redis holds for these capabilities."""
        return {
            "guides": json.dumps(list(self.guides)),
            "presets": json.dumps([list(preset) for preset in self.presets]),
            "loras": json.dumps([list(lora) for lora in self.loras]),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, str]) -> Capabilities:
        """A worker's capabilities from its record; a record that cannot be read offers nothing."""
        try:
            guides = json.loads(record.get("guides") or "[]")
            presets = json.loads(record.get("presets") or "[]")
            loras = json.loads(record.get("loras") or "[]")
            return cls.of(
                (str(name) for name in guides),
                ((str(name), str(weights)) for name, weights in presets),
                ((str(name), str(sha256)) for name, sha256 in loras),
            )
        except (ValueError, TypeError):
            return cls()

    @property
    def size(self) -> int:
        """How much these capabilities offer: a batch goes first to workers that offer least."""
        return len(self.guides) + len(self.presets) + len(self.loras)

    @property
    def preset_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.presets)

    def missing(self, params: GenerationParams, weights: PresetWeights) -> Capabilities:
        """What a batch with these params needs that these capabilities lack; empty when they can run it."""
        wanted = needs(params, weights)
        held = {(name.casefold(), sha256) for name, sha256 in self.loras}
        return Capabilities(
            tuple(name for name in wanted.guides if name not in self.guides),
            tuple(name for name in wanted.presets if name not in self.presets),
            tuple(lora for lora in wanted.loras if (lora[0].casefold(), lora[1]) not in held),
        )

    def can_run(self, params: GenerationParams, weights: PresetWeights) -> bool:
        return self.missing(params, weights) == Capabilities()

    def mismatches(self, weights: PresetWeights) -> tuple[Mismatch, ...]:
        """The presets these capabilities have under a name the bot gives other weights."""
        return tuple(
            Mismatch(name, theirs, weights[name])
            for name, theirs in self.presets
            if name in weights and weights[name] != theirs
        )


@dataclass(frozen=True)
class Mismatch:
    """A preset a worker has by the bot's name for it but with other weights: it gets no batch of it."""

    preset: str
    worker: str
    bot: str


def preset_ids(presets: Presets, names: Iterable[str] | None = None) -> tuple[PresetId, ...]:
    """Presets (those named; None: all) as a worker offers them: each name with its weights' identity."""
    chosen = presets.names if names is None else names
    return tuple((name, presets.by_name[name].weights) for name in chosen)


def preset_weights(presets: Presets) -> dict[str, str]:
    """What identifies each preset's weights, by name: what a batch of it needs of a worker."""
    return {preset.name: preset.weights for preset in presets}


def lora_ids(loras: Iterable[Lora]) -> tuple[LoraFileId, ...]:
    return tuple((lora.name, lora.sha256) for lora in loras)


def needs(params: GenerationParams, weights: PresetWeights) -> Capabilities:
    """What a worker must offer to make a batch with these params: its guides, its preset with the weights
    the bot's config gives it (none a worker offers, where the bot has no such preset), its LoRA files."""
    preset = (params.preset, weights.get(params.preset, ""))
    return Capabilities.of((guide.name for guide in params.keep), (preset,), lora_ids(params.loras))


def waiting_reason(
    params: GenerationParams, live: Iterable[Capabilities], weights: PresetWeights
) -> str | None:
    """Why no live worker can make a batch with these params, for its member; None when one can.

    It names the model when no live worker has it; otherwise what the closest worker that has the model
    lacks (the LoRAs first: a guide is a switch, a LoRA a file someone must copy). With no worker live it
    names what a worker must offer beyond the model, if anything."""
    live = list(live)
    if any(capabilities.can_run(params, weights) for capabilities in live):
        return None
    wanted = needs(params, weights)
    with_model = [c for c in live if wanted.presets[0] in c.presets]
    if live and not with_model:
        return WAITING_FOR_MODEL.format(model=params.preset)
    closest = min(
        (c.missing(params, weights) for c in with_model),
        key=lambda lacking: (lacking.size, lacking.loras, lacking.guides),
        default=Capabilities.of(wanted.guides, (), wanted.loras),
    )
    if len(closest.loras) == 1:
        return WAITING_FOR_LORA.format(lora=closest.loras[0][0])
    if closest.loras:
        return WAITING_FOR_LORAS.format(loras=LIST_AND.join(name for name, _ in closest.loras))
    if closest.guides:
        return WAITING_FOR_GUIDES.format(guides=LIST_AND.join(closest.guides))
    return WAITING_FOR_WORKER
