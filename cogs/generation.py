"""Starting jobs from Discord: the order, the edit modal, and the buttons on a job's message.

Not an extension itself: the cogs import it. Who may press what: every button on a job belongs to the
member who queued it (Reroll, Edit & regenerate, Delete, Cancel); admins may also Delete and Cancel.
Info is read-only and open to everyone.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import discord

from cogs.cards import info_embed, status_text
from i2p2i_bot.generate import GenerationRequest
from i2p2i_bot.jobs import Delivery, Job, JobRequest
from i2p2i_bot.replies import ANSWER_ERRORS, Refusal, report_error

if TYPE_CHECKING:
    from i2p2i_bot.app import I2P2IBot

log = logging.getLogger("i2p2i.jobs")

# Discord interaction tokens live 15 minutes.
TOKEN_LIFETIME_S = 15 * 60
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024


# -- starting a job -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobOrder:
    """What a member asked for, before it becomes a job."""

    prompt: str
    negative_prompt: str = ""
    count: int = 1
    seed: int | None = None
    interrogation_id: int | None = None
    source_sha256: str | None = None
    parent_job_id: int | None = None
    origin: str = "discord"


async def start_job(bot: I2P2IBot, interaction: discord.Interaction, order: JobOrder) -> Job:
    """Validate, queue, and post the job's status message (the message its results will replace)."""
    found = bot.banned.find(order.prompt) + bot.banned.find(order.negative_prompt)
    if found:
        raise Refusal(
            f"That prompt contains banned terms ({', '.join(dict.fromkeys(found))}); remove them first."
        )
    params, _ = bot.engine.generator.plan(
        GenerationRequest(order.prompt, order.negative_prompt, order.count, order.seed)
    )
    if not interaction.response.is_done():
        await interaction.response.defer(thinking=True)
    expires = interaction.created_at.timestamp() + TOKEN_LIFETIME_S
    # discord.py keeps the interaction's attachment_size_limit as filesize_limit.
    limit = interaction.filesize_limit or DEFAULT_UPLOAD_LIMIT
    request = JobRequest(
        owner_id=interaction.user.id,
        prompt=order.prompt,
        params=params,
        count=order.count,
        negative_prompt=order.negative_prompt,
        seed=order.seed,
        origin=order.origin,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        interrogation_id=order.interrogation_id,
        source_sha256=order.source_sha256,
        parent_job_id=order.parent_job_id,
        request_key=f"interaction:{interaction.id}",
        delivery=Delivery(interaction.channel_id, None, interaction.token, expires),
    )
    deliverer = bot.get_cog("Results")
    job = await bot.queue.submit(request)
    log.info("job %d queued by user %d (%d images)", job.id, job.owner_id, job.count)
    text = status_text(job, bot.queue.position(job.id))
    delivery = request.delivery
    try:
        message = await _post_status(interaction, job, text)
        if message is not None:
            delivery = Delivery(interaction.channel_id, message.id, interaction.token, expires)
            await bot.store.set_delivery(job.id, delivery)
    finally:
        # The job is queued either way; without its status message the result goes to the channel or DM.
        if deliverer is not None:  # the Results cog; None only if it failed to load
            deliverer.track(job, delivery, limit)  # type: ignore[attr-defined]
    return job


async def _post_status(interaction: discord.Interaction, job: Job, text: str) -> discord.Message | None:
    """Post a queued job's status message; None when Discord could not be reached to post it.

    The first follow-up after a deferred answer replaces its "thinking…" placeholder. When that follow-up's
    answer is lost (a dropped connection, a 5xx), the message may or may not exist: editing the original
    answer makes it the status message either way, once, and tells the bot its id. A refusal (4xx) made
    no message and is raised, for the member to hear why.
    """
    view = job_view(job, running=True)
    try:
        return await interaction.followup.send(text, view=view, wait=True)
    except ANSWER_ERRORS as exc:
        if isinstance(exc, discord.HTTPException) and exc.status < 500:
            raise
        log.info("job %d: posting its status message failed (%s); editing the original answer", job.id, exc)
    try:
        return await interaction.edit_original_response(content=text, view=view)
    except ANSWER_ERRORS as exc:
        log.warning("job %d has no status message (%s); its result goes to the channel", job.id, exc)
        return None


# -- buttons ----------------------------------------------------------------------------------------------


def job_view(job: Job, *, running: bool) -> discord.ui.View:
    """Cancel while the job is queued or running; Reroll, Edit, Info and Delete once it is done."""
    view = discord.ui.View(timeout=None)
    actions = ("cancel", "info") if running else ("reroll", "edit", "info", "delete")
    for action in actions:
        view.add_item(JobButton(action, job.id))
    return view


async def _owned_job(bot: I2P2IBot, interaction: discord.Interaction, job_id: int, *, admin_ok: bool) -> Job:
    job = await bot.store.get_job(job_id)
    if job is None:
        raise Refusal(f"Job #{job_id} no longer exists (its history may have been deleted).")
    if job.owner_id != interaction.user.id and not (admin_ok and bot.is_admin(interaction.user)):
        raise Refusal(f"Only <@{job.owner_id}>, who made job #{job_id}, can use that button.")
    return job


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"i2p:job:(?P<action>cancel|info|reroll|edit|delete):(?P<job>\d+)",
):
    """A button whose only state is its job id; the job itself is read from SQLite on every press."""

    LOOKS: ClassVar[dict[str, tuple[str, discord.ButtonStyle, str]]] = {
        "cancel": ("Cancel", discord.ButtonStyle.danger, "✖️"),
        "info": ("Info", discord.ButtonStyle.secondary, "ℹ️"),
        "reroll": ("Reroll", discord.ButtonStyle.primary, "🎲"),
        "edit": ("Edit & regenerate", discord.ButtonStyle.secondary, "✏️"),
        "delete": ("Delete", discord.ButtonStyle.danger, "🗑️"),
    }

    def __init__(self, action: str, job_id: int, *, label: str | None = None) -> None:
        text, style, emoji = self.LOOKS[action]
        button: discord.ui.Button[Any] = discord.ui.Button(
            label=label or text, style=style, emoji=emoji, custom_id=f"i2p:job:{action}:{job_id}"
        )
        super().__init__(button)
        self.action = action
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> JobButton:
        return cls(match["action"], int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot: I2P2IBot = interaction.client  # type: ignore[assignment]
        try:
            await getattr(self, f"_{self.action}")(bot, interaction)
        except Exception as exc:
            await report_error(interaction, exc)

    async def _cancel(self, bot: I2P2IBot, interaction: discord.Interaction) -> None:
        job = await _owned_job(bot, interaction, self.job_id, admin_ok=True)
        await bot.queue.cancel(job.id, interaction.user.id, admin=bot.is_admin(interaction.user))
        await interaction.response.send_message(f"Cancelled job #{job.id}.", ephemeral=True)

    async def _info(self, bot: I2P2IBot, interaction: discord.Interaction) -> None:
        record = await bot.store.job_record(self.job_id)
        if record is None:
            raise Refusal(f"Job #{self.job_id} no longer exists.")
        embed = info_embed(record.job, record.images, bot.engine.models)
        await interaction.response.send_message(embed=embed, ephemeral=True)

    async def _reroll(self, bot: I2P2IBot, interaction: discord.Interaction) -> None:
        job = await _owned_job(bot, interaction, self.job_id, admin_ok=False)
        await start_job(bot, interaction, order_from(job, origin="reroll"))

    async def _edit(self, bot: I2P2IBot, interaction: discord.Interaction) -> None:
        job = await _owned_job(bot, interaction, self.job_id, admin_ok=False)
        modal = PromptModal(
            order_from(job, origin="edit"),
            title="Edit & regenerate",
            max_count=bot.settings.queue.max_images_per_job,
        )
        await interaction.response.send_modal(modal)

    async def _delete(self, bot: I2P2IBot, interaction: discord.Interaction) -> None:
        await _owned_job(bot, interaction, self.job_id, admin_ok=True)
        await interaction.response.defer()
        try:
            await interaction.delete_original_response()
        except discord.HTTPException:
            # A result posted in the channel after the token expired is the bot's own message, not the
            # interaction webhook's: delete it as the bot.
            if interaction.message is None:
                raise
            await interaction.message.delete()
        log.info("job %d's message deleted by user %d", self.job_id, interaction.user.id)


def order_from(job: Job, *, origin: str) -> JobOrder:
    """A new order with a job's prompt and settings and fresh seeds."""
    return JobOrder(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        count=job.count,
        interrogation_id=job.interrogation_id,
        source_sha256=job.source_sha256,
        parent_job_id=job.id,
        origin=origin,
    )


# -- the edit modal ---------------------------------------------------------------------------------------


class PromptModal(discord.ui.Modal):
    """Prompt, negative prompt, count and seed; bad input is echoed back so nothing typed is lost."""

    def __init__(self, order: JobOrder, *, title: str = "Edit prompt", max_count: int = 8) -> None:
        super().__init__(title=title[:45], timeout=15 * 60)
        self.order = order
        self.max_count = max_count
        self.prompt: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, default=order.prompt[:4000], max_length=4000
        )
        self.negative: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            label="Negative prompt",
            style=discord.TextStyle.paragraph,
            default=order.negative_prompt[:4000] or None,
            required=False,
            max_length=4000,
        )
        self.count: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            label=f"Images (1–{max_count})", default=str(order.count), max_length=3
        )
        self.seed: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            label="Seed (blank for random)", required=False, max_length=10, placeholder="e.g. 1234"
        )
        for item in (self.prompt, self.negative, self.count, self.seed):
            self.add_item(item)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        bot: I2P2IBot = interaction.client  # type: ignore[assignment]
        try:
            order = self.parsed()
            await start_job(bot, interaction, order)
        except Exception as exc:
            if isinstance(exc, Refusal | ValueError):
                echo = f"\nWhat you typed, so nothing is lost:\n```\n{self.prompt.value[:1500]}\n```"
                exc = Refusal(f"{exc}{echo}")
            await report_error(interaction, exc)

    def parsed(self) -> JobOrder:
        count_text = self.count.value.strip()
        if not count_text.isdigit() or not 1 <= int(count_text) <= self.max_count:
            raise Refusal(
                f"Images must be a whole number from 1 to {self.max_count}; you typed “{count_text}”."
            )
        seed_text = self.seed.value.strip()
        if seed_text and (not seed_text.isdigit() or int(seed_text) > 2**32 - 1):
            raise Refusal(f"The seed must be a whole number from 0 to 4294967295; you typed “{seed_text}”.")
        if not self.prompt.value.strip():
            raise Refusal("The prompt is empty; write what the image should show.")
        return JobOrder(
            prompt=self.prompt.value.strip(),
            negative_prompt=self.negative.value.strip(),
            count=int(count_text),
            seed=int(seed_text) if seed_text else None,
            interrogation_id=self.order.interrogation_id,
            source_sha256=self.order.source_sha256,
            parent_job_id=self.order.parent_job_id,
            origin=self.order.origin,
        )

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]
        await report_error(interaction, error)
