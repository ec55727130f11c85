"""What workers offer, which batches that covers, the queues they share and why a batch waits."""

from __future__ import annotations

import dataclasses

from i2p2i_bot.guides import Guide
from i2p2i_bot.loras import Lora
from i2p2i_bot.request import GenerationParams
from i2p2i_bot.worker_capabilities import BASE_QUEUE, Capabilities, needs, waiting_reason

PLAIN = GenerationParams("fake", 4, 7.5, 64, 64, "dpm", preset="a")
INK = Lora("ink", 0.8, "1" * 64)
INKED = dataclasses.replace(PLAIN, loras=(INK, Lora("Blot", 1.0, "2" * 64)))


def test_a_batch_needs_its_preset_its_lora_files_and_its_guides() -> None:
    """needs() names what a worker must have; a worker with more runs it, one lacking any piece does not."""
    edged = dataclasses.replace(INKED, keep=(Guide("edges", 0.8),))
    assert needs(edged) == Capabilities(("edges",), ("a",), (("Blot", "2" * 64), ("ink", "1" * 64)))
    wide = Capabilities.of(["edges", "layout"], ["b", "a"], [("INK", "1" * 64), ("blot", "2" * 64)])
    assert wide.can_run(edged) and wide.can_run(PLAIN)
    assert not Capabilities.of(["edges"], ["b"], wide.loras).can_run(edged)
    # The same name with other bytes is not the file the batch pinned.
    assert not Capabilities.of(["edges"], ["a"], [("ink", "9" * 64), ("blot", "2" * 64)]).can_run(edged)


def test_workers_alike_share_a_queue_and_workers_that_differ_never_do() -> None:
    """The queue is named for the whole set, in any order; a record round-trips; an unreadable or
    pre-capability record offers nothing and gets the base queue, where nothing is sent."""
    ab = Capabilities.of(presets=["b", "a"], loras=[("ink", "1" * 64)])
    assert ab.queue == Capabilities.of(presets=["a", "b"], loras=[("ink", "1" * 64)]).queue
    assert ab.queue != Capabilities.of(presets=["a"], loras=[("ink", "1" * 64)]).queue
    assert ab.queue != Capabilities.of(presets=["a", "b"]).queue
    assert Capabilities.from_record(ab.record()) == ab
    assert Capabilities.from_record({"guides": "[]"}).queue == BASE_QUEUE
    assert Capabilities.from_record({"presets": "not json"}) == Capabilities()
    assert not Capabilities().can_run(PLAIN)


def test_a_batch_nobody_live_can_run_says_what_it_waits_for() -> None:
    """The model when no live worker has it; otherwise the LoRAs the closest worker with it lacks, then
    its guides; nothing when one can run it."""
    only_b = Capabilities.of(presets=["b"], loras=[("ink", "1" * 64)])
    assert waiting_reason(PLAIN, [only_b]) == "waiting for a GPU worker that has the model a"
    has_ink = Capabilities.of(presets=["a"], loras=[("ink", "1" * 64)])
    assert waiting_reason(INKED, [only_b, has_ink]) == "waiting for a GPU worker that has the LoRA Blot"
    assert (
        waiting_reason(INKED, [Capabilities.of(presets=["a"])])
        == "waiting for a GPU worker that has the LoRAs Blot and ink"
    )
    edged = dataclasses.replace(PLAIN, keep=(Guide("depth", 0.5),))
    assert waiting_reason(edged, [has_ink]) == "waiting for a GPU worker that can keep depth"
    assert waiting_reason(edged, []) == "waiting for a GPU worker that can keep depth"
    assert waiting_reason(PLAIN, []) == "waiting for a GPU worker"
    assert waiting_reason(PLAIN, [only_b, has_ink]) is None
