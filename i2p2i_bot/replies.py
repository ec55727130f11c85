"""What a member is told when something goes wrong: one sentence for their mistakes, an error id for ours.

A GPU that failed is the exception among ours: it is logged like a bug, but a sentence says what happens.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import aiohttp
import discord
from discord import app_commands

from i2p2i_bot.describes_in_flight import DescribeRefused
from i2p2i_bot.gpu import GpuFault, GpuOutOfMemory
from i2p2i_bot.i18n import N_, tr, translate
from i2p2i_bot.images import ImageError
from i2p2i_bot.interrogate import InterrogateError
from i2p2i_bot.jobs import JobRefused
from i2p2i_bot.request import GenerationError

log = logging.getLogger("i2p2i.discord")


class Refusal(app_commands.AppCommandError):
    """Something a member may not do or must fix (not their job, a banned term...); one sentence for them.

    An AppCommandError, so that raised from a check it still reaches the tree's error handler.
    """


USER_ERRORS: tuple[type[Exception], ...] = (
    Refusal,
    ImageError,
    JobRefused,
    DescribeRefused,
    GenerationError,
    InterrogateError,
    GpuOutOfMemory,
)


# A CUDA error left the GPU unusable: the bot stops and its service manager starts it again (app.py's
# EXIT_GPU_LOST), so nothing in the request was wrong and the same request works after the restart.
GPU_FAULT_MESSAGE = N_("The GPU stopped working; the bot is restarting, so try again in a minute.")


# Discord's refusals, and a connection that dropped before Discord answered.
ANSWER_ERRORS: tuple[type[Exception], ...] = (
    discord.HTTPException,
    aiohttp.ClientError,
    OSError,
    TimeoutError,
)


# What a public "thinking…" placeholder becomes when its work came to nothing; why is told privately.
WITHDRAWN = N_("This request did not go through; only the member who made it was told why.")
# Set in Interaction.extras while a public "thinking…" placeholder waits for the message it becomes.
_PLACEHOLDER = "i2p2i.public_placeholder"


# Discord refusing because the world changed under a reply (the channel or message went, a right was taken
# away, the token ran out): not a bug, so no traceback, and a sentence instead of an error id.
WORLD_CHANGED = {
    10003: N_("this channel no longer exists"),
    10008: N_("the message I was answering was deleted"),
    10015: N_("this interaction has expired"),
    10062: N_("this interaction has expired"),
    50001: N_("I can no longer see this channel"),
    50013: N_("I am missing a permission in this channel"),
    50027: N_("this interaction has expired"),
}


def _unwrapped(error: BaseException) -> BaseException:
    """The exception a command raised, rather than discord.py's wrapper around it."""
    return error.original if isinstance(error, app_commands.CommandInvokeError) else error


def user_message(error: BaseException) -> str | None:
    """The sentence for an error the member caused or a failed GPU, or None when it is a bug."""
    error = _unwrapped(error)
    if isinstance(error, GpuFault):
        return GPU_FAULT_MESSAGE
    if isinstance(error, USER_ERRORS):
        return str(error)
    if isinstance(error, discord.HTTPException) and error.code in WORLD_CHANGED:
        return N_("I could not finish that: {reason}.").format(reason=WORLD_CHANGED[error.code])
    if isinstance(error, app_commands.CommandOnCooldown):
        return N_("Slow down a little: try again in {seconds} s.").format(seconds=f"{error.retry_after:.0f}")
    if isinstance(error, app_commands.CheckFailure | app_commands.MissingPermissions):
        return N_("You are not allowed to use that here.")
    return None


async def report_error(interaction: discord.Interaction, error: BaseException) -> None:
    """Tell the member what went wrong, ephemerally, whether or not the interaction was answered yet."""
    message = user_message(error)
    fault = _unwrapped(error)
    if message is None:
        error_id = secrets.token_hex(4)
        log.error(
            "error %s in interaction %s (user %s)",
            error_id,
            interaction.id,
            interaction.user.id,
            exc_info=error,
        )
        message = N_(
            "Sorry, something went wrong on my side (error id `{error}`); it has been logged."
        ).format(error=error_id)
    elif isinstance(fault, GpuFault):
        # Not the member's doing, and an operator needs the CUDA error behind it (the fault's cause).
        log.error(
            "the GPU failed in interaction %s (user %s)", interaction.id, interaction.user.id, exc_info=fault
        )
    else:
        log.info("refused interaction %s for user %s: %s", interaction.id, interaction.user.id, message)
    await reply(interaction, message)


async def think_in_public(
    interaction: discord.Interaction,
) -> discord.InteractionCallbackResponse[Any] | None:
    """Answer with a public "thinking…" placeholder, for work whose answer is a public message.

    Discord turns the first followup after it into that placeholder, public whatever its flags say; until
    placeholder_replaced is called, reply first makes the placeholder a neutral line (WITHDRAWN), after which
    an ephemeral followup stays private. So refuse what can be refused before calling this.
    """
    deferred = await interaction.response.defer(thinking=True)
    interaction.extras[_PLACEHOLDER] = True
    return deferred


def placeholder_replaced(interaction: discord.Interaction) -> None:
    """Note that the public placeholder became its message; an error from here on is told in a followup."""
    interaction.extras.pop(_PLACEHOLDER, None)


def member_locale(interaction: discord.Interaction) -> str:
    """The language of what only the member reads (private answers, modals): their Discord's."""
    return str(interaction.locale)


def channel_locale(interaction: discord.Interaction) -> str | None:
    """The language of what the whole channel reads (cards, job messages, results): the server's; in a
    direct message, the member's own. None (English) where a server tells none."""
    if interaction.guild_id is None:
        return member_locale(interaction)
    return str(interaction.guild_locale) if interaction.guild_locale is not None else None


def message_locale(message: discord.Message) -> str | None:
    """The language of an answer to a message (no interaction, so no member locale): its server's."""
    return str(message.guild.preferred_locale) if message.guild is not None else None


async def reply(interaction: discord.Interaction, message: str) -> None:
    """An ephemeral answer, as the first response or a followup; in the channel once the token is gone.

    In the member's language where the catalogue has the sentence (i18n.py)."""
    message = translate(message, member_locale(interaction))
    try:
        if not interaction.response.is_done():
            await interaction.response.send_message(message, ephemeral=True)
            return
        if not interaction.is_expired():
            if interaction.extras.pop(_PLACEHOLDER, False):
                # Public: in the channel's language.
                withdrawn = tr(channel_locale(interaction), WITHDRAWN)
                await interaction.edit_original_response(content=withdrawn)
            await interaction.followup.send(message, ephemeral=True)
            return
    except ANSWER_ERRORS as exc:
        log.info("interaction %s could not be answered (%s); using the channel", interaction.id, exc)
    channel = interaction.channel
    if isinstance(channel, discord.abc.Messageable):
        try:
            await channel.send(f"{interaction.user.mention} {message}", silent=True)
            return
        except ANSWER_ERRORS:
            pass
    log.warning("could not tell user %s: %s", interaction.user.id, message)


class PrivateView(discord.ui.View):
    """A view only the member it was made for may use; anyone else gets one ephemeral sentence."""

    def __init__(self, owner_id: int, *, timeout: float | None) -> None:
        super().__init__(timeout=timeout)
        self.owner_id = owner_id

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        if interaction.user.id == self.owner_id:
            return True
        log.info("refused interaction %s for user %s: not their view", interaction.id, interaction.user.id)
        await reply(interaction, N_("Only the member who opened this can use it."))
        return False
