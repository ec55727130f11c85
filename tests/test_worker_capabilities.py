"""What workers offer, which batches that covers, the queues they share and why a batch waits."""

from __future__ import annotations

import dataclasses

from i2p2i_bot.config import GenerateSettings
from i2p2i_bot.guides import Guide
from i2p2i_bot.loras import Lora
from i2p2i_bot.presets import Preset, Presets, weights_name
from i2p2i_bot.request import GenerationParams
from i2p2i_bot.worker_capabilities import (
    BASE_QUEUE,
    Capabilities,
    Mismatch,
    needs,
    preset_ids,
    preset_weights,
    waiting_reason,
)

PLAIN = GenerationParams("fake", 4, 7.5, 64, 64, "dpm", preset="a")
INK = Lora("ink", 0.8, "1" * 64)
INKED = dataclasses.replace(PLAIN, loras=(INK, Lora("Blot", 1.0, "2" * 64)))
# The bot's presets, as its config resolves them: what identifies each one's weights.
BOT = {"a": "sd1:org/a", "b": "sdxl:b.safetensors"}
A = ("a", BOT["a"])
B = ("b", BOT["b"])


def test_a_batch_needs_its_preset_its_lora_files_and_its_guides() -> None:
    """needs() names what a worker must have; a worker with more runs it, one lacking any piece does not."""
    edged = dataclasses.replace(INKED, keep=(Guide("edges", 0.8),))
    assert needs(edged, BOT) == Capabilities(("edges",), (A,), (("Blot", "2" * 64), ("ink", "1" * 64)))
    wide = Capabilities.of(["edges", "layout"], [B, A], [("INK", "1" * 64), ("blot", "2" * 64)])
    assert wide.can_run(edged, BOT) and wide.can_run(PLAIN, BOT)
    assert not Capabilities.of(["edges"], [B], wide.loras).can_run(edged, BOT)
    # The same name with other bytes is not the file the batch pinned.
    assert not Capabilities.of(["edges"], [A], [("ink", "9" * 64), ("blot", "2" * 64)]).can_run(edged, BOT)


def test_a_preset_with_other_weights_than_the_bots_is_not_that_preset() -> None:
    """A worker whose config gives "a" another generator or family cannot run a batch of "a", is on
    another queue than a worker that matches, and its mismatch names both sides; a preset the bot does
    not have is nobody's mismatch, and a batch of it runs nowhere."""
    other_file = Capabilities.of(presets=[("a", "sd1:a.safetensors"), B])
    other_family = Capabilities.of(presets=[("a", "sd2:org/a"), B])
    matching = Capabilities.of(presets=[A, B])
    for differing in (other_file, other_family):
        assert not differing.can_run(PLAIN, BOT)
        assert differing.can_run(dataclasses.replace(PLAIN, preset="b"), BOT)
        assert differing.queue != matching.queue
        assert Capabilities.from_record(differing.record()) == differing
    assert matching.can_run(PLAIN, BOT)
    assert other_file.mismatches(BOT) == (Mismatch("a", "sd1:a.safetensors", "sd1:org/a"),)
    assert other_family.mismatches(BOT) == (Mismatch("a", "sd2:org/a", "sd1:org/a"),)
    assert Capabilities.of(presets=[A, ("c", "sd1:c")]).mismatches(BOT) == ()
    assert waiting_reason(PLAIN, [other_file], BOT) == "waiting for a GPU worker that has the model a"
    assert waiting_reason(PLAIN, [other_file, matching], BOT) is None
    unknown = dataclasses.replace(PLAIN, preset="c")
    assert not Capabilities.of(presets=[("c", "sd1:c")]).can_run(unknown, BOT)


def test_a_generators_weights_are_named_alike_on_every_machine() -> None:
    """A Hub id stays as written; a file or folder is named by itself, wherever it lies (the bot and a
    worker keep their weights in different folders); the family is part of what identifies a preset."""
    assert weights_name("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    assert weights_name("/srv/models/anime.safetensors") == weights_name("~/anime.safetensors")
    assert weights_name("C:\\models\\anime.safetensors") == "anime.safetensors"
    assert weights_name("org/anime.safetensors") == "anime.safetensors"
    assert weights_name("/data/models/anime/") == weights_name("./anime") == "anime"
    settings = GenerateSettings()
    presets = Presets(
        {
            "a": Preset("a", "/x/anime.safetensors", "sdxl", "clip", settings),
            "b": Preset("b", "org/b", "sd1", "clip", settings),
        },
        "a",
    )
    assert preset_weights(presets) == {"a": "sdxl:anime.safetensors", "b": "sd1:org/b"}
    assert preset_ids(presets, ["b"]) == (("b", "sd1:org/b"),)


def test_workers_alike_share_a_queue_and_workers_that_differ_never_do() -> None:
    """The queue is named for the whole set, in any order; a record round-trips; an unreadable or
    pre-capability record offers nothing and gets the base queue, where nothing is sent."""
    ab = Capabilities.of(presets=[B, A], loras=[("ink", "1" * 64)])
    assert ab.queue == Capabilities.of(presets=[A, B], loras=[("ink", "1" * 64)]).queue
    assert ab.queue != Capabilities.of(presets=[A], loras=[("ink", "1" * 64)]).queue
    assert ab.queue != Capabilities.of(presets=[A, B]).queue
    assert Capabilities.from_record(ab.record()) == ab
    assert Capabilities.from_record({"guides": "[]"}).queue == BASE_QUEUE
    assert Capabilities.from_record({"presets": "not json"}) == Capabilities()
    assert not Capabilities().can_run(PLAIN, BOT)


def test_a_batch_nobody_live_can_run_says_what_it_waits_for() -> None:
    """The model when no live worker has it; otherwise the LoRAs the closest worker with it lacks, then
    its guides; nothing when one can run it."""
    only_b = Capabilities.of(presets=[B], loras=[("ink", "1" * 64)])
    assert waiting_reason(PLAIN, [only_b], BOT) == "waiting for a GPU worker that has the model a"
    has_ink = Capabilities.of(presets=[A], loras=[("ink", "1" * 64)])
    assert waiting_reason(INKED, [only_b, has_ink], BOT) == "waiting for a GPU worker that has the LoRA Blot"
    assert (
        waiting_reason(INKED, [Capabilities.of(presets=[A])], BOT)
        == "waiting for a GPU worker that has the LoRAs Blot and ink"
    )
    edged = dataclasses.replace(PLAIN, keep=(Guide("depth", 0.5),))
    assert waiting_reason(edged, [has_ink], BOT) == "waiting for a GPU worker that can keep depth"
    assert waiting_reason(edged, [], BOT) == "waiting for a GPU worker that can keep depth"
    assert waiting_reason(PLAIN, [], BOT) == "waiting for a GPU worker"
    assert waiting_reason(PLAIN, [only_b, has_ink], BOT) is None
