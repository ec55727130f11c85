"""Decoding members' uploads within the memory budget, through the loopback Discord."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from i2p2i_bot import images
from i2p2i_bot.config import IntakeSettings, Settings
from i2p2i_bot.decode_queue import WAITING_LINE, DecodeQueue
from i2p2i_bot.images import ImageError, decode_cost
from tests.bot_harness import bot_settings, png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord
from tests.fake_engine import FakeEngine

FOLLOWUP = "POST /webhooks/{app}/{token}"
EDIT = "PATCH /webhooks/{app}/{token}/messages/{message}"
# Room for one 1500×1500 RGB picture's decoding (8 bytes a pixel: 17.2 MiB), not for two.
BUDGET_MB = 20


def budget_settings(base_settings: Settings, tmp_path: Path, server: FakeDiscord) -> Settings:
    settings = bot_settings(base_settings, tmp_path / "data", server)
    return dataclasses.replace(
        settings, intake=dataclasses.replace(settings.intake, decode_memory_mb=BUDGET_MB)
    )


def picture(side: int, colour: str) -> bytes:
    return png_bytes(Image.new("RGB", (side, side), colour))


def test_decode_cost_is_read_from_the_header() -> None:
    """What a decode holds at its peak, per pixel: the frame as Pillow keeps it plus the RGB result."""
    assert decode_cost(picture(300, "teal")) == 300 * 300 * 8
    assert decode_cost(png_bytes(Image.new("L", (300, 200)))) == 300 * 200 * 5
    assert decode_cost(png_bytes(Image.new("LA", (300, 200)))) == 300 * 200 * 12
    webp = io.BytesIO()
    Image.new("RGB", (300, 200)).save(webp, format="WEBP")
    assert decode_cost(webp.getvalue()) == 300 * 200 * 18
    with pytest.raises(ImageError, match="the limit is"):
        decode_cost(picture(300, "teal"), IntakeSettings(max_pixels=300 * 299))


async def test_two_big_uploads_are_decoded_one_after_the_other(
    server: FakeDiscord, base_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for one decode, a second big upload waits until the first is decoded, and its member sees
    the waiting line in place of "thinking…", which the card then replaces."""
    decodes: list[str] = []
    first_entered, first_may_go = threading.Event(), threading.Event()
    real_decode = images._decode

    def decode(data: bytes, limits: IntakeSettings) -> Any:
        with Image.open(io.BytesIO(data)) as header:
            side = header.width
        decodes.append(f"start {side}")
        if side == 1500:
            first_entered.set()
            first_may_go.wait(30)
        try:
            return real_decode(data, limits)
        finally:
            decodes.append(f"end {side}")

    monkeypatch.setattr(images, "_decode", decode)
    settings = budget_settings(base_settings, tmp_path, server)
    async with running_i2p2i(settings, server, FakeEngine()) as bot:
        first = server.add_attachment(picture(1500, "teal"), "first.png")
        alice = await server.push_slash("imagine-from", {"image": first}, user="alice")
        assert await asyncio.to_thread(first_entered.wait, 30)
        second = server.add_attachment(picture(1400, "orange"), "second.png")
        bob = await server.push_slash("imagine-from", {"image": second}, user="bob")
        waiting = await server.wait_until(
            lambda: (bob.original is not None and bob.original.content == WAITING_LINE) or None,
            timeout_s=10,
            what="bob's waiting line",
        )
        assert waiting and decodes == ["start 1500"]
        first_may_go.set()

        await alice.wait_followup(timeout_s=30)
        card = await server.wait_until(
            lambda: (bob.original is not None and bob.original.embeds and bob.original) or None,
            timeout_s=30,
            what="bob's card",
        )
        assert decodes == ["start 1500", "end 1500", "start 1400", "end 1400"]
        costs = [1500 * 1500 * 8, 1400 * 1400 * 8]
        assert bot.decodes.budget.peak_bytes == max(costs)
        # A picture's bytes are handed back just after its card is posted.
        await server.wait_until(lambda: bot.decodes.budget.in_use_bytes == 0 or None, timeout_s=10)
        # Bob's waiting line became his card, in place: no second message, no line left behind.
        assert card.content == "" and card.embeds[0]["title"] == "Prompt · best"
        assert any(c.startswith("i2p:card:gen:") for c in card.custom_ids())
        assert [c.json.get("content") for c in bob.calls(EDIT)] == [WAITING_LINE, None]
        assert bob.calls(FOLLOWUP) == []
        # Alice never waited: her card replaced her "thinking…" as the first follow-up.
        assert alice.calls(EDIT) == [] and len(alice.calls(FOLLOWUP)) == 1


async def test_an_upload_needing_more_than_the_whole_budget_is_refused(
    server: FakeDiscord, base_settings: Settings, tmp_path: Path
) -> None:
    """A picture whose decoding alone would take more than all of decode_memory_mb is refused privately
    with one sentence, before it is decoded."""
    settings = budget_settings(base_settings, tmp_path, server)
    async with running_i2p2i(settings, server, FakeEngine()) as bot:
        upload = server.add_attachment(picture(2000, "teal"), "big.png")
        handle = await server.push_slash("imagine-from", {"image": upload})
        call = await handle.wait_followup(timeout_s=30)
        assert call.json["flags"] & 64
        assert call.json["content"] == (
            "Reading that image would take about 31 MB of memory, more than the 20 MB I may use for "
            "reading pictures; send a smaller version."
        )
        assert bot.decodes.budget.peak_bytes == 0
        assert await bot.store.recent_interrogations(server.user("alice").id) == []


class Member:
    """What DecodeQueue uses of an interaction."""

    def __init__(self, interaction_id: int) -> None:
        self.id = interaction_id
        self.extras: dict[str, Any] = {}
        self.user = self
        # In a direct message, in English: the waiting line is in the channel's language.
        self.guild_id, self.guild_locale, self.locale = None, None, "en-US"
        self.edits: list[dict[str, Any]] = []
        self.edited = asyncio.Event()

    async def edit_original_response(self, **fields: Any) -> None:
        self.edits.append(fields)
        self.edited.set()


async def test_a_decoded_picture_counts_until_its_describe_ends() -> None:
    """Inside kept_for the picture a decode made stays counted (4 bytes a pixel) until the block ends, so
    the next big upload waits for the describe, not just the decode; outside it nothing stays."""
    queue = DecodeQueue(IntakeSettings(decode_memory_mb=BUDGET_MB))
    alice, bob = Member(1), Member(2)
    async with queue.kept_for(alice):  # type: ignore[arg-type]
        await queue.load(alice, picture(1500, "teal"))  # type: ignore[arg-type]
        assert queue.budget.in_use_bytes == 1500 * 1500 * 4
        waiting = asyncio.create_task(queue.load(bob, picture(1400, "orange")))  # type: ignore[arg-type]
        await asyncio.wait_for(bob.edited.wait(), 10)
        assert bob.edits == [{"content": WAITING_LINE}] and not waiting.done()
    await waiting
    assert queue.budget.in_use_bytes == 0 and alice.edits == []
    assert queue.budget.peak_bytes == 1500 * 1500 * 8
