"""Describes under load through the real bot: turns on the GPU for everyone.

The stand-in engine records the order of its GPU calls; the loopback Discord records every answer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
from PIL import Image

from i2p2i_bot.app import I2P2IBot
from i2p2i_bot.batches import BatchResult, StepCallback
from i2p2i_bot.config import Settings
from i2p2i_bot.gpu import Priority
from i2p2i_bot.interrogation import Interrogation
from i2p2i_bot.request import GenerationParams, ImageSpec
from tests.bot_harness import bot_settings, png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord, InteractionHandle, running_fake_discord
from tests.fake_engine import FakeEngine

DEFERRED = 5


class RecordingEngine(FakeEngine):
    """The stand-in engine, noting each GPU call: which picture it described (by width), or a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def interrogate(self, image: Image.Image, mode: str, key: str | None = None) -> Interrogation:
        self.calls.append(f"describe {image.width}")
        return super().interrogate(image, mode, key)

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: StepCallback | None = None
    ) -> BatchResult:
        self.calls.append(f"generate {len(specs)}")
        return super().generate_batch(params, specs, on_step)


@pytest.fixture
async def server() -> AsyncIterator[FakeDiscord]:
    async with running_fake_discord() as fake:
        yield fake


def picture(width: int) -> bytes:
    """A picture told apart from the others by its width (RecordingEngine notes it)."""
    return png_bytes(Image.new("RGB", (width, 64), (width, 90, 140)))


@contextlib.contextmanager
def gpu_blocked(bot: I2P2IBot) -> Iterator[None]:
    """Hold the GPU thread, so everything submitted meanwhile waits until the block ends."""
    gate = threading.Event()
    bot.gpu.submit(gate.wait, priority=Priority.URGENT)
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
            alices = [await describe(server, width, "alice") for width in (64, 72, 80)]
            await queued_on_gpu(server, bot, 3)
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
