"""Describes members wait on, kept in SQLite, so that a restart answers the ones a kill cut short.

A describe answers with a public "thinking…" placeholder, then replaces it with the card (or withdraws it
with a refusal). Killed in between, the bot would leave the placeholder thinking until Discord gives up on
it; instead each deferred describe is written down until it is answered, and the next start edits every
placeholder still thinking into one sentence while the interaction's token lives. The member tries again:
the download and the decoded picture died with the process, and the token would not outlive a GPU queue.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import discord

from i2p2i_bot.decode_queue import WAITING_LINE
from i2p2i_bot.i18n import N_, tr
from i2p2i_bot.job_controls import TOKEN_LIFETIME_S
from i2p2i_bot.replies import ANSWER_ERRORS, channel_locale
from i2p2i_bot.store import PendingDescribe

if TYPE_CHECKING:
    from i2p2i_bot.app import I2P2IBot

log = logging.getLogger("i2p2i.describes")

RESTARTED = N_("The bot restarted before your picture was described; please try again.")
# A token this close to its end is left alone: an edit would race the expiry.
TOKEN_MARGIN_S = 10.0


class PendingDescribes:
    """A service the bot owns (bot.pending_describes): `held` around each deferred describe, `start` once."""

    def __init__(self, bot: I2P2IBot) -> None:
        self.bot = bot

    @contextlib.asynccontextmanager
    async def held(
        self, interaction: discord.Interaction, deferred: discord.InteractionCallbackResponse | None
    ) -> AsyncIterator[None]:
        """Keep the describe of a deferred `interaction` in the store while the block runs.

        Whatever ends the block answers the member (the card, a refusal, the error handler's sentence), so
        the row goes; a cancel, which only a stopping bot causes, leaves it for the next start to answer.
        """
        message_id = deferred.message_id if deferred is not None else None
        if message_id is None:
            with contextlib.suppress(*ANSWER_ERRORS):
                message_id = (await interaction.original_response()).id
        created = interaction.created_at.timestamp()
        pending = PendingDescribe(
            interaction_id=interaction.id,
            application_id=interaction.application_id,
            token=interaction.token,
            message_id=message_id,
            user_id=interaction.user.id,
            channel_id=interaction.channel_id,
            created_at=created,
            expires_at=created + TOKEN_LIFETIME_S,
            locale=channel_locale(interaction),
        )
        store = self.bot.store
        await store.add_pending_describe(pending)
        try:
            yield
        except Exception:
            await store.remove_pending_describe(pending.interaction_id)
            raise
        await store.remove_pending_describe(pending.interaction_id)

    async def start(self) -> None:
        """Answer the describes an earlier run left waiting; call before the gateway connects, so that only
        those are read."""
        left = await self.bot.store.pending_describes()
        if left:
            self.bot.spawn(self._answer_all(left), name="i2p2i-restarted-describes")

    async def _answer_all(self, left: list[PendingDescribe]) -> None:
        for pending in left:
            try:
                await self._answer(pending)
            except Exception:
                log.exception("could not answer describe %d after the restart", pending.interaction_id)
            # Answered, or no longer answerable: either way once only, never in a loop.
            await self.bot.store.remove_pending_describe(pending.interaction_id)

    async def _answer(self, pending: PendingDescribe) -> None:
        if time.time() >= pending.expires_at - TOKEN_MARGIN_S or pending.message_id is None:
            log.info("describe %d for user %d ended with a restart", pending.interaction_id, pending.user_id)
            return
        webhook = discord.Webhook.partial(pending.application_id, pending.token, client=self.bot)
        try:
            # The card may have been posted just before the kill, with the row not yet gone: only a
            # placeholder still thinking, or still showing the waiting line, is replaced.
            message = await webhook.fetch_message(pending.message_id)
            if not message.flags.loading and message.content != tr(pending.locale, WAITING_LINE):
                return
            await webhook.edit_message(pending.message_id, content=tr(pending.locale, RESTARTED))
            log.info(
                "told user %d that the restart cut their describe %d short",
                pending.user_id,
                pending.interaction_id,
            )
        except ANSWER_ERRORS as exc:
            log.info("could not answer describe %d after the restart: %s", pending.interaction_id, exc)
