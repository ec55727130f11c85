"""Describes under load through the real bot: a cap per member, and turns on the GPU for everyone.

The stand-in engine records the order of its GPU calls; the loopback Discord records every answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image

from i2p2i_bot.app import I2P2IBot
from i2p2i_bot.batches import BatchResult, StepCallback
from i2p2i_bot.config import Settings
from i2p2i_bot.gpu import Priority
from i2p2i_bot.interrogation import Interrogation
from i2p2i_bot.request import GenerationParams, ImageSpec
from tests.bot_harness import bot_settings, png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord, InteractionHandle
from tests.fake_engine import FakeEngine

CALLBACK = "POST /interactions/{interaction}/{token}/callback"
FOLLOWUP = "POST /webhooks/{app}/{token}"
DEFERRED = 5
MESSAGE = 4
EPHEMERAL = 64


class RecordingEngine(FakeEngine):
    """The stand-in engine, noting each GPU call: which picture it described (by width), or a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def interrogate(
        self, image: Image.Image, mode: str, key: str | None = None, preset: str | None = None
    ) -> Interrogation:
        self.calls.append(f"describe {image.width}")
        return super().interrogate(image, mode, key, preset)

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: StepCallback | None = None
    ) -> BatchResult:
        self.calls.append(f"generate {len(specs)}")
        return super().generate_batch(params, specs, on_step)


def settings_with_cap(base: Settings, data_dir: Path, server: FakeDiscord, cap: int) -> Settings:
    settings = bot_settings(base, data_dir, server)
    interrogate = dataclasses.replace(settings.interrogate, max_describes_per_user=cap)
    return dataclasses.replace(settings, interrogate=interrogate)


def picture(width: int) -> bytes:
    """A picture told apart from the others by its width (RecordingEngine notes it)."""
    return png_bytes(Image.new("RGB", (width, 64), (width, 90, 140)))


@contextlib.contextmanager
def gpu_blocked(bot: I2P2IBot) -> Iterator[None]:
    """Hold the GPU thread, so everything submitted meanwhile waits until the block ends. The hold has
    started when this returns: it no longer counts among the GPU queue's pending tasks."""
    gate, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        gate.wait()

    bot.gpu.submit(hold, priority=Priority.URGENT)
    assert holding.wait(10), "the GPU thread never took the hold"
    try:
        yield
    finally:
        gate.set()


async def describe(server: FakeDiscord, width: int, user: str) -> InteractionHandle:
    upload = server.add_attachment(picture(width), f"{width}.png")
    return await server.push_slash("imagine-from", {"image": upload, "count": 1}, user=user)


async def queued_on_gpu(server: FakeDiscord, bot: I2P2IBot, tasks: int) -> None:
    await server.wait_until(lambda: bot.gpu.pending() == tasks or None, timeout_s=20, what=f"{tasks} tasks")


async def test_a_describe_flood_leaves_another_members_card_and_a_job_their_turn(
    server: FakeDiscord, base_settings: Settings, tmp_path: Path
) -> None:
    """Alice's three describes are queued first, then Bob's describe, then Mod's one-image job: Bob's card
    waits behind one of Alice's, the job behind one describe each, and Alice's others come after."""
    engine = RecordingEngine()
    settings = bot_settings(base_settings, tmp_path / "data", server)
    async with running_i2p2i(settings, server, engine) as bot:
        with gpu_blocked(bot):
            alices = []
            for width in (64, 72, 80):  # each reaches the GPU queue before the next is sent
                alices.append(await describe(server, width, "alice"))
                await queued_on_gpu(server, bot, len(alices))
            bobs = await describe(server, 96, "bob")
            await queued_on_gpu(server, bot, 4)
            job = await server.push_slash("imagine", {"prompt": "a lighthouse", "count": 1}, user="mod")
            await queued_on_gpu(server, bot, 5)
        for handle in (*alices, bobs):
            await handle.wait_followup(timeout_s=20)
        await job.wait_followup(timeout_s=20)
        await server.wait_until(lambda: job.original is not None and job.original.attachments, timeout_s=20)

    assert engine.calls == ["describe 64", "describe 96", "generate 1", "describe 72", "describe 80"]
    for handle in (*alices, bobs):
        (callback,) = handle.callbacks()
        assert callback.json["type"] == DEFERRED
        card = handle.original
        assert card is not None and not card.ephemeral and card.embeds[0]["title"] == "Prompt · best"


async def test_describes_past_the_cap_are_refused_privately_before_any_answer(
    server: FakeDiscord, base_settings: Settings, tmp_path: Path
) -> None:
    """With two describes in flight, Alice's third /imagine-from and a Re-describe are refused with one
    private sentence naming the cap, as their first answer; once a card is posted she may describe again."""
    engine = RecordingEngine()
    settings = settings_with_cap(base_settings, tmp_path / "data", server, cap=2)
    async with running_i2p2i(settings, server, engine) as bot:
        first = await describe(server, 64, "alice")
        await first.wait_followup(timeout_s=20)
        card = first.original
        assert card is not None
        # Its slot is handed back just after the card is posted.
        alice = server.user("alice").id
        await server.wait_until(lambda: bot.describes.count(alice) == 0 or None, timeout_s=10)
        with gpu_blocked(bot):
            in_flight = []
            for width in (72, 80):  # one after the other reaches the GPU queue, so 72 is first
                in_flight.append(await describe(server, width, "alice"))
                await queued_on_gpu(server, bot, len(in_flight))
            too_many = await describe(server, 88, "alice")
            refused = await too_many.wait_response()
            mode_select = next(c for c in card.custom_ids() if c.startswith("i2p:card:mode:"))
            redescribe = await server.push_select(card, mode_select, ["fast"], user="alice")
            refused_redescribe = await redescribe.wait_response()
            bobs = await describe(server, 96, "bob")  # the cap is per member
            await queued_on_gpu(server, bot, 3)
            assert bot.describes.count(server.user("alice").id) == 2
        for handle in (*in_flight, bobs):
            await handle.wait_followup(timeout_s=20)
        await server.wait_until(lambda: bot.describes.count(alice) == 0 or None, timeout_s=10)
        again = await describe(server, 104, "alice")
        await again.wait_followup(timeout_s=20)

    sentence = (
        "You already have 2 pictures being described, the most at once; wait for a card, then ask again."
    )
    for answer in (refused, refused_redescribe):
        assert answer.json["type"] == MESSAGE
        assert answer.json["data"]["content"] == sentence
        assert answer.json["data"]["flags"] & EPHEMERAL
    assert [c.json["type"] for c in too_many.callbacks()] == [MESSAGE]
    assert too_many.calls(FOLLOWUP) == [] and redescribe.calls(FOLLOWUP) == []
    assert [c.json["type"] for c in again.callbacks()] == [DEFERRED]
    assert engine.calls == ["describe 64", "describe 72", "describe 96", "describe 80", "describe 104"]
    assert bot.describes.count(server.user("alice").id) == 0
