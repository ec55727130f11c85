"""Members' uploads decoded off the event loop, as many at once as the memory budget holds.

Decoding a large picture takes several times its pixel count in bytes for a moment (images.decode_cost),
and the picture it makes stays in memory until its card is posted, GPU queue included; six members
sending 36-megapixel pictures at once would take all of it together. Each decode reserves its cost, read
from the upload's header, in one budget (intake.decode_memory_mb), and inside `kept_for` keeps the part its
picture holds until the describe ends. Uploads that do not fit wait their turn, in order, and their
members see a waiting line in place of "thinking…" meanwhile.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import discord

from i2p2i_bot.config import IntakeSettings
from i2p2i_bot.i18n import N_, tr
from i2p2i_bot.images import ImageError, Intake, decode_cost, held_bytes, load_intake
from i2p2i_bot.memory_budget import MemoryBudget
from i2p2i_bot.replies import ANSWER_ERRORS, channel_locale

log = logging.getLogger("i2p2i.intake")

WAITING_LINE = N_("⏳ Waiting for memory to read your picture…")
# Set in an interaction's extras once its deferred answer shows the waiting line: that answer is no
# longer a placeholder a follow-up replaces, so the describe's answer edits it (answer_deferred).
_SHOWS_WAITING = "i2p2i.shows_waiting_line"
_MIB = 1024 * 1024


class DecodeQueue:
    """A service the bot owns (bot.decodes); `load` is the bot's one way to decode a member's upload."""

    def __init__(self, limits: IntakeSettings) -> None:
        self.limits = limits
        self.budget = MemoryBudget(limits.decode_memory_bytes)
        # Bytes the pictures decoded for each interaction inside kept_for hold, by interaction id.
        self._kept: collections.Counter[int] = collections.Counter()

    @contextlib.asynccontextmanager
    async def kept_for(self, interaction: discord.Interaction) -> AsyncIterator[None]:
        """Count the pictures `load` decodes for `interaction` against the budget until the block ends."""
        self._kept[interaction.id] = 0
        try:
            yield
        finally:
            self.budget.release(self._kept.pop(interaction.id))

    async def load(self, interaction: discord.Interaction, data: bytes) -> Intake:
        """Decode `data` (load_intake) once its cost fits the budget, telling the member if they must wait.

        `interaction` has been deferred. Raises ImageError as load_intake does, and for an upload whose
        decoding would need more than the whole budget.
        """
        cost = await asyncio.to_thread(decode_cost, data, self.limits)
        if not self.budget.fits(cost):
            raise ImageError(
                f"Reading that image would take about {math.ceil(cost / _MIB)} MB of memory, more than the "
                f"{self.limits.decode_memory_mb} MB I may use for reading pictures; send a smaller version."
            )

        async def say_waiting() -> None:
            log.info("upload for user %d waits for %d MB to decode", interaction.user.id, cost // _MIB)
            await show_waiting(interaction)

        await self.budget.acquire(cost, on_wait=say_waiting)
        try:
            intake = await asyncio.to_thread(load_intake, data, self.limits)
        except BaseException:
            self.budget.release(cost)
            raise
        kept = 0
        if interaction.id in self._kept:
            kept = min(cost, held_bytes(intake.image))
            self._kept[interaction.id] += kept
        self.budget.release(cost - kept)
        return intake


async def show_waiting(interaction: discord.Interaction) -> None:
    """Replace a deferred answer's "thinking…" with the waiting line; the describe goes on if it fails."""
    # Set first: if the edit's answer is lost it may still have been applied, and editing the answer
    # again at the end is right in both cases.
    interaction.extras[_SHOWS_WAITING] = True
    try:
        # The placeholder is public: in the channel's language.
        await interaction.edit_original_response(content=tr(channel_locale(interaction), WAITING_LINE))
    except ANSWER_ERRORS as exc:
        log.info("interaction %s: could not show the waiting line (%s)", interaction.id, exc)


async def answer_deferred(interaction: discord.Interaction, message: dict[str, Any]) -> None:
    """Post a deferred describe's answer (send()'s keywords, one `file` at most) in place of its
    placeholder: the first follow-up replaces "thinking…", the waiting line is edited instead."""
    if not interaction.extras.get(_SHOWS_WAITING):
        await interaction.followup.send(**message)
        return
    edit = dict(message)
    file = edit.pop("file", None)
    await interaction.edit_original_response(
        content=edit.pop("content", None), attachments=[file] if file is not None else [], **edit
    )
