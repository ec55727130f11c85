"""Reply-edit: a member replies to a card or a result with text instead of opening the Edit modal.

Only with `discord.reply_edits = true`, which asks Discord for the privileged message-content intent
(docs/permissions.md). A reply to a card updates the prompt its Generate and Edit prompt use and answers with
the card as it now stands; a reply to a result makes it again, as Edit & regenerate does, with the edited
prompt. How a reply reads: i2p2i_bot/prompt_edits.py. Replies from anyone but the card's or the job's owner,
and messages that are no replies to the bot, are left alone.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

from cogs.imagine import card_message
from i2p2i_bot.i18n import translate
from i2p2i_bot.job_controls import planned_for, start_job_from_reply
from i2p2i_bot.jobs import FROM_REPLY, JobRequest
from i2p2i_bot.prompt_edits import ReplyError, read_reply
from i2p2i_bot.replies import USER_ERRORS, message_locale
from i2p2i_bot.request import GenerationRequest

if TYPE_CHECKING:
    from i2p2i_bot.app import I2P2IBot

log = logging.getLogger("i2p2i.reply_edit")

_CARD = re.compile(r"i2p:card:gen:(?P<card>\d+):(?P<count>\d+)$")
_JOB = re.compile(r"i2p:job:\w+:(?P<job>\d+)$")
# What a member may be told in a reply; anything else is a bug, logged, and answered with one line.
_MEMBER_ERRORS: tuple[type[Exception], ...] = (*USER_ERRORS, ReplyError)


class ReplyEditCog(commands.Cog, name="ReplyEdit"):
    def __init__(self, bot: I2P2IBot) -> None:
        self.bot = bot

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        bot = self.bot
        if (
            not bot.settings.discord.reply_edits
            or message.author.bot
            or message.reference is None
            or message.reference.message_id is None
            or bot.user is None
        ):
            return
        target = await self._replied_to(message)
        if target is None or target.author.id != bot.user.id:
            return
        ids = [
            custom_id
            for row in target.components
            for child in getattr(row, "children", ())
            if isinstance(custom_id := getattr(child, "custom_id", None), str)
        ]
        card = next((m for i in ids if (m := _CARD.match(i))), None)
        job = next((m for i in ids if (m := _JOB.match(i))), None)
        try:
            if card is not None:
                await self._edit_card(message, int(card["card"]), int(card["count"]))
            elif job is not None:
                await self._make_again(message, int(job["job"]))
        except _MEMBER_ERRORS as exc:
            await self._answer(message, str(exc))
        except Exception:
            log.exception("reply %d to message %d failed", message.id, target.id)
            await self._answer(message, "Sorry, something went wrong reading that reply; use Edit instead.")

    async def _replied_to(self, message: discord.Message) -> discord.Message | None:
        reference = message.reference
        assert reference is not None and reference.message_id is not None
        if isinstance(reference.resolved, discord.Message):
            return reference.resolved
        try:
            return await message.channel.fetch_message(reference.message_id)
        except discord.HTTPException:
            return None

    async def _edit_card(self, message: discord.Message, card_id: int, count: int) -> None:
        bot = self.bot
        stored = await bot.store.get_interrogation(card_id)
        if stored is None or stored.user_id != message.author.id:
            return  # gone, or another member's card: not theirs to edit
        choices = await bot.store.card_choices(card_id)
        current = choices.prompt or stored.interrogation.image_prompts[0]
        edit = read_reply(message.content, current)
        if not edit.changed:
            return
        guild_id = message.guild.id if message.guild is not None else None
        # The one validator, as Generate will ask: banned terms, an empty or too long prompt, LoRAs that fit
        # the card's model.
        check = GenerationRequest(edit.prompt, negative_prompt=edit.negative, count=1, preset=choices.preset)
        await planned_for(bot, guild_id, JobRequest(owner_id=message.author.id, request=check))
        await bot.store.set_card_prompt(
            card_id, None if edit.prompt == stored.interrogation.prompt else edit.prompt
        )
        if edit.negative is not None:
            await bot.store.set_card_negative(card_id, edit.negative)
        log.info("card %d edited by a reply of user %d", card_id, message.author.id)
        answer = await card_message(
            bot,
            stored,
            message.author.display_name,
            count,
            None,
            guild_id=guild_id,
            locale=message_locale(message),
        )
        await message.reply(**answer, mention_author=False)

    async def _make_again(self, message: discord.Message, job_id: int) -> None:
        bot = self.bot
        job = await bot.store.get_job(job_id)
        if job is None or job.owner_id != message.author.id:
            return
        edit = read_reply(message.content, job.request.prompt)
        if not edit.changed:
            return
        changes: dict[str, str] = {"prompt": edit.prompt}
        if edit.negative is not None:
            changes["negative_prompt"] = edit.negative
        draft = job.reroll(message.author.id, origin=FROM_REPLY, **changes)
        await start_job_from_reply(bot, message, draft)

    async def _answer(self, message: discord.Message, text: str) -> None:
        try:
            await message.reply(translate(text, message_locale(message)), mention_author=False)
        except discord.HTTPException as exc:
            log.warning("could not answer reply %d: %s", message.id, exc)


async def setup(bot: I2P2IBot) -> None:
    await bot.add_cog(ReplyEditCog(bot))
