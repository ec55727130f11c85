"""/imagine-from and "Imagine from image": an image becomes a prompt card with buttons; /imagine makes
images from a prompt the member writes.

Who may press what: the card's buttons (Generate, Edit prompt, Use #k, Apply/Remove negative, More prompts,
Re-describe) belong to the member who asked for the card; admins may use them too. Anyone else is told to
run the command themselves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands
from PIL import Image

from i2p2i_bot.cards import MAX_LISTED_PROMPTS, MODE_LABELS, listed_prompts, prompt_card, thumbnail_file
from i2p2i_bot.config import GenerateSettings, InterrogateMode
from i2p2i_bot.decode_queue import answer_deferred
from i2p2i_bot.guides import GUIDE_KINDS, GUIDE_NAMES, Guide, GuideError, GuideName, check_guides
from i2p2i_bot.i18n import tr
from i2p2i_bot.images import ImageError, check_declared
from i2p2i_bot.job_controls import MAX_SELECT_OPTIONS, PromptModal, bot_of, check_offered, start_job
from i2p2i_bot.jobs import JobRequest
from i2p2i_bot.replies import (
    PrivateView,
    Refusal,
    channel_locale,
    member_locale,
    placeholder_replaced,
    report_error,
    think_in_public,
)
from i2p2i_bot.request import (
    ASPECT_RATIOS,
    MAX_GUIDANCE,
    SCHEDULERS,
    GenerationRequest,
    check_length,
    size_for_aspect,
    whole_number,
)
from i2p2i_bot.source_images import SourceImages
from i2p2i_bot.store import CardChoices, StoredInterrogation

if TYPE_CHECKING:
    from i2p2i_bot.app import I2P2IBot

log = logging.getLogger("i2p2i.imagine")
MODES: tuple[str, ...] = get_args(InterrogateMode)
ASPECT_CHOICES = [app_commands.Choice(name=a, value=a) for a in ASPECT_RATIOS]
SCHEDULER_CHOICES = [
    app_commands.Choice(name="DPM-Solver++ (good in 20–25 steps)", value="dpm"),
    app_commands.Choice(name="PNDM (the original, wants 50)", value="pndm"),
]
SAMPLING_HELP = {
    "steps": "Denoising steps (default: the server's)",
    "guidance": "How closely to follow the prompt, CFG (default: the server's)",
    "aspect": "Aspect ratio (default: the server's size)",
    "scheduler": "Sampler (default: the server's)",
}
MODEL_HELP = "The model preset the prompt is written for and the images are made with"

# Discord's own file hosts; anything else (and any redirect) is refused, so a crafted URL cannot make the bot
# fetch from elsewhere.
DISCORD_MEDIA_HOSTS = frozenset({"cdn.discordapp.com", "media.discordapp.net"})
# Discord's API hosts serve no files; a proxy or a loopback Discord put in their place (discord.api_base) may.
DISCORD_API_HOSTS = frozenset({"discord.com", "discordapp.com"})
DOWNLOAD_TIMEOUT_S = 30


class ImagineCog(commands.Cog, name="Imagine"):
    def __init__(self, bot: I2P2IBot) -> None:
        self.bot = bot
        self.menu = app_commands.ContextMenu(name="Imagine from image", callback=self.imagine_from_message)
        self.session: aiohttp.ClientSession | None = None

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.menu)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DOWNLOAD_TIMEOUT_S))

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.menu.name, type=self.menu.type)
        if self.session is not None:
            await self.session.close()

    @app_commands.command(
        name="imagine-from", description="Turn an image into a prompt, then make new images"
    )
    @app_commands.describe(
        image="The picture to describe",
        mode="Prompt style (default: best)",
        count="How many images the Generate button makes (default 4)",
        model=MODEL_HELP,
        **SAMPLING_HELP,
    )
    @app_commands.choices(
        mode=[app_commands.Choice(name=MODE_LABELS[m][:100], value=m) for m in MODES],
        aspect=ASPECT_CHOICES,
        scheduler=SCHEDULER_CHOICES,
    )
    async def imagine_from(
        self,
        interaction: discord.Interaction,
        image: discord.Attachment,
        mode: app_commands.Choice[str] | None = None,
        count: app_commands.Range[int, 1, 64] | None = None,
        steps: app_commands.Range[int, 1, 500] | None = None,
        guidance: app_commands.Range[float, 0.0, MAX_GUIDANCE] | None = None,
        aspect: app_commands.Choice[str] | None = None,
        scheduler: app_commands.Choice[str] | None = None,
        model: app_commands.Range[str, 1, 100] | None = None,
    ) -> None:
        sampling = CardChoices(
            steps=steps,
            guidance=guidance,
            aspect=aspect.value if aspect else None,
            scheduler=scheduler.value if scheduler else None,
            preset=model.strip() if model else None,
        )
        await self.describe(interaction, image_source(image), mode.value if mode else None, count, sampling)

    @app_commands.command(name="imagine", description="Make images from a prompt you write")
    @app_commands.describe(
        prompt="What the images should show",
        negative="What they should not show (default: the server's negative prompt)",
        count="How many images (default 4)",
        seed="The first image's seed, to make an image again (default: random)",
        model=MODEL_HELP,
        **SAMPLING_HELP,
    )
    @app_commands.choices(aspect=ASPECT_CHOICES, scheduler=SCHEDULER_CHOICES)
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, 4000],
        negative: app_commands.Range[str, 0, 4000] | None = None,
        count: app_commands.Range[int, 1, 64] | None = None,
        seed: app_commands.Range[int, 0, 4294967295] | None = None,
        steps: app_commands.Range[int, 1, 500] | None = None,
        guidance: app_commands.Range[float, 0.0, MAX_GUIDANCE] | None = None,
        aspect: app_commands.Choice[str] | None = None,
        scheduler: app_commands.Choice[str] | None = None,
        model: app_commands.Range[str, 1, 100] | None = None,
    ) -> None:
        sampling = with_server_model(
            self.bot,
            interaction,
            CardChoices(
                steps=steps,
                guidance=guidance,
                aspect=aspect.value if aspect else None,
                scheduler=scheduler.value if scheduler else None,
                preset=model.strip() if model else None,
            ),
        )
        server = self.bot.servers.get(interaction.guild_id)
        request = sampled_request(
            prompt,
            negative,
            count or self.bot.servers.default_count(interaction.guild_id),
            sampling,
            self.bot.engine.presets.settings_for(sampling.preset, server, self.bot.servers.base),
        )
        request = dataclasses.replace(request, seed=seed)
        draft = JobRequest(owner_id=interaction.user.id, request=request, origin="imagine")
        await start_job(self.bot, interaction, draft)

    @imagine_from.autocomplete("model")
    @imagine.autocomplete("model")
    async def model_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return preset_choices(self.bot, current)

    async def imagine_from_message(self, interaction: discord.Interaction, message: discord.Message) -> None:
        sources = message_images(message)
        if not sources:
            raise Refusal("That message has no image attachment or embedded image to describe.")
        if len(sources) == 1:
            await self.describe(interaction, sources[0], None, None, CardChoices())
            return
        locale = member_locale(interaction)
        view = ChooseImageView(self, sources, interaction.user.id, locale=locale)
        said = tr(locale, "Which image should I describe?")
        await interaction.response.send_message(said, view=view, ephemeral=True)

    # -- the flow ----------------------------------------------------------------------------------------

    async def describe(
        self,
        interaction: discord.Interaction,
        source: ImageSource,
        mode: str | None,
        count: int | None,
        sampling: CardChoices,
    ) -> None:
        """Describe an image and post its card, refused privately before any answer when the member has
        interrogate.max_describes_per_user descriptions in flight already."""
        sampling = with_server_model(self.bot, interaction, sampling)
        with self.bot.describes.hold(interaction.user.id):
            await self._describe(interaction, source, mode, count, sampling)

    async def _describe(
        self,
        interaction: discord.Interaction,
        source: ImageSource,
        mode: str | None,
        count: int | None,
        sampling: CardChoices,
    ) -> None:
        """Check, download, decode, interrogate and post the card; user errors become one sentence."""
        bot = self.bot
        settings = bot.settings
        mode = mode or settings.interrogate.mode
        count = count or bot.servers.default_count(interaction.guild_id)
        # The card's settings are checked now, by the one validator, not when Generate is pressed.
        server = bot.servers.get(interaction.guild_id)
        generate = bot.engine.presets.settings_for(sampling.preset, server, bot.servers.base)
        bot.engine.plan(sampled_request("check", None, count, sampling, generate), server)
        # The interaction's filesize_limit is what the bot may upload, not what members may: downloads are
        # capped by intake.max_bytes alone. A file declared bigger is refused here, before any GET; an embed's
        # image declares no size, and the download's cap does the rest.
        limit = settings.intake.max_bytes
        check_declared(source.size, source.width, source.height, source.content_type, settings.intake)
        deferred = await think_in_public(interaction)
        # Kept in the store until answered, so that a restart answers it if the bot dies meanwhile; its
        # decoded picture counts against the decoding memory until then.
        async with (
            bot.pending_describes.held(interaction, deferred),
            bot.decodes.kept_for(interaction),
        ):
            await self.describe_deferred(interaction, source, mode, count, limit, sampling)

    async def describe_deferred(
        self,
        interaction: discord.Interaction,
        source: ImageSource,
        mode: str,
        count: int,
        limit: int,
        sampling: CardChoices,
    ) -> None:
        """The describe once deferred: download, decode, interrogate and post the card."""
        bot = self.bot
        try:
            data = await self.download(source, limit)
            intake = await bot.decodes.load(interaction, data)
            stored = await describe_for(bot, interaction, intake.image, intake.sha256, mode, sampling.preset)
            # Saved once the interrogation that names it is stored: another member's /forget either saw
            # that row and keeps the file, or removed it before the row existed and this writes it again.
            await asyncio.to_thread(SourceImages(bot.sources_dir).save, intake.sha256, intake.image)
        except (ImageError, Refusal) as exc:
            await report_error(interaction, exc)
            return
        await self._keep_choices(stored.id, sampling)
        await self._post_card(interaction, stored, count, intake.image)

    async def describe_stored(
        self, interaction: discord.Interaction, image: Image.Image, sha256: str, preset: str | None
    ) -> None:
        """Describe an image the bot keeps (a result's "Use as source") and post its card, as for an upload:
        in the default mode and count, counted against the member's describes in flight, answered after a
        restart. Saved as a source by its hash once its interrogation names it, as an upload is.

        `preset` is the model the image was made with: the card is described with its CLIP and keeps it,
        as the member was using it; the server's model where the config no longer has it."""
        bot = self.bot
        if preset not in bot.engine.presets.by_name:
            preset = None
        sampling = with_server_model(bot, interaction, CardChoices(preset=preset))
        with bot.describes.hold(interaction.user.id):
            deferred = await think_in_public(interaction)
            async with bot.pending_describes.held(interaction, deferred):
                mode = bot.settings.interrogate.mode
                stored = await describe_for(bot, interaction, image, sha256, mode, sampling.preset)
                await self._keep_choices(stored.id, sampling)
                await asyncio.to_thread(SourceImages(bot.sources_dir).save, sha256, image)
                count = bot.servers.default_count(interaction.guild_id)
                await self._post_card(interaction, stored, count, image)

    async def _keep_choices(self, card_id: int, sampling: CardChoices) -> None:
        """What the member chose with the image, kept by its card: the model and the sampling settings."""
        store = self.bot.store
        if sampling.preset is not None:
            await store.set_card_preset(card_id, sampling.preset)
        if sampling.sampling:
            await store.set_card_sampling(
                card_id,
                steps=sampling.steps,
                guidance=sampling.guidance,
                aspect=sampling.aspect,
                scheduler=sampling.scheduler,
            )

    async def _post_card(
        self, interaction: discord.Interaction, stored: StoredInterrogation, count: int, image: Image.Image
    ) -> None:
        """An image's prompt card, in place of the public placeholder that answered `interaction`."""
        # Shrinking and encoding a large upload takes tens of milliseconds: off the event loop.
        thumbnail = await asyncio.to_thread(thumbnail_file, image)
        message = await card_message(
            self.bot,
            stored,
            interaction.user.display_name,
            count,
            thumbnail,
            guild_id=interaction.guild_id,
            locale=channel_locale(interaction),
        )
        await answer_deferred(interaction, message)
        placeholder_replaced(interaction)

    async def download(self, source: ImageSource, limit_bytes: int) -> bytes:
        """Fetch an image from Discord's own hosts only, without redirects, and never past the size cap."""
        assert self.session is not None
        url = yarl.URL(source.url)
        if not downloadable(url, self.bot.settings.discord.api_base):
            raise Refusal("I only download images hosted by Discord; attach the file instead.")
        try:
            async with self.session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise Refusal("Discord would not give me that file any more; upload it again.")
                chunks, total = [], 0
                async for chunk in response.content.iter_chunked(64 * 1024):
                    total += len(chunk)
                    if total > limit_bytes:
                        raise ImageError(
                            f"That file is larger than the {limit_bytes // (1024 * 1024)} MB limit."
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("download of %s failed: %s", url.with_query(None), exc)
            raise Refusal("I could not download that image; try again in a moment.") from None


async def describe_for(
    bot: I2P2IBot,
    interaction: discord.Interaction,
    image: Image.Image,
    sha256: str,
    mode: str,
    preset: str | None = None,
) -> StoredInterrogation:
    """Describe an image for the member of `interaction` on the GPU thread (or from the cache), stored;
    with the CLIP of `preset` (None: the default preset)."""
    engine = bot.engine
    log.info("describing %s for user %d in mode %s", sha256[:12], interaction.user.id, mode)
    return await bot.interrogations.interrogate(
        lambda: engine.interrogate(image, mode, key=sha256, preset=preset),
        source_sha256=sha256,
        mode=mode,
        models=described_with(bot, preset),
        user_id=interaction.user.id,
        guild_id=interaction.guild_id,
        channel_id=interaction.channel_id,
    )


def downloadable(url: yarl.URL, api_base: str) -> bool:
    """Whether the bot may fetch ``url``: Discord's file hosts over https, or exactly the origin (scheme,
    host, port) of a proxy or loopback Discord configured as ``discord.api_base``."""
    if url.scheme == "https" and url.host in DISCORD_MEDIA_HOSTS and url.explicit_port in (None, 443):
        return True
    base = yarl.URL(api_base)
    if base.host in DISCORD_API_HOSTS:
        return False
    return (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)


# -- what a source image is ---------------------------------------------------------------------------------


class ImageSource:
    """An image a member pointed at: an attachment or an embed's image, with what Discord says of it."""

    def __init__(
        self,
        url: str,
        filename: str,
        size: int | None,
        width: int | None,
        height: int | None,
        content_type: str | None,
    ) -> None:
        self.url = url
        self.filename = filename
        self.size = size
        self.width = width
        self.height = height
        self.content_type = content_type


def image_source(attachment: discord.Attachment) -> ImageSource:
    return ImageSource(
        attachment.url,
        attachment.filename,
        attachment.size,
        attachment.width,
        attachment.height,
        attachment.content_type,
    )


def message_images(message: discord.Message) -> list[ImageSource]:
    """The message's image attachments, then its embeds' images (through Discord's media proxy)."""
    found = [
        image_source(a)
        for a in message.attachments
        if (a.content_type or "").startswith("image/") or a.width is not None
    ]
    for embed in message.embeds:
        for media in (embed.image, embed.thumbnail):
            url = media.proxy_url or media.url
            if url:
                name = Path(yarl.URL(url).path).name or "embedded image"
                found.append(ImageSource(url, name, None, media.width, media.height, None))
                break
    return found


async def card_message(
    bot: I2P2IBot,
    stored: StoredInterrogation,
    owner_name: str,
    count: int,
    thumbnail: discord.File | None,
    *,
    guild_id: int | None,
    locale: str | None,
) -> dict[str, Any]:
    """The card as it stands: its prompts and buttons, and the choices its member made on it (SQLite).

    A card is public: `locale` is its channel's (replies.channel_locale)."""
    result = stored.interrogation
    choices = await bot.store.card_choices(stored.id)
    suggestion = choices.negative_prompt or await known_negative(bot, stored)
    banned = bot.servers.banned(guild_id).find(choices.prompt or result.prompt)
    embed = prompt_card(
        stored,
        owner_name,
        choices=choices,
        suggestion=suggestion,
        default_negative=bot.servers.generate(guild_id).negative_prompt,
        banned=banned,
        locale=locale,
    )
    presets = bot.engine.presets
    chosen = choices.preset or presets.default
    view = card_view(
        stored,
        count,
        choices,
        offered=bot.engine.guides_for(choices.preset),
        presets=[n for n in presets.names if n != chosen],
        blocked=bool(banned),
        locale=locale,
    )
    message: dict[str, Any] = {"embed": embed, "view": view}
    if thumbnail is not None:
        message["file"] = thumbnail
    return message


def card_view(
    stored: StoredInterrogation,
    count: int,
    choices: CardChoices,
    *,
    offered: Sequence[GuideName] = (),
    presets: Sequence[str] = (),
    blocked: bool = False,
    locale: str | None = None,
) -> discord.ui.View:
    """Generate, Edit, Apply or Remove negative, More prompts and Settings; Use #k for each listed prompt;
    Re-describe or another model (`presets`); Keep from the image where the card's model is `offered`
    guides (or still keeps some it is not, for Prompt only to clear them), and Guide weights once an
    offered one is kept.

    Each group has its row (at most five, five, one, one and one items), so no row passes Discord's five
    buttons and the card stays within its five rows.
    """
    view = discord.ui.View(timeout=None)
    card = stored.id
    result = stored.interrogation
    generate = CardButton(
        "gen",
        card,
        count,
        label=tr(locale, "Generate ×{count}", count=count),
        style=discord.ButtonStyle.success,
        row=0,
    )
    generate.item.disabled = blocked
    view.add_item(generate)
    view.add_item(CardButton("edit", card, count, label=tr(locale, "Edit prompt"), emoji="✏️", row=0))
    if result.mode != "negative":  # a negative card's images have its words as their negative already
        if choices.negative_prompt is None:
            label = tr(locale, "Apply negative")
            view.add_item(CardButton("neg", card, count, label=label, emoji="🚫", row=0))
        else:
            view.add_item(
                CardButton(
                    "noneg",
                    card,
                    count,
                    label=tr(locale, "Remove negative"),
                    emoji="↩️",
                    style=discord.ButtonStyle.primary,
                    row=0,
                )
            )
    listed = listed_prompts(result, choices)
    hidden = len(result.ranked[:MAX_LISTED_PROMPTS]) - len(listed)
    if hidden > 0:
        label = tr(locale, "More prompts ({count})", count=hidden)
        view.add_item(CardButton("more", card, count, label=label, emoji="📜", row=0))
    view.add_item(CardButton("set", card, count, label=tr(locale, "Settings"), emoji="⚙️", row=0))
    if len(listed) > 1:
        for k in range(1, len(listed) + 1):
            view.add_item(CardButton("use", card, count, k=k, label=tr(locale, "Use #{k}", k=k), row=1))
    view.add_item(ModeSelect(card, count, current=result.mode, presets=presets, locale=locale))
    if offered or choices.keep:
        view.add_item(KeepSelect(card, count, offered=offered, keep=choices.keep, locale=locale))
        if offered and choices.keep:
            label = tr(locale, "Guide weights")
            view.add_item(CardButton("wts", card, count, label=label, emoji="⚖️", row=4))
    return view


def with_server_model(bot: I2P2IBot, interaction: discord.Interaction, choices: CardChoices) -> CardChoices:
    """A member's choices with the server's model where they name none: the card is described with its
    CLIP and keeps it, and the job records it, as if the member had chosen it."""
    if choices.preset is not None:
        return choices
    server = bot.servers.get(interaction.guild_id)
    return dataclasses.replace(choices, preset=bot.engine.presets.server_model(server, interaction.guild_id))


def described_with(bot: I2P2IBot, preset: str | None = None) -> dict[str, str]:
    """The models a description for a preset made now is recorded with (the cache key's models)."""
    return {k: v for k, v in bot.engine.models_for(preset).items() if k != "generator"}


def preset_choices(bot: I2P2IBot, current: str) -> list[app_commands.Choice[str]]:
    """The model presets whose names contain what the member typed, the default first (at most 25)."""
    presets = bot.engine.presets
    typed = current.strip().lower()
    names = [n for n in presets.names if typed in n]
    names.sort(key=lambda n: n != presets.default)
    return [app_commands.Choice(name=f"{n} ({presets.get(n).family})", value=n) for n in names[:25]]


async def known_negative(bot: I2P2IBot, stored: StoredInterrogation) -> str | None:
    """The negative suggestion for a card's image, where it is known without the GPU: the card's own (a
    candidates card's), or a negative description of the same image already stored."""
    own = stored.interrogation.negative_suggestion
    if own or stored.interrogation.mode == "negative":
        return own
    preset = (await bot.store.card_choices(stored.id)).preset
    hit = await bot.store.find_interrogation(stored.source_sha256, "negative", described_with(bot, preset))
    return hit[1].negative if hit is not None else None


async def work_out_negative(bot: I2P2IBot, stored: StoredInterrogation) -> str:
    """The negative suggestion for a card's image, described now on the GPU thread from its features and
    stored as the image's negative description, so the next card of it finds it at once."""
    sha256 = stored.source_sha256
    image = await saved_source(bot, sha256)
    engine = bot.engine
    preset = (await bot.store.card_choices(stored.id)).preset
    log.info("suggesting a negative prompt for card %d (%s)", stored.id, sha256[:12])
    described = await bot.interrogations.result(
        lambda: engine.interrogate(image, "negative", key=sha256, preset=preset),
        source_sha256=sha256,
        mode="negative",
        models=described_with(bot, preset),
        user_id=stored.user_id,
    )
    if not described.negative:
        raise Refusal("I found no negative prompt to suggest for this image.")
    return described.negative


def owner_name(interaction: discord.Interaction, stored: StoredInterrogation) -> str:
    """The card owner's name for its footer, also when an admin presses its buttons."""
    user: discord.abc.User | None = interaction.user
    if interaction.user.id != stored.user_id:
        member = interaction.guild.get_member(stored.user_id) if interaction.guild else None
        user = member or interaction.client.get_user(stored.user_id)
    return user.display_name if user is not None else f"member {stored.user_id}"


async def _owned_card(bot: I2P2IBot, interaction: discord.Interaction, card_id: int) -> StoredInterrogation:
    stored = await bot.store.get_interrogation(card_id)
    if stored is None:
        raise Refusal("That card's history was deleted; run /imagine-from again.")
    if stored.user_id != interaction.user.id and not bot.is_admin(interaction.user):
        raise Refusal(
            f"This card belongs to <@{stored.user_id}>; run /imagine-from (or right-click the image → "
            "Apps → Imagine from image) to get your own."
        )
    return stored


class CardButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=(
        r"i2p:card:(?P<action>gen|edit|use|neg|noneg|more|set|wts)"
        r":(?P<card>\d+):(?P<count>\d+)(?::(?P<k>\d+))?"
    ),
):
    """Generate, Edit prompt, Use #k, Apply/Remove negative, More prompts, Settings and Guide weights.

    The card and the member's choices on it are read back from SQLite on every press. Apply and Remove
    negative each set the state they name, so a double press or an old copy of the card changes nothing
    twice.
    """

    def __init__(
        self,
        action: str,
        card: int,
        count: int,
        *,
        k: int | None = None,
        label: str = "",
        style: discord.ButtonStyle = discord.ButtonStyle.secondary,
        emoji: str | None = None,
        row: int | None = None,
    ) -> None:
        custom_id = f"i2p:card:{action}:{card}:{count}" + (f":{k}" if k is not None else "")
        super().__init__(
            discord.ui.Button(label=label or action, style=style, emoji=emoji, custom_id=custom_id, row=row)
        )
        self.action, self.card, self.count, self.k = action, card, count, k

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> CardButton:
        k = int(match["k"]) if match["k"] else None
        return cls(match["action"], int(match["card"]), int(match["count"]), k=k)

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        try:
            stored = await _owned_card(bot, interaction, self.card)
            if self.action in ("gen", "edit", "use"):
                await self._make(bot, interaction, stored)
                return
            if self.action == "set":
                choices = await bot.store.card_choices(stored.id)
                server = bot.servers.get(interaction.guild_id)
                settings = bot.engine.presets.settings_for(choices.preset, server, bot.servers.base)
                modal = SamplingModal(
                    stored, self.count, choices, settings, locale=member_locale(interaction)
                )
                await interaction.response.send_modal(modal)
                return
            if self.action == "wts":
                choices = await bot.store.card_choices(stored.id)
                if not choices.keep:
                    raise Refusal(
                        "This card keeps the prompt only; choose what to keep from the image first."
                    )
                weights = WeightsModal(stored, self.count, choices.keep, locale=member_locale(interaction))
                await interaction.response.send_modal(weights)
                return
            if self.action == "more":
                await bot.store.show_all_card_prompts(stored.id)
            elif self.action == "noneg":
                await bot.store.set_card_negative(stored.id, None)
            else:
                await self._apply_negative(bot, interaction, stored)
            await self._redraw(bot, interaction, stored)
        except Exception as exc:
            await report_error(interaction, exc)

    async def _make(
        self, bot: I2P2IBot, interaction: discord.Interaction, stored: StoredInterrogation
    ) -> None:
        result = stored.interrogation
        prompts = result.image_prompts
        prompt = prompts[(self.k or 1) - 1] if (self.k or 1) <= len(prompts) else prompts[0]
        choices = await bot.store.card_choices(stored.id)
        if self.k is None and choices.prompt is not None:  # Generate and Edit use the member's own
            prompt = choices.prompt
        negative = result.image_negative if choices.negative_prompt is None else choices.negative_prompt
        server = bot.servers.get(interaction.guild_id)
        settings = bot.engine.presets.settings_for(choices.preset, server, bot.servers.base)
        request = sampled_request(prompt, negative, min(self.count, settings.max_count), choices, settings)
        if choices.keep:
            request = dataclasses.replace(request, keep=choices.keep, guide_source=stored.source_sha256)
        draft = JobRequest(
            owner_id=interaction.user.id,
            request=request,
            origin="card",
            interrogation_id=stored.id,
            source_sha256=stored.source_sha256,
        )
        if self.action == "edit":
            modal = PromptModal(draft, settings=settings, locale=member_locale(interaction))
            await interaction.response.send_modal(modal)
            return
        await start_job(bot, interaction, draft)

    async def _apply_negative(
        self, bot: I2P2IBot, interaction: discord.Interaction, stored: StoredInterrogation
    ) -> None:
        if stored.interrogation.mode == "negative":
            raise Refusal("This card's words are its images' negative prompt already.")
        suggestion = await known_negative(bot, stored)
        if suggestion is None:
            # Seconds on a busy GPU: Discord shows the press as pending meanwhile.
            await interaction.response.defer()
            suggestion = await work_out_negative(bot, stored)
        check_length(suggestion, negative=True)  # as a typed one would be, before the card shows it
        await bot.store.set_card_negative(stored.id, suggestion)

    async def _redraw(
        self, bot: I2P2IBot, interaction: discord.Interaction, stored: StoredInterrogation
    ) -> None:
        await redraw_card(bot, interaction, stored, self.count)


async def redraw_card(
    bot: I2P2IBot, interaction: discord.Interaction, stored: StoredInterrogation, count: int
) -> None:
    """Show the card as its choices now stand, in place."""
    message = await card_message(
        bot,
        stored,
        owner_name(interaction, stored),
        count,
        None,
        guild_id=interaction.guild_id,
        locale=channel_locale(interaction),
    )
    if interaction.response.is_done():
        await interaction.edit_original_response(**message)
    else:
        await interaction.response.edit_message(**message)


# A model option's value: the preset's name after it (modes are plain words, so the two never meet).
MODEL_OPTION = "model:"
# Discord's limit on a select option's value.
SELECT_VALUE_MAX = 100


class ModeSelect(
    discord.ui.DynamicItem[discord.ui.Select[Any]], template=r"i2p:card:mode:(?P<card>\d+):(?P<count>\d+)"
):
    """Re-describe the card's image in another mode, in place, or make its images with another model
    preset; what the member chose for its images stays.

    Models share this select because the card's five rows are all taken and the Settings modal holds its
    five inputs already; a model choice is kept on the card and Generate uses it.
    """

    def __init__(
        self,
        card: int,
        count: int,
        *,
        current: str | None = None,
        presets: Sequence[str] = (),
        locale: str | None = None,
    ) -> None:
        options = [
            discord.SelectOption(
                label=tr(locale, "Re-describe: {mode}", mode=m),
                value=m,
                description=tr(locale, MODE_LABELS[m])[:100],
                default=False,
            )
            for m in MODES
            if m != current
        ]
        options += [
            discord.SelectOption(
                label=tr(locale, "Model: {name}", name=name)[:100],
                value=MODEL_OPTION + name,
                description=tr(locale, "Make this card's images with this model")[:100],
            )
            for name in presets
            if len(MODEL_OPTION + name) <= SELECT_VALUE_MAX
        ][: MAX_SELECT_OPTIONS - len(options)]
        super().__init__(
            discord.ui.Select(
                custom_id=f"i2p:card:mode:{card}:{count}",
                placeholder=tr(locale, "Re-describe…"),
                options=options,
                row=2,
            )
        )
        self.card, self.count = card, count

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> ModeSelect:
        return cls(int(match["card"]), int(match["count"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        mode = self.item.values[0]
        if mode.startswith(MODEL_OPTION):
            await self._choose_model(interaction, mode.removeprefix(MODEL_OPTION))
            return
        try:
            stored = await _owned_card(bot, interaction, self.card)
            image = await saved_source(bot, stored.source_sha256)
            before = await bot.store.card_choices(stored.id)
            with bot.describes.hold(interaction.user.id):
                await interaction.response.defer()
                fresh = await describe_for(bot, interaction, image, stored.source_sha256, mode, before.preset)
            # What the member chose for the card's images (the applied suggestion, which is the image's
            # whatever the mode; settings; guides; the model preset) carries over to the new card of the
            # same image.
            chosen = await bot.store.card_choices(stored.id)
            if mode == "negative":  # a negative card's words are its images' negative prompt
                chosen = dataclasses.replace(chosen, negative_prompt=None)
            await bot.store.carry_card_choices(fresh.id, chosen)
            if before.preset is not None:
                await bot.store.set_card_preset(fresh.id, before.preset)
            message = await card_message(
                bot,
                fresh,
                interaction.user.display_name,
                self.count,
                None,
                guild_id=interaction.guild_id,
                locale=channel_locale(interaction),
            )
            await interaction.edit_original_response(**message)
        except Exception as exc:
            await report_error(interaction, exc)

    async def _choose_model(self, interaction: discord.Interaction, name: str) -> None:
        """Keep the preset on the card (one that is gone from the config is refused) and show it."""
        bot = bot_of(interaction)
        try:
            stored = await _owned_card(bot, interaction, self.card)
            preset = bot.engine.presets.get(name).name
            await bot.store.set_card_preset(stored.id, preset)
            await redraw_card(bot, interaction, stored, self.count)
        except Exception as exc:
            await report_error(interaction, exc)


PROMPT_ONLY = "prompt"


class KeepSelect(
    discord.ui.DynamicItem[discord.ui.Select[Any]], template=r"i2p:card:keep:(?P<card>\d+):(?P<count>\d+)"
):
    """Keep from the image: the guides the card's images keep of its image besides the prompt.

    Only the guides the card's model is offered are listed; each chosen one keeps the weight it had, or
    starts at its default (Guide weights changes them). Adding "Prompt only" to a choice of guides clears
    them.
    """

    def __init__(
        self,
        card: int,
        count: int,
        *,
        offered: Sequence[GuideName] = GUIDE_NAMES,
        keep: Sequence[Guide] = (),
        locale: str | None = None,
    ) -> None:
        weights = {g.name: g.weight for g in keep}
        options = [
            discord.SelectOption(
                label=tr(locale, "Prompt only"),
                value=PROMPT_ONLY,
                description=tr(locale, "What the prompt says"),
                default=not keep,
            )
        ]
        for name in offered:
            kind = GUIDE_KINDS[name]
            weight = weights.get(name, kind.default_weight)
            options.append(
                discord.SelectOption(
                    label=name.capitalize(),
                    value=name,
                    description=tr(
                        locale,
                        "Keeps {keeps} · weight {weight}",
                        keeps=tr(locale, kind.keeps),
                        weight=f"{weight:g}",
                    )[:100],
                    default=name in weights,
                )
            )
        super().__init__(
            discord.ui.Select(
                custom_id=f"i2p:card:keep:{card}:{count}",
                placeholder=tr(locale, "Keep from the image…"),
                min_values=1,
                max_values=len(options),
                options=options,
                row=3,
            )
        )
        self.card, self.count = card, count

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> KeepSelect:
        return cls(int(match["card"]), int(match["count"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        try:
            stored = await _owned_card(bot, interaction, self.card)
            choices = await bot.store.card_choices(stored.id)
            keep = chosen_guides(bot, self.item.values, choices.keep, choices.preset)
            await bot.store.set_card_keep(stored.id, keep)
            await redraw_card(bot, interaction, stored, self.count)
        except Exception as exc:
            await report_error(interaction, exc)


def chosen_guides(
    bot: I2P2IBot, values: Sequence[str], before: Sequence[Guide], preset: str | None
) -> tuple[Guide, ...]:
    """The guides a Keep from the image choice means for a card of model `preset`: each with the weight
    it had, or its default; none when Prompt only was added to guides already chosen."""
    if PROMPT_ONLY in values and before:
        return ()
    weights = {g.name: g.weight for g in before}
    guides = []
    for value in values:
        if value == PROMPT_ONLY:
            continue
        name = next((n for n in GUIDE_NAMES if n == value), None)
        if name is None:
            raise Refusal("Choose from the guides listed.")
        check_offered(bot, (name,), preset)
        guides.append(Guide(name, weights.get(name, GUIDE_KINDS[name].default_weight)))
    return check_guides(guides)


class WeightsModal(discord.ui.Modal):
    """A card's Guide weights: one input for each guide it keeps (at most five guides exist)."""

    def __init__(
        self, stored: StoredInterrogation, count: int, keep: Sequence[Guide], *, locale: str | None
    ) -> None:
        super().__init__(title=tr(locale, "Guide weights"), timeout=15 * 60)
        self.stored, self.count = stored, count
        self.inputs: list[tuple[GuideName, discord.ui.TextInput[WeightsModal]]] = []
        for guide in keep:
            kind = guide.kind
            label = tr(
                locale,
                "{guide} weight {range}, default {default}",
                guide=guide.name.capitalize(),
                range=kind.weight_range,
                default=f"{kind.default_weight:g}",
            )
            field: discord.ui.TextInput[WeightsModal] = discord.ui.TextInput(
                label=label[:45],
                default=f"{guide.weight:g}",
                max_length=8,
            )
            self.inputs.append((guide.name, field))
            self.add_item(field)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        try:
            keep = check_guides(self.parsed())
        except GuideError as exc:
            raise Refusal(str(exc)) from None
        preset = (await bot.store.card_choices(self.stored.id)).preset
        check_offered(bot, (guide.name for guide in keep), preset)
        await bot.store.set_card_keep(self.stored.id, keep)
        await redraw_card(bot, interaction, self.stored, self.count)

    def parsed(self) -> list[Guide]:
        guides = []
        for name, field in self.inputs:
            text = field.value.strip()
            try:
                weight = float(text)
            except ValueError:
                raise Refusal(
                    f"The {name} weight must be a number like 0.6; you typed “{text[:20]}”."
                ) from None
            guides.append(Guide(name, weight))
        return guides

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]
        await report_error(interaction, error)


def sampled_request(
    prompt: str, negative: str | None, count: int, choices: CardChoices, settings: GenerateSettings
) -> GenerationRequest:
    """A request with a member's sampling choices; an aspect ratio becomes the model's size for it."""
    width = height = None
    if choices.aspect is not None:
        width, height = size_for_aspect(choices.aspect, settings)
    return GenerationRequest(
        prompt,
        negative_prompt=negative,
        count=count,
        steps=choices.steps,
        guidance=choices.guidance,
        width=width,
        height=height,
        scheduler=choices.scheduler,
        preset=choices.preset,
    )


class SamplingModal(discord.ui.Modal):
    """A card's Settings: images, steps, guidance, aspect ratio and scheduler for its images."""

    def __init__(
        self,
        stored: StoredInterrogation,
        count: int,
        choices: CardChoices,
        settings: GenerateSettings,
        *,
        locale: str | None,
    ) -> None:
        super().__init__(title=tr(locale, "Image settings"), timeout=15 * 60)
        self.stored, self.settings = stored, settings
        self.preset = choices.preset
        guidance = settings.guidance if choices.guidance is None else choices.guidance
        self.images: discord.ui.TextInput[SamplingModal] = discord.ui.TextInput(
            label=tr(locale, "Images (1–{high})", high=settings.max_count), default=str(count), max_length=3
        )
        self.steps: discord.ui.TextInput[SamplingModal] = discord.ui.TextInput(
            label=tr(locale, "Steps (1–{high})", high=settings.max_steps),
            default=str(settings.steps if choices.steps is None else choices.steps),
            max_length=4,
        )
        self.guidance: discord.ui.TextInput[SamplingModal] = discord.ui.TextInput(
            label=tr(locale, "Guidance, CFG (0–{high})", high=f"{MAX_GUIDANCE:g}"),
            default=f"{guidance:g}",
            max_length=6,
        )
        self.aspect: discord.ui.TextInput[SamplingModal] = discord.ui.TextInput(
            label=tr(locale, "Aspect ratio ({choices})", choices=", ".join(ASPECT_RATIOS)),
            default=choices.aspect,
            required=False,
            max_length=5,
            placeholder=tr(
                locale,
                "blank: the server's size, {width}×{height}",
                width=settings.width,
                height=settings.height,
            ),
        )
        self.scheduler: discord.ui.TextInput[SamplingModal] = discord.ui.TextInput(
            label=tr(locale, "Scheduler ({choices})", choices=" or ".join(SCHEDULERS)),
            default=choices.scheduler or settings.scheduler,
            max_length=4,
        )
        for item in (self.images, self.steps, self.guidance, self.aspect, self.scheduler):
            self.add_item(item)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        bot = bot_of(interaction)
        count, choices = self.parsed()
        # The one validator decides, with this server's bounds.
        server = bot.servers.get(interaction.guild_id)
        bot.engine.plan(sampled_request("check", None, count, choices, self.settings), server)
        # A value left at the server's default keeps following it.
        s = self.settings
        await bot.store.set_card_sampling(
            self.stored.id,
            steps=None if choices.steps == s.steps else choices.steps,
            guidance=None if choices.guidance == s.guidance else choices.guidance,
            aspect=choices.aspect,
            scheduler=None if choices.scheduler == s.scheduler else choices.scheduler,
        )
        message = await card_message(
            bot,
            self.stored,
            owner_name(interaction, self.stored),
            count,
            None,
            guild_id=interaction.guild_id,
            locale=channel_locale(interaction),
        )
        await interaction.response.edit_message(**message)

    def parsed(self) -> tuple[int, CardChoices]:
        images = _whole(self.images.value, "Images")
        steps = _whole(self.steps.value, "Steps")
        text = self.guidance.value.strip()
        try:
            guidance = float(text)
        except ValueError:
            raise Refusal(f"Guidance must be a number like 7.5; you typed “{text[:20]}”.") from None
        aspect = self.aspect.value.strip() or None
        if aspect is not None and aspect not in ASPECT_RATIOS:
            raise Refusal(
                f"The aspect ratio must be one of {', '.join(ASPECT_RATIOS)}; you typed “{aspect}”."
            )
        scheduler = self.scheduler.value.strip().lower()
        if scheduler not in SCHEDULERS:
            raise Refusal(f"The scheduler must be {' or '.join(SCHEDULERS)}; you typed “{scheduler[:20]}”.")
        return images, CardChoices(
            steps=steps, guidance=guidance, aspect=aspect, scheduler=scheduler, preset=self.preset
        )

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:  # type: ignore[override]
        await report_error(interaction, error)


def _whole(text: str, name: str) -> int:
    value = whole_number(text.strip())
    if value is None:
        raise Refusal(f"{name} must be a whole number; you typed “{text.strip()[:20]}”.")
    return value


async def saved_source(bot: I2P2IBot, sha256: str) -> Image.Image:
    """The normalised image kept for a card (SourceImages.save), or one sentence when it is gone."""
    path = bot.store.source_path(sha256)
    if path is None or not path.exists():
        raise Refusal("I no longer have that image; run /imagine-from again.")
    return await asyncio.to_thread(_open_png, path)


def _open_png(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class ChooseImageView(PrivateView):
    """When a message holds several images: pick one (ephemeral, so it can live in memory)."""

    def __init__(
        self, cog: ImagineCog, sources: list[ImageSource], user_id: int, *, locale: str | None
    ) -> None:
        super().__init__(user_id, timeout=600)
        self.cog, self.sources, self.user_id = cog, sources[:25], user_id
        select: discord.ui.Select[ChooseImageView] = discord.ui.Select(
            placeholder=tr(locale, "Choose an image"),
            options=[
                discord.SelectOption(label=f"{k + 1}. {s.filename}"[:100], value=str(k))
                for k, s in enumerate(self.sources)
            ],
        )
        select.callback = self.chosen  # type: ignore[method-assign]
        self.select = select
        self.add_item(select)

    async def chosen(self, interaction: discord.Interaction) -> None:
        try:
            k = whole_number(self.select.values[0])
            if k is None or k >= len(self.sources):  # not a value this picker offered
                raise Refusal("Choose one of the images listed.")
            await self.cog.describe(interaction, self.sources[k], None, None, CardChoices())
        except Exception as exc:
            await report_error(interaction, exc)


async def setup(bot: I2P2IBot) -> None:
    bot.add_dynamic_items(CardButton, ModeSelect, KeepSelect)
    await bot.add_cog(ImagineCog(bot))
