"""A job's controls in Discord: starting one, the edit modal, and the buttons on a job's message.

The bot registers the buttons; the cogs start jobs through start_job. Who may press what: every button
on a job belongs to the member who queued it (Reroll, Edit & regenerate, Delete, Cancel, and the result
images' Vary, Upscale and Use as source); admins may also Delete and Cancel. Info is read-only and open to
whoever may see the job (check_may_see), as /job is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

import discord
from PIL import Image

from i2p2i_bot.cards import COLOR, info_embed, shorten, status_text
from i2p2i_bot.config import GenerateSettings
from i2p2i_bot.flagged import FlaggedPolicy
from i2p2i_bot.guides import GUIDE_KINDS, Guide, GuideName, not_offered
from i2p2i_bot.i18n import N_, tr, translate
from i2p2i_bot.jobs import UPSCALE, Delivery, Job, JobRefused, JobRequest, JobStatus
from i2p2i_bot.replies import (
    ANSWER_ERRORS,
    Refusal,
    channel_locale,
    member_locale,
    message_locale,
    placeholder_replaced,
    report_error,
    think_in_public,
)
from i2p2i_bot.request import GenerationError, GenerationRequest, upscale_fits, upscale_of, whole_number
from i2p2i_bot.source_images import SourceImages
from i2p2i_bot.store import StoredImage

if TYPE_CHECKING:
    from i2p2i_bot.app import I2P2IBot

log = logging.getLogger("i2p2i.jobs")

# Discord interaction tokens live 15 minutes.
TOKEN_LIFETIME_S = 15 * 60
# Discord drops an interaction not answered within 3 s: planning that takes longer than this (a LoRA file
# hashed for the first time) posts the public placeholder first.
PLAN_BEFORE_ANSWER_S = 2.0
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024


def bot_of(interaction: discord.Interaction) -> I2P2IBot:
    """The bot an interaction came to; discord.py types it as any client."""
    from i2p2i_bot.app import I2P2IBot  # the app imports this module

    client = interaction.client
    if not isinstance(client, I2P2IBot):
        raise TypeError(f"an interaction for {type(client).__name__}, not the i2p2i bot")
    return client


# -- starting a job -------------------------------------------------------------------------------------


async def planned_for(bot: I2P2IBot, guild_id: int | None, draft: JobRequest) -> GenerationRequest:
    """A draft's request planned with its server's settings, after its server's banned terms and the guides
    on offer.

    Planning hashes a LoRA file the first time a prompt names it (or after it changed): hundreds of MB,
    seconds of reading, so it runs on a worker thread and the bot keeps answering meanwhile."""
    banned = bot.servers.banned(guild_id)
    found = banned.find(draft.request.prompt) + banned.find(draft.request.negative_prompt or "")
    if found:
        raise Refusal(
            f"That prompt contains banned terms ({', '.join(dict.fromkeys(found))}); remove them first."
        )
    check_keep(bot, draft.request)
    return await asyncio.to_thread(bot.engine.plan, draft.request, bot.servers.get(guild_id))


async def start_job_from_reply(bot: I2P2IBot, message: discord.Message, draft: JobRequest) -> Job:
    """Plan, queue and post the status message of a job a member asked for by replying to the bot.

    There is no interaction, so no token: the status message is the bot's own reply in the channel, which
    delivery edits with progress and then the result (FROM_REPLY), as a card's Generate edits its message.
    """
    guild_id = message.guild.id if message.guild is not None else None
    request = await planned_for(bot, guild_id, draft)
    submitted = dataclasses.replace(
        draft,
        owner_id=message.author.id,
        request=request,
        guild_id=guild_id,
        channel_id=message.channel.id,
        request_key=f"message:{message.id}",
        delivery=Delivery(message.channel.id, None, None, None),
        flagged_policy=flagged_policy_in(bot, guild_id, message.channel),
        locale=message_locale(message),
    )
    await bot.queue.check(submitted)
    job = await bot.queue.submit(submitted)
    log.info("job %d queued by user %d from a reply (%d images)", job.id, job.owner_id, job.request.count)
    delivery = submitted.delivery
    try:
        text = status_text(job, bot.queue.position(job.id), locale=job.locale)
        view = job_view(job, running=True, locale=job.locale)
        status = await message.reply(text, view=view, mention_author=False)
        delivery = Delivery(message.channel.id, status.id, None, None)
        await bot.store.set_delivery(job.id, delivery)
    except discord.HTTPException as exc:
        log.warning("job %d has no status message (%s); its result goes to the channel", job.id, exc)
    finally:
        limit = message.guild.filesize_limit if message.guild is not None else DEFAULT_UPLOAD_LIMIT
        bot.delivery.track(job, delivery, limit)
    return job


async def start_job(bot: I2P2IBot, interaction: discord.Interaction, draft: JobRequest) -> Job:
    """Plan, queue, and post the job's status message (the message its results will replace).

    `draft` is what the member asked for, its request not yet planned: planning fills in the server's
    defaults and the seed, and refuses anything out of bounds with one sentence.
    """
    request = await _planned_answering(bot, interaction, draft)
    expires = interaction.created_at.timestamp() + TOKEN_LIFETIME_S
    # discord.py keeps the interaction's attachment_size_limit as filesize_limit.
    limit = interaction.filesize_limit or DEFAULT_UPLOAD_LIMIT
    submitted = dataclasses.replace(
        draft,
        owner_id=interaction.user.id,
        request=request,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
        request_key=f"interaction:{interaction.id}",
        flagged_policy=flagged_policy_in(bot, interaction.guild_id, interaction.channel),
        locale=channel_locale(interaction),
        delivery=Delivery(interaction.channel_id, None, interaction.token, expires),
    )
    # Refused now, the member alone hears it; after the public placeholder, only a neutral line would hide it.
    await bot.queue.check(submitted)
    if not interaction.response.is_done():  # answered already while a LoRA was hashed
        await think_in_public(interaction)
    job = await bot.queue.submit(submitted)
    log.info("job %d queued by user %d (%d images)", job.id, job.owner_id, job.request.count)
    text = status_text(job, bot.queue.position(job.id), locale=job.locale)
    delivery = submitted.delivery
    try:
        message = await _post_status(interaction, job, text)
        if message is not None:
            delivery = Delivery(interaction.channel_id, message.id, interaction.token, expires)
            await bot.store.set_delivery(job.id, delivery)
    finally:
        # The job is queued either way; without its status message the result goes to the channel or DM.
        # So the placeholder is no request that did not go through: it is the status message, or Discord
        # refused to make it one, and an error is told in a plain followup.
        placeholder_replaced(interaction)
        bot.delivery.track(job, delivery, limit)
    return job


async def _planned_answering(
    bot: I2P2IBot, interaction: discord.Interaction, draft: JobRequest
) -> GenerationRequest:
    """planned_for, answering the interaction with the public placeholder first where planning outlasts
    PLAN_BEFORE_ANSWER_S; a refusal after that withdraws the placeholder and is told privately."""
    planning = asyncio.ensure_future(planned_for(bot, interaction.guild_id, draft))
    done, _ = await asyncio.wait({planning}, timeout=PLAN_BEFORE_ANSWER_S)
    if not done:
        log.info("planning for user %d takes a while (a LoRA file hashed); answering first", draft.owner_id)
        try:
            await think_in_public(interaction)
        except BaseException:
            planning.cancel()
            raise
    return await planning


def flagged_policy_in(bot: I2P2IBot, guild_id: int | None, channel: object) -> FlaggedPolicy:
    """What images the safety checker flags get in a channel: the server's nsfw setting applies only where
    Discord marks the channel age-restricted (a thread as its parent); a DM, or a channel the bot cannot
    tell, withholds them."""
    is_nsfw = getattr(channel, "is_nsfw", None)
    age_restricted = callable(is_nsfw) and is_nsfw() is True
    return bot.servers.flagged_policy(guild_id, age_restricted=age_restricted)


def check_offered(bot: I2P2IBot, names: Iterable[GuideName], preset: str | None) -> None:
    """Refuse, in one sentence, a guide the model `preset` (None: the default one) is not offered now, and
    say why: its weights do not fit the model's family, the operator has not enabled it, or its weights
    are not here."""
    offered = bot.engine.guides_for(preset)
    for name in names:
        if name in offered:
            continue
        chosen = bot.engine.presets.get(preset)  # an unknown preset is its own sentence
        if not GUIDE_KINDS[name].fits(chosen.family):
            raise Refusal(
                f"The {chosen.name} model cannot keep {name} of an image: that guide fits SD 1.x models only."
            )
        raise Refusal(not_offered(name, bot.settings.guides.enabled))


def check_keep(bot: I2P2IBot, request: GenerationRequest) -> None:
    """Refuse, in one sentence, guides the request's model is not offered now (say why), or a source image
    that is no longer stored (forgotten since the card or the job it repeats was made)."""
    if not request.keep:
        return
    check_offered(bot, (guide.name for guide in request.keep), request.preset)
    path = bot.store.source_path(request.guide_source) if request.guide_source else None
    if path is not None and not path.exists():
        raise Refusal(
            "The image these guides keep elements of is no longer stored; describe it again, "
            "or keep the prompt only."
        )


async def _post_status(interaction: discord.Interaction, job: Job, text: str) -> discord.Message | None:
    """Post a queued job's status message; None when Discord could not be reached to post it.

    The first follow-up after a deferred answer replaces its "thinking…" placeholder. When that follow-up's
    answer is lost (a dropped connection, a 5xx), the message may or may not exist: editing the original
    answer makes it the status message either way, once, and tells the bot its id. A refusal (4xx) made
    no message and is raised, for the member to hear why.
    """
    view = job_view(job, running=True, locale=job.locale)
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


def job_view(
    job: Job,
    *,
    running: bool,
    locale: str | None,
    images: Sequence[StoredImage] = (),
    image_actions: Sequence[str] = ("source",),
) -> discord.ui.View:
    """Cancel while the job is queued or running; Reroll, Edit, Info and Delete once it is done; Retry
    instead of Reroll when it failed or was cancelled. Below them, once done, a select of what to do
    with each of its `images` the safety checker passed: `image_actions` (offered_image_actions), in two
    selects where one cannot list them all. Labelled in `locale`: the job's own on its message, the
    member's in /job."""
    view = discord.ui.View(timeout=None)
    if running:
        actions: tuple[str, ...] = ("cancel", "info")
    elif job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        actions = ("retry", "edit", "info", "delete")
    else:
        actions = ("reroll", "edit", "info", "delete")
    for action in actions:
        view.add_item(JobButton(action, job.id, locale=locale))
    shown = [m.index for m in sorted(images, key=lambda m: m.index) if not m.nsfw]
    if not running and shown:
        # Whole images per select: a member finds every action of image #k in one list.
        per_select = max(1, MAX_SELECT_OPTIONS // len(image_actions))
        for part, first in enumerate(range(0, len(shown), per_select)):
            indexes = shown[first : first + per_select]
            view.add_item(ImageActions(job.id, indexes, actions=image_actions, part=part, locale=locale))
    return view


def offered_image_actions(bot: I2P2IBot, job: Job) -> tuple[str, ...]:
    """What the select under a job's result offers for each image: Vary where the layout guide is on offer
    for the job's model, Upscale (2×) there too where twice the job's size fits generate.upscale_max_side
    (plan's own check), and Use as source everywhere."""
    if "layout" not in bot.engine.guides_for(job.request.preset):
        return ("source",)
    width, height = job.request.width, job.request.height
    if width is None or height is None or not upscale_fits(width, height, bot.settings.generate):
        return ("subtle", "strong", "source")
    return ("subtle", "strong", "upscale", "source")


def check_may_see(bot: I2P2IBot, interaction: discord.Interaction, job: Job) -> None:
    """Refuse, in one sentence, a member who may not read a job's prompt, settings and images list.

    What a member agreed to share is where they asked for the job: its result is posted there. Admins see
    every job. A job hidden by Delete is shown to nobody else, its owner included. Otherwise the owner
    sees their job, and another member sees it when they ask in the server it was asked for in and can
    view its channel there (a private thread, or a channel the bot no longer knows, counts as one they
    cannot). A job asked for in a direct message is its owner's alone.
    """
    if bot.is_admin(interaction.user):
        return
    if job.hidden_at is not None:
        raise Refusal(f"Job #{job.id} was deleted.")
    if job.owner_id == interaction.user.id or _sees_channel(interaction, job):
        return
    raise Refusal(f"Job #{job.id} is not yours, and was not posted where you can see it.")


def _sees_channel(interaction: discord.Interaction, job: Job) -> bool:
    """Whether the member of `interaction`, asking in the job's server, can view the channel it was for."""
    guild, member = interaction.guild, interaction.user
    if guild is None or job.guild_id != guild.id or job.channel_id is None:
        return False
    if not isinstance(member, discord.Member):
        return False
    channel = guild.get_channel_or_thread(job.channel_id)
    if channel is None or (isinstance(channel, discord.Thread) and channel.is_private()):
        # Who is in a private thread is not in the bot's cache; its members see the result there.
        return False
    return channel.permissions_for(member).view_channel


async def _owned_job(bot: I2P2IBot, interaction: discord.Interaction, job_id: int, *, admin_ok: bool) -> Job:
    job = await bot.store.get_job(job_id)
    if job is None:
        raise Refusal(f"Job #{job_id} no longer exists (its history may have been deleted).")
    if job.owner_id != interaction.user.id and not (admin_ok and bot.is_admin(interaction.user)):
        raise Refusal(f"Only <@{job.owner_id}>, who made job #{job_id}, can use that button.")
    return job


class JobButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"i2p:job:(?P<action>cancel|info|reroll|retry|edit|delete):(?P<job>\d+)",
):
    """A button whose only state is its job id; the job itself is read from SQLite on every press."""

    LOOKS: ClassVar[dict[str, tuple[str, discord.ButtonStyle, str]]] = {
        "cancel": (N_("Cancel"), discord.ButtonStyle.danger, "✖️"),
        "info": (N_("Info"), discord.ButtonStyle.secondary, "ℹ️"),
        "reroll": (N_("Reroll"), discord.ButtonStyle.primary, "🎲"),
        "retry": (N_("Retry"), discord.ButtonStyle.primary, "🔁"),
        "edit": (N_("Edit & regenerate"), discord.ButtonStyle.secondary, "✏️"),
        "delete": (N_("Delete"), discord.ButtonStyle.danger, "🗑️"),
    }

    def __init__(
        self, action: str, job_id: int, *, label: str | None = None, locale: str | None = None
    ) -> None:
        text, style, emoji = self.LOOKS[action]
        button: discord.ui.Button[Any] = discord.ui.Button(
            label=label or tr(locale, text), style=style, emoji=emoji, custom_id=f"i2p:job:{action}:{job_id}"
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
        bot = bot_of(interaction)
        try:
            await getattr(self, f"_{self.action}")(bot, interaction)
        except Exception as exc:
            await report_error(interaction, exc)

    async def _cancel(self, bot: I2P2IBot, interaction: discord.Interaction) -> None:
        job = await _owned_job(bot, interaction, self.job_id, admin_ok=True)
        await bot.queue.cancel(job.id, interaction.user.id, admin=bot.is_admin(interaction.user))
        said = tr(member_locale(interaction), "Cancelled job #{job}.", job=job.id)
        await interaction.response.send_message(said, ephemeral=True)

    async def _info(self, bot: I2P2IBot, interaction: discord.Interaction) -> None:
        record = await bot.store.job_record(self.job_id)
        if record is None:
            raise Refusal(f"Job #{self.job_id} no longer exists.")
        check_may_see(bot, interaction, record.job)
        models = await job_models(bot, record.job)
        embed = info_embed(
            record.job,
            record.images,
            models,
            locale=member_locale(interaction),
            upscaled_image=await upscaled_image(bot, record.job),
        )
        await interaction.response.send_message(embed=embed, ephemeral=True)

    async def _reroll(self, bot: I2P2IBot, interaction: discord.Interaction) -> None:
        job = await _owned_job(bot, interaction, self.job_id, admin_ok=False)
        await start_job(bot, interaction, job.reroll(interaction.user.id))

    async def _retry(self, bot: I2P2IBot, interaction: discord.Interaction) -> None:
        """The same request again, seeds and all, as a new job."""
        job = await _owned_job(bot, interaction, self.job_id, admin_ok=False)
        await start_job(
            bot, interaction, job.reroll(interaction.user.id, origin="retry", seed=job.request.seed)
        )

    async def _edit(self, bot: I2P2IBot, interaction: discord.Interaction) -> None:
        job = await _owned_job(bot, interaction, self.job_id, admin_ok=False)
        modal = PromptModal(
            job.reroll(interaction.user.id, origin="edit"),
            title=N_("Edit & regenerate"),
            settings=bot.servers.generate(interaction.guild_id),
            locale=member_locale(interaction),
        )
        await interaction.response.send_modal(modal)

    async def _delete(self, bot: I2P2IBot, interaction: discord.Interaction) -> None:
        """Delete the result's message and image files, and hide the job from everyone but admins."""
        job = await _owned_job(bot, interaction, self.job_id, admin_ok=True)
        if not job.status.finished:
            raise Refusal(f"Job #{job.id} is still {job.status}; cancel it first.")
        await interaction.response.defer()
        # Hidden first: whatever becomes of the message, the member's wish is kept.
        await bot.store.hide_job(job.id, by=interaction.user.id)
        try:
            await interaction.delete_original_response()
        except discord.HTTPException:
            # A result posted in the channel after the token expired is the bot's own message, not the
            # interaction webhook's: delete it as the bot.
            if interaction.message is None:
                raise
            await interaction.message.delete()
        log.info("job %d deleted and hidden by user %d", job.id, interaction.user.id)
        said = tr(
            member_locale(interaction),
            "Deleted job #{job}: its message and image files are gone, and only admins can still see it "
            "in /history or /job.",
            job=job.id,
        )
        await interaction.followup.send(said, ephemeral=True)


# Vary makes new images that keep a result's layout at these weights (how much may change).
VARY_WEIGHTS = {"subtle": 0.35, "strong": 0.7}
IMAGE_ACTION_LABELS = {
    "subtle": N_("Vary (subtle)"),
    "strong": N_("Vary (strong)"),
    "upscale": N_("Upscale (2×)"),
    "source": N_("Use as source"),
}
# Discord's limit on a select's options.
MAX_SELECT_OPTIONS = 25


class SourceDescriber(Protocol):
    """What describes an image the bot keeps and posts its prompt card: the imagine cog."""

    async def describe_stored(
        self, interaction: discord.Interaction, image: Image.Image, sha256: str, preset: str | None
    ) -> None: ...


# What a result's select says before a choice, by the actions it offers.
IMAGE_ACTION_PLACEHOLDERS = {
    ("subtle", "strong", "upscale", "source"): N_("Image #k → Vary, Upscale or Use as source…"),
    ("subtle", "strong", "source"): N_("Image #k → Vary or Use as source…"),
    ("source",): N_("Image #k → Use as source…"),
}


class ImageActions(
    discord.ui.DynamicItem[discord.ui.Select[Any]],
    template=r"i2p:job:image:(?P<job>\d+)(?::(?P<part>\d+))?",
):
    """ "Image #k → action" on a result: Vary (subtle / strong) makes new images of the job's prompt that
    keep that image's layout; Upscale (2×) makes that image again at twice its size (the hires fix: its
    seed, kept from it with layout at generate.upscale_strength); Use as source makes it the image of a
    new prompt card, described for the job's model. The owner's alone.

    Either way the image becomes a source by its hash, as an upload is, so its guides and its card work
    after a restart. One select for every image keeps the message within Discord's five rows; where a
    select's 25 options cannot hold every image's actions, the images after them get a second (`part`).
    """

    def __init__(
        self,
        job_id: int,
        indexes: Sequence[int] = (),
        *,
        actions: Sequence[str] = ("source",),
        part: int = 0,
        locale: str | None = None,
    ) -> None:
        options = [
            discord.SelectOption(
                label=f"#{index + 1} {tr(locale, IMAGE_ACTION_LABELS[action])}", value=f"{action}:{index}"
            )
            for index in indexes
            for action in actions
        ][:MAX_SELECT_OPTIONS]
        placeholder = IMAGE_ACTION_PLACEHOLDERS.get(tuple(actions), N_("Image #k → Use as source…"))
        super().__init__(
            discord.ui.Select(
                custom_id=f"i2p:job:image:{job_id}" + (f":{part}" if part else ""),
                placeholder=tr(locale, placeholder),
                options=options or [discord.SelectOption(label="#1", value="source:0")],
                row=1 + part,
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> ImageActions:
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        try:
            action, _, index_text = self.item.values[0].partition(":")
            index = whole_number(index_text)
            if action not in IMAGE_ACTION_LABELS or index is None:
                raise Refusal("Choose one of the actions listed.")
            job = await _owned_job(bot, interaction, self.job_id, admin_ok=False)
            image, meta = await _result_source(bot, job, index)
            if action == "source":
                describer = bot.get_cog("Imagine")
                if describer is None:
                    raise Refusal("Describing images is switched off on this bot right now.")
                # Described for the model the image was made with: the member was using it.
                await cast(SourceDescriber, describer).describe_stored(
                    interaction, image, meta.sha256, job.request.preset
                )
                return
            # A select posted before its model lost the layout guide: refused before the image is kept.
            check_offered(bot, ("layout",), job.request.preset)
            await asyncio.to_thread(SourceImages(bot.sources_dir).save, meta.sha256, image)
            if action == "upscale":
                strength = bot.settings.generate.upscale_strength
                request = upscale_of(job.request, seed=meta.seed, source=meta.sha256, strength=strength)
                draft = dataclasses.replace(job.reroll(interaction.user.id, origin=UPSCALE), request=request)
            else:
                keep = (Guide("layout", VARY_WEIGHTS[action]),)
                draft = job.reroll(interaction.user.id, origin="vary", keep=keep, guide_source=meta.sha256)
            await start_job(bot, interaction, draft)
        except Exception as exc:
            await report_error(interaction, exc)


async def _result_source(bot: I2P2IBot, job: Job, index: int) -> tuple[Image.Image, StoredImage]:
    """Result image `index` of a job and what is stored of it, or one sentence why it cannot be used."""
    if job.hidden_at is not None:
        raise Refusal(f"Job #{job.id} was deleted.")
    record = await bot.store.job_record(job.id)
    meta = next((m for m in record.images if m.index == index), None) if record is not None else None
    if meta is None:
        raise Refusal(f"Job #{job.id} has no image #{index + 1}.")
    if meta.nsfw:
        raise Refusal(f"Image #{index + 1} of job #{job.id} was withheld by the safety checker.")
    try:
        image = await asyncio.to_thread(_open_rgb, bot.store.image_path(job.id, index))
    except OSError:
        raise Refusal(f"Image #{index + 1} of job #{job.id} is no longer stored.") from None
    return image, meta


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


async def job_models(bot: I2P2IBot, job: Job) -> dict[str, str]:
    """The models a job was made with, as recorded: its preset and generator, and the interrogation
    models of the card it came from."""
    models = {"preset": job.request.preset or "?", "generator": job.request.model or "?"}
    if job.interrogation_id is not None:
        stored = await bot.store.get_interrogation(job.interrogation_id)
        if stored is not None:
            models.update(stored.interrogation.models)
    return models


async def upscaled_image(bot: I2P2IBot, job: Job) -> int | None:
    """The index of the image of its parent job an upscale doubles (the one whose hash it keeps); None for
    any other job, or where the parent and its images are gone."""
    if job.origin != UPSCALE or job.parent_job_id is None:
        return None
    record = await bot.store.job_record(job.parent_job_id)
    if record is None:
        return None
    return next((m.index for m in record.images if m.sha256 == job.request.guide_source), None)


def queue_message(
    bot: I2P2IBot, jobs: list[Job], *, locale: str | None, everyone: bool = False
) -> tuple[discord.Embed, discord.ui.View]:
    """The queue as an embed, with a Cancel button for each of the first jobs; private, in `locale`."""
    lines = []
    for job in jobs[:20]:
        position = bot.queue.position(job.id)
        owner = f" · <@{job.owner_id}>" if everyone else ""
        status = status_text(job, position, locale=locale)
        lines.append(f"{status}{owner}\n> {shorten(job.request.prompt, 120)}")
    more = "\n" + tr(locale, "… and {count} more", count=len(jobs) - 20) if len(jobs) > 20 else ""
    embed = discord.Embed(
        colour=COLOR, title=tr(locale, "Queue"), description=shorten("\n".join(lines) + more, 4000)
    )
    if bot.queue.images_per_s:
        rate = f"{bot.queue.images_per_s:.2f}"
        embed.set_footer(text=tr(locale, "{rate} images/s lately", rate=rate))
    view = discord.ui.View(timeout=None)
    for job in jobs[:20]:
        if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            label = tr(locale, "Cancel #{job}", job=job.id)
            view.add_item(JobButton("cancel", job.id, label=label))
    return embed, view


# -- the edit modal ---------------------------------------------------------------------------------------


class PromptModal(discord.ui.Modal):
    """Prompt, negative prompt, count and seed; bad input is echoed back so nothing typed is lost."""

    def __init__(
        self,
        draft: JobRequest,
        *,
        settings: GenerateSettings,
        locale: str | None,
        title: str = N_("Edit prompt"),
    ) -> None:
        """`title` is a catalogue key; the modal is the member's own, in their `locale`."""
        super().__init__(title=tr(locale, title)[:45], timeout=15 * 60)
        self.draft = draft
        self.locale = locale
        asked = draft.request
        negative = settings.negative_prompt if asked.negative_prompt is None else asked.negative_prompt
        self.prompt: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            label=tr(locale, "Prompt"),
            style=discord.TextStyle.paragraph,
            default=asked.prompt[:4000],
            max_length=4000,
        )
        self.negative: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            label=tr(locale, "Negative prompt"),
            style=discord.TextStyle.paragraph,
            default=negative[:4000] or None,
            required=False,
            max_length=4000,
        )
        self.count: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            label=tr(locale, "Images (1–{high})", high=settings.max_count),
            default=str(asked.count),
            max_length=3,
        )
        self.seed: discord.ui.TextInput[PromptModal] = discord.ui.TextInput(
            label=tr(locale, "Seed (blank for random)"),
            required=False,
            max_length=10,
            placeholder=tr(locale, "e.g. {seed}", seed=1234),
        )
        for item in (self.prompt, self.negative, self.count, self.seed):
            self.add_item(item)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        try:
            await start_job(bot, interaction, self.parsed())
        except Exception as exc:
            if isinstance(exc, Refusal | GenerationError | JobRefused):
                said = translate(str(exc), self.locale)
                echo = tr(self.locale, "What you typed, so nothing is lost:")
                exc = Refusal(f"{said}\n{echo}\n```\n{self.prompt.value[:1500]}\n```")
            await report_error(interaction, exc)

    def parsed(self) -> JobRequest:
        """What the member typed, as a draft to plan; the bounds are the plan's to check."""
        count_text = self.count.value.strip()
        count = whole_number(count_text)
        if count is None:
            raise Refusal(f"Images must be a whole number; you typed “{count_text}”.")
        seed_text = self.seed.value.strip()
        seed = whole_number(seed_text) if seed_text else None
        if seed_text and seed is None:
            raise Refusal(f"The seed must be a whole number; you typed “{seed_text}”.")
        request = dataclasses.replace(
            self.draft.request,
            prompt=self.prompt.value.strip(),
            negative_prompt=self.negative.value.strip(),
            count=count,
            seed=seed,
        )
        return dataclasses.replace(self.draft, request=request)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]
        await report_error(interaction, error)
