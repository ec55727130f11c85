"""What travels through Redis between the bot and its GPU workers: batches, results, worker records.

Plain JSON and key names, without torch or discord, so the bot, the workers and the tests agree on one
format. Images travel by reference: a worker writes each PNG to its own key with a time to live, and the
result names the keys and the PNGs' sha256; a guided batch's source images travel the other way the same
way (remote_sources.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from i2p2i_bot.batches import Batch
from i2p2i_bot.guides import GuideError, check_guides, guides_from_json, guides_json
from i2p2i_bot.loras import loras_from_json, loras_json
from i2p2i_bot.request import GenerationParams, GenerationRequest, ImageSpec

# A live worker's record: a hash that the worker refreshes and that expires when it stops doing so.
WORKER_KEY_PREFIX = "i2p2i:worker:"
RESULT_KEY_PREFIX = "i2p2i:result:"
SOURCE_KEY_PREFIX = "i2p2i:source:"
# The BullMQ queues the bot has sent batches to (one per set of worker capabilities), for a restarted bot
# to look for its batches in.
QUEUES_KEY = "i2p2i:queues"
# Set by the bot on a batch it gave up on (too slow, or nobody wants it after a restart): its worker stops
# it at the next step. BullMQ cannot remove a job a worker holds, so the worker is asked instead.
CANCEL_KEY_PREFIX = "i2p2i:cancel:"
# How long a result's PNGs wait in Redis for the bot; longer than any outage the bot should ride out.
RESULT_TTL_S = 24 * 3600
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Reasons a worker gives when a batch fails: the first word says whose fault it is.
PERMANENT = "permanent"
TRANSIENT = "transient"


class WireError(ValueError):
    """A payload that does not have the shape this module writes."""


def job_id(run: str, batch_id: int, attempt: int) -> str:
    """The BullMQ job id of one try of a batch: unique per bot run, batch and attempt (BullMQ dedups it).

    A restarted bot finds the batches it sent by their payload's items, not by this id, so the run in it
    keeps a new run's batch numbers from colliding with an old run's jobs still in Redis.
    """
    return f"{run}-{batch_id}:{attempt}"


def attempt_of(bull_job_id: str) -> int:
    """The attempt a job id names (1 when it names none)."""
    _, _, attempt = bull_job_id.rpartition(":")
    return int(attempt) if attempt.isdigit() else 1


def batch_payload(batch: Batch, sources: dict[str, str] | None = None) -> dict[str, Any]:
    """A batch as the workers get it; `items` (job, image index) are for the bot, which finds the batches
    it sent before a restart by them; `sources` the sha256 of each guide source's PNG, by its name."""
    return {
        "sources": sources or {},
        "items": [[item.job_id, item.index] for item in batch.items],
        "params": {
            **dataclasses.asdict(batch.params),
            "keep": guides_json(batch.params.keep),
            "loras": loras_json(batch.params.loras),
        },
        "specs": [
            {
                "prompt": s.prompt,
                "negative_prompt": s.negative_prompt,
                "seed": s.seed,
                "source_embedding": None if s.source_embedding is None else list(s.source_embedding),
                "keep_flagged": s.keep_flagged,
                "guide_source": s.guide_source,
            }
            for s in batch.specs
        ],
    }


def payload_items(payload: Any) -> tuple[tuple[int, int], ...]:
    """The (job id, image index) of each image of a batch's payload; WireError when it has none."""
    try:
        items = tuple((int(job_id), int(index)) for job_id, index in payload["items"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"a batch without its items ({type(exc).__name__}: {exc})") from None
    if not items:
        raise WireError("a batch without images")
    return items


def batch_from_payload(payload: Any) -> tuple[GenerationParams, tuple[ImageSpec, ...]]:
    """The batch a payload carries; WireError when it is not one."""
    try:
        raw = payload["params"]
        params = GenerationParams(
            model=str(raw["model"]),
            steps=int(raw["steps"]),
            guidance=float(raw["guidance"]),
            width=int(raw["width"]),
            height=int(raw["height"]),
            scheduler=str(raw["scheduler"]),
            keep=check_guides(guides_from_json(raw.get("keep") or [])),
            loras=loras_from_json(raw.get("loras") or []),
            preset=str(raw["preset"]),
            upscale=raw.get("upscale") is True,
        )
        specs = tuple(
            ImageSpec(
                str(s["prompt"]),
                str(s["negative_prompt"]),
                int(s["seed"]),
                None if s["source_embedding"] is None else tuple(float(x) for x in s["source_embedding"]),
                guide_source=None if s.get("guide_source") is None else _hash(s["guide_source"]),
                keep_flagged=s.get("keep_flagged") is True,
            )
            for s in payload["specs"]
        )
    except (KeyError, TypeError, ValueError, GuideError) as exc:
        raise WireError(f"not a batch ({type(exc).__name__}: {exc})") from None
    if not specs:
        raise WireError("a batch without images")
    return params, specs


def payload_sources(payload: Any) -> dict[str, str]:
    """The sha256 of each guide source's PNG a batch's payload carries, by source name; WireError when
    they are malformed."""
    raw = payload.get("sources") if isinstance(payload, dict) else None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise WireError("a batch whose sources are not a mapping")
    return {_hash(name): _hash(digest) for name, digest in raw.items()}


def _hash(value: Any) -> str:
    """A sha256 in hex: a source's name is a file name on the worker, so nothing else may pass."""
    if not isinstance(value, str) or not _SHA256.match(value):
        raise WireError(f"not a sha256: {value!r}")
    return value


def as_request(params: GenerationParams, spec: ImageSpec) -> GenerationRequest:
    """One image of a batch as a member's request, for the worker to check with plan() again."""
    return GenerationRequest(
        spec.prompt,
        negative_prompt=spec.negative_prompt,
        count=1,
        seed=spec.seed,
        steps=params.steps,
        guidance=params.guidance,
        width=params.width,
        height=params.height,
        scheduler=params.scheduler,
        model=params.model,
        keep=params.keep,
        guide_source=spec.guide_source,
        loras=params.loras,
        preset=params.preset,
        upscale=params.upscale,
    )


def cancel_key(bull_job_id: str) -> str:
    return f"{CANCEL_KEY_PREFIX}{bull_job_id}"


def result_key(bull_job_id: str, index: int) -> str:
    return f"{RESULT_KEY_PREFIX}{bull_job_id}:{index}"


@dataclass(frozen=True)
class ImageRef:
    """Where one result PNG waits in Redis, and what the bot checks it against."""

    key: str
    sha256: str
    nsfw: bool
    fidelity: float | None


@dataclass(frozen=True)
class ResultRefs:
    images: tuple[ImageRef, ...]
    warnings: tuple[str, ...] = ()
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "images": [dataclasses.asdict(i) for i in self.images],
            "warnings": list(self.warnings),
            "timings_s": self.timings_s,
        }

    @classmethod
    def from_json(cls, raw: Any) -> ResultRefs:
        if isinstance(raw, str):
            raw = json.loads(raw)
        try:
            images = tuple(
                ImageRef(
                    str(i["key"]),
                    str(i["sha256"]),
                    bool(i["nsfw"]),
                    None if i["fidelity"] is None else float(i["fidelity"]),
                )
                for i in raw["images"]
            )
            warnings = tuple(str(w) for w in raw.get("warnings", ()))
            timings = {str(k): float(v) for k, v in raw.get("timings_s", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise WireError(f"not a result ({type(exc).__name__}: {exc})") from None
        return cls(images, warnings, timings)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def failure_reason(kind: str, reason: str) -> str:
    """A failed batch's reason as a worker reports it: `kind: sentence`."""
    return f"{kind}: {reason}"


def parse_failure(reason: str) -> tuple[str, str]:
    """(kind, sentence) of a failure reason; a reason BullMQ itself wrote (a stalled job) is transient."""
    kind, sep, sentence = reason.partition(": ")
    if sep and kind in (PERMANENT, TRANSIENT):
        return kind, sentence
    return TRANSIENT, reason
