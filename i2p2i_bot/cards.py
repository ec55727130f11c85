"""How prompt cards, job messages and results look: embeds, files and text, within Discord's limits."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import discord
from PIL import Image

from i2p2i_bot.flagged import FlaggedPolicy
from i2p2i_bot.guides import Guide
from i2p2i_bot.i18n import N_, tr, translate
from i2p2i_bot.interrogation import Candidate, Interrogation
from i2p2i_bot.jobs import UPSCALE, Job, JobStatus, Position
from i2p2i_bot.loras import describe as describe_loras
from i2p2i_bot.store import CardChoices, StoredImage, StoredInterrogation

COLOR = discord.Colour(0x5865F2)
COLOR_DONE = discord.Colour(0x57F287)
COLOR_FAILED = discord.Colour(0xED4245)
FIELD_VALUE_MAX = 1024
# A card's prompts and negative prompts together stay within an embed's 6000 characters: CLIP cuts a
# prompt to 77 tokens anyway, so these limits only ever shorten what would not fit.
PROMPT_SHOWN_MAX = 2048
LISTED_PROMPTS_CHARS = 3600
DEFAULT_NEGATIVE_SHOWN_MAX = 300
# One row of Use #k buttons.
MAX_LISTED_PROMPTS = 5
MAX_FILES = 10
THUMBNAIL_NAME = "source.jpg"
# Discord blurs an attachment whose name starts so until a member clicks it (discord.File(spoiler=True)
# names it so).
SPOILER_PREFIX = "SPOILER_"
MODE_LABELS = {
    "best": "Best: caption plus the flavours that raise the CLIP score most",
    "fast": "Fast: caption plus the top-ranked labels",
    "classic": "Classic: caption, medium, artist, movement",
    "negative": "Negative: what the image is not (for a negative prompt)",
    "candidates": "Candidates: best, fast and classic with scores",
}


def shorten(text: str, limit: int) -> str:
    """Text cut to a Discord limit with an ellipsis, never silently."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def code(text: str, limit: int) -> str:
    """A copyable block that fits in `limit` characters."""
    body = shorten(text.replace("```", "'''"), limit - 8)
    return f"```\n{body}\n```"


def thumbnail_file(image: Image.Image, side: int = 256) -> discord.File:
    copy = image.copy()
    copy.thumbnail((side, side))
    buffer = io.BytesIO()
    copy.save(buffer, format="JPEG", quality=85)
    buffer.seek(0)
    return discord.File(buffer, filename=THUMBNAIL_NAME)


def listed_prompts(result: Interrogation, choices: CardChoices) -> tuple[Candidate, ...]:
    """The prompts a card lists, each with Use #k: every one a candidates card offers, or a best card's
    after More prompts; otherwise the card's prompt alone, without Use buttons."""
    ranked = result.ranked
    if result.mode == "candidates" or choices.all_prompts:
        return ranked[:MAX_LISTED_PROMPTS]
    return ranked[:1]


def prompt_card(
    stored: StoredInterrogation,
    owner_name: str,
    *,
    choices: CardChoices | None = None,
    suggestion: str | None = None,
    default_negative: str = "",
    banned: Sequence[str] = (),
    locale: str | None = None,
) -> discord.Embed:
    """The prompt card: the prompt (or every prompt it offers, with its score) and the negative prompt its
    images get: the applied suggestion, or the server's default with the suggestion where one is known.
    In `locale`'s language (the channel's: replies.channel_locale)."""
    result: Interrogation = stored.interrogation
    choices = choices or CardChoices()
    embed = discord.Embed(colour=COLOR, title=tr(locale, "Prompt · {mode}", mode=result.mode))
    listed = listed_prompts(result, choices)
    if len(listed) > 1:
        embed.description = tr(locale, "Pick a prompt below with Use #k, or edit one.")
        # Room for the negative prompt fields within the embed's 6000 characters.
        limit = min(FIELD_VALUE_MAX, LISTED_PROMPTS_CHARS // len(listed))
        for k, candidate in enumerate(listed, start=1):
            embed.add_field(
                name=f"#{k} {candidate.mode} · CLIP {candidate.score:.3f}",
                value=code(candidate.prompt, limit),
                inline=False,
            )
    else:
        embed.description = code(result.prompt, PROMPT_SHOWN_MAX)
        embed.add_field(name=tr(locale, "CLIP score"), value=f"{result.score:.3f}", inline=True)
    if choices.prompt is not None:
        embed.add_field(
            name=tr(locale, "Your prompt · Generate and Edit prompt use it"),
            value=code(choices.prompt, FIELD_VALUE_MAX),
            inline=False,
        )
    if result.mode != "negative":
        if choices.negative_prompt is not None:
            embed.add_field(
                name=tr(locale, "Negative prompt · suggestion applied"),
                value=code(choices.negative_prompt, FIELD_VALUE_MAX),
                inline=False,
            )
        else:
            none = tr(locale, "none")
            embed.add_field(
                name=tr(locale, "Negative prompt · the server's default"),
                value=code(default_negative, DEFAULT_NEGATIVE_SHOWN_MAX) if default_negative else none,
                inline=False,
            )
            if suggestion:
                embed.add_field(
                    name=tr(locale, "Negative suggestion · Apply negative uses it"),
                    value=code(suggestion, FIELD_VALUE_MAX),
                    inline=False,
                )
    if choices.preset is not None:
        embed.add_field(name=tr(locale, "Model"), value=choices.preset, inline=False)
    if choices.sampling:
        embed.add_field(
            name=tr(locale, "Settings · yours"), value=sampling_text(choices, locale), inline=False
        )
    if choices.keep:
        embed.add_field(
            name=tr(locale, "Keep from the image"), value=guides_text(choices.keep, locale), inline=False
        )
    if banned:
        embed.add_field(
            name=tr(locale, "Cannot generate"),
            value=tr(
                locale,
                "This description contains banned terms ({terms}); edit it first.",
                terms=", ".join(banned),
            ),
            inline=False,
        )
    embed.set_thumbnail(url=f"attachment://{THUMBNAIL_NAME}")
    took = result.timings_s.get("total_s")
    footer = [tr(locale, "for {name}", name=owner_name), tr(locale, "card {card}", card=stored.id)]
    if stored.cached:
        footer.append(tr(locale, "cached"))
    elif took is not None:
        footer.append(f"{took:.1f} s")
    embed.set_footer(text=" · ".join(footer))
    return embed


def sampling_text(choices: CardChoices, locale: str | None = None) -> str:
    """A card's chosen sampling settings in one line; the server's defaults fill what is not chosen."""
    parts = []
    if choices.steps is not None:
        parts.append(tr(locale, "{steps} steps", steps=choices.steps))
    if choices.guidance is not None:
        parts.append(tr(locale, "guidance {guidance}", guidance=f"{choices.guidance:g}"))
    if choices.aspect is not None:
        parts.append(tr(locale, "aspect {aspect}", aspect=choices.aspect))
    if choices.scheduler is not None:
        parts.append(choices.scheduler)
    return tr(locale, "{settings} (the rest: the server's defaults)", settings=" · ".join(parts))


def guides_text(keep: Sequence[Guide], locale: str | None = None) -> str:
    """What images keep of their source besides the prompt, each guide with its weight, in one line."""
    if not keep:
        return tr(locale, "the prompt only")
    return " · ".join(f"{g.name} {g.weight:g} ({tr(locale, g.kind.keeps)})" for g in keep)


def status_text(
    job: Job,
    position: Position | None,
    *,
    locale: str | None,
    step: tuple[int, int] | None = None,
    images_done: int = 0,
    held: str | None = None,
) -> str:
    """The one-line status of a queued or running job, in `locale` (the job's own, Job.locale, on its
    message); ``held`` says why it waits for a restart."""
    if held is not None:
        return tr(
            locale,
            "⏸️ Job #{job}: {held}; they will be made once the bot has restarted.",
            job=job.id,
            held=translate(held, locale),
        )
    if position is not None and position.loading is not None:
        return tr(locale, "🔄 Job #{job}: loading model {model}…", job=job.id, model=position.loading)
    if position is not None and position.blocked is not None:
        return tr(
            locale,
            "⏳ Job #{job} is queued, {reason}.",
            job=job.id,
            reason=translate(position.blocked, locale),
        )
    if job.status is JobStatus.QUEUED or (position is not None and position.status is JobStatus.QUEUED):
        if position is None:
            return tr(locale, "⏳ Job #{job} is queued.", job=job.id)
        ahead = position.images_ahead
        eta = ""
        if position.eta_s:
            eta = tr(locale, ", about {duration} to go", duration=_duration(position.eta_s, locale))
        if ahead == 0:
            return tr(locale, "⏳ Job #{job} is next in line{eta}.", job=job.id, eta=eta)
        if ahead == 1:
            return tr(locale, "⏳ Job #{job} is queued: 1 image ahead{eta}.", job=job.id, eta=eta)
        return tr(
            locale, "⏳ Job #{job} is queued: {ahead} images ahead{eta}.", job=job.id, ahead=ahead, eta=eta
        )
    count = job.request.count
    if count == 1:
        parts = [tr(locale, "🎨 Job #{job}: making 1 image", job=job.id)]
    else:
        parts = [tr(locale, "🎨 Job #{job}: making {count} images", job=job.id, count=count)]
    if images_done:
        parts.append(tr(locale, "{done}/{count} done", done=images_done, count=count))
    if step is not None:
        parts.append(tr(locale, "step {step}/{steps}", step=step[0], steps=step[1]))
    return " · ".join(parts) + "…"


def _duration(seconds: float | None, locale: str | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return tr(locale, "{seconds} s", seconds=max(1, round(seconds)))
    return tr(locale, "{minutes} min", minutes=round(seconds / 60))


@dataclass(frozen=True)
class ResultFiles:
    blobs: list[tuple[str, bytes]]
    withheld_nsfw: int
    left_out: int
    # What the images the safety checker flagged got here (flagged.py).
    flagged: FlaggedPolicy = FlaggedPolicy.WITHHOLD

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.blobs]

    @property
    def cover(self) -> str | None:
        """The file the embed shows: the grid or the best image, never one hidden as a spoiler."""
        return next((name for name in self.names if not name.startswith(SPOILER_PREFIX)), None)

    def files(self) -> list[discord.File]:
        """Fresh file objects for one send (discord.py closes them after each request)."""
        return [discord.File(io.BytesIO(data), filename=name) for name, data in self.blobs]


def result_files(
    images: Sequence[tuple[StoredImage, Image.Image]],
    limit_bytes: int,
    *,
    job_id: int,
    flagged: FlaggedPolicy = FlaggedPolicy.WITHHOLD,
) -> ResultFiles:
    """A grid of every image plus the single images, best fidelity first, within the upload limit.

    Images the safety checker flagged are withheld (and were blacked out) unless `flagged` says the place
    may show them: as spoilers (singles after the others, never in the grid, which Discord would not
    blur), or as any other image. The grid comes first, then singles while they fit; if even the grid
    does not fit, it is sent as JPEG.
    """
    ranked = sorted(images, key=lambda pair: -(pair[0].fidelity if pair[0].fidelity is not None else -2.0))
    plain = [(meta, img) for meta, img in ranked if not meta.nsfw or flagged is FlaggedPolicy.SHOW]
    spoilers = [(meta, img) for meta, img in ranked if meta.nsfw and flagged is FlaggedPolicy.SPOILER]
    withheld = len(images) - len(plain) - len(spoilers)
    if not plain and not spoilers:
        return ResultFiles([], withheld, 0, flagged)
    budget = limit_bytes - 64 * 1024  # room for the multipart envelope and the JSON payload
    blobs: list[tuple[str, bytes]] = []
    if len(plain) > 1:
        grid = _grid([img for _, img in plain])
        data = _encode(grid, "PNG")
        name = f"job{job_id}-grid.png"
        if len(data) > budget:
            data, name = _encode(grid, "JPEG"), f"job{job_id}-grid.jpg"
        if len(data) <= budget:
            blobs.append((name, data))
            budget -= len(data)
    left_out = 0
    singles = [(meta, img, "") for meta, img in plain] + [
        (meta, img, SPOILER_PREFIX) for meta, img in spoilers
    ]
    for meta, img, prefix in singles:
        if len(blobs) >= MAX_FILES:
            left_out += 1
            continue
        data = _encode(img, "PNG")
        name = f"{prefix}job{job_id}-{meta.index + 1}-seed{meta.seed}.png"
        if len(data) > budget:
            data, name = _encode(img, "JPEG"), name.replace(".png", ".jpg")
        if len(data) > budget:
            left_out += 1
            continue
        blobs.append((name, data))
        budget -= len(data)
    return ResultFiles(blobs, withheld, left_out, flagged)


def _grid(images: Sequence[Image.Image]) -> Image.Image:
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), (32, 32, 32))
    for k, img in enumerate(images):
        grid.paste(img.resize((width, height)), ((k % cols) * width, (k // cols) * height))
    return grid


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def result_embed(job: Job, images: Sequence[StoredImage], files: ResultFiles) -> discord.Embed:
    """The finished job: its prompt, and each image's seed and fidelity, best first; in the job's language."""
    locale = job.locale
    failed = job.status is JobStatus.FAILED
    cancelled = job.status is JobStatus.CANCELLED
    colour = COLOR_FAILED if failed else (COLOR if cancelled else COLOR_DONE)
    if failed:
        title = tr(locale, "Job #{job} · failed", job=job.id)
    elif cancelled:
        title = tr(locale, "Job #{job} · cancelled", job=job.id)
    else:
        title = tr(locale, "Job #{job}", job=job.id)
    embed = discord.Embed(colour=colour, title=title, description=code(job.request.prompt, 1500))
    if job.request.negative_prompt:
        embed.add_field(
            name=tr(locale, "Negative"),
            value=shorten(job.request.negative_prompt, FIELD_VALUE_MAX),
            inline=False,
        )
    if job.request.keep:
        embed.add_field(
            name=tr(locale, "Kept from the source"), value=guides_text(job.request.keep, locale), inline=False
        )
    if job.request.loras:
        embed.add_field(name="LoRAs", value=shorten(describe_loras(job.request.loras), FIELD_VALUE_MAX))
    ranked = sorted(images, key=lambda m: -(m.fidelity if m.fidelity is not None else -2.0))
    lines = []
    for meta in ranked:
        flag = tr(locale, _FLAGGED_NOTES[files.flagged]) if meta.nsfw else ""
        lines.append(f"#{meta.index + 1} seed `{meta.seed}` · {_fidelity(meta, locale)}{flag}")
    if lines:
        embed.add_field(
            name=tr(locale, "Images (closest to the source first)"),
            value=shorten("\n".join(lines), FIELD_VALUE_MAX),
        )
    notes = []
    if failed and job.error:
        notes.append(tr(locale, "Failed: {error}", error=translate(job.error, locale)))
    if cancelled:
        notes.append(
            tr(
                locale,
                "Cancelled after {made} of {count} images.",
                made=len(images),
                count=job.request.count,
            )
        )
    if files.withheld_nsfw:
        notes.append(
            tr(
                locale,
                "{count} image(s) withheld: the safety checker flagged them.",
                count=files.withheld_nsfw,
            )
        )
    if files.left_out:
        notes.append(
            tr(
                locale,
                "{count} image(s) did not fit in this channel's upload limit; use Info for seeds.",
                count=files.left_out,
            )
        )
    if notes:
        embed.add_field(
            name=tr(locale, "Notes"), value=shorten("\n".join(notes), FIELD_VALUE_MAX), inline=False
        )
    embed.set_footer(text=_settings_line(job, locale))
    if files.cover is not None:
        embed.set_image(url=f"attachment://{files.cover}")
    return embed


def _settings_line(job: Job, locale: str | None) -> str:
    p = job.request.params
    return tr(
        locale,
        "{width}×{height} · {steps} steps · guidance {guidance} · {scheduler}",
        width=p.width,
        height=p.height,
        steps=p.steps,
        guidance=f"{p.guidance:g}",
        scheduler=p.scheduler,
    )


def _fidelity(meta: StoredImage, locale: str | None) -> str:
    if meta.fidelity is None:
        return tr(locale, "no source")
    return tr(locale, "fidelity {fidelity}", fidelity=f"{meta.fidelity:.3f}")


# What a result's image line says of an image the safety checker flagged, by what it got there.
_FLAGGED_NOTES = {
    FlaggedPolicy.WITHHOLD: N_(" · withheld by the safety checker"),
    FlaggedPolicy.SPOILER: N_(" · flagged by the safety checker, posted as a spoiler"),
    FlaggedPolicy.SHOW: N_(" · flagged by the safety checker"),
}


def info_embed(
    job: Job,
    images: Sequence[StoredImage],
    models: dict[str, str],
    *,
    delivery: str | None = None,
    locale: str | None = None,
    upscaled_image: int | None = None,
) -> discord.Embed:
    """Everything about a job, for the Info button and /job (private: in the asking member's `locale`);
    ``delivery`` says why a result is not posted; ``upscaled_image`` is the index of the image of its
    parent job an upscale doubles, where that image is still known.

    A job Delete hid (only admins see it then) says so in its title and when and by whom it was hidden.
    """
    p = job.request.params
    status = tr(locale, STATUS_NAMES[job.status])
    if job.hidden_at is not None:
        title = tr(locale, "Job #{job} · {status} · hidden", job=job.id, status=status)
    else:
        title = tr(locale, "Job #{job} · {status}", job=job.id, status=status)
    embed = discord.Embed(colour=COLOR, title=title)
    if job.hidden_at is not None:
        when = f"<t:{int(job.hidden_at)}:R>"
        if job.hidden_by is not None:
            note = tr(
                locale,
                "Deleted by {member} {when}: only admins see it, and its image files are gone.",
                member=f"<@{job.hidden_by}>",
                when=when,
            )
        else:
            note = tr(locale, "Deleted {when}: only admins see it, and its image files are gone.", when=when)
        embed.add_field(name=tr(locale, "Hidden"), value=note, inline=False)
    embed.add_field(name=tr(locale, "Prompt"), value=code(job.request.prompt, FIELD_VALUE_MAX), inline=False)
    if job.request.negative_prompt:
        embed.add_field(
            name=tr(locale, "Negative"),
            value=code(job.request.negative_prompt, FIELD_VALUE_MAX),
            inline=False,
        )
    if job.request.keep:
        source = job.request.guide_source or "?"
        kept = tr(locale, "source image {source}", source=f"`{source[:12]}`")
        embed.add_field(
            name=tr(locale, "Kept from the source"),
            value=f"{guides_text(job.request.keep, locale)}\n{kept}",
            inline=False,
        )
    if job.request.loras:
        lines = [
            f"{lora.name} {lora.weight:g} · " + tr(locale, "file {sha}", sha=f"`{lora.sha256[:12]}`")
            for lora in job.request.loras
        ]
        embed.add_field(name="LoRAs", value=shorten("\n".join(lines), FIELD_VALUE_MAX), inline=False)
    embed.add_field(name=tr(locale, "Size"), value=f"{p.width}×{p.height}")
    embed.add_field(name=tr(locale, "Steps"), value=str(p.steps))
    embed.add_field(name=tr(locale, "Guidance"), value=f"{p.guidance:g}")
    embed.add_field(name=tr(locale, "Scheduler"), value=p.scheduler)
    embed.add_field(name=tr(locale, "Seeds"), value=", ".join(f"`{s}`" for s in job.request.seeds))
    embed.add_field(name=tr(locale, "Owner"), value=f"<@{job.owner_id}>")
    if images:
        flagged = tr(locale, " · flagged")
        per_image = [
            f"#{m.index + 1} `{m.seed}` · {_fidelity(m, locale)}" + (flagged if m.nsfw else "")
            for m in sorted(images, key=lambda m: m.index)
        ]
        embed.add_field(
            name=tr(locale, "Images"), value=shorten("\n".join(per_image), FIELD_VALUE_MAX), inline=False
        )
    embed.add_field(
        name=tr(locale, "Models"),
        value=shorten("\n".join(f"{k}: {v}" for k, v in models.items()), 1024),
        inline=False,
    )
    timing = [tr(locale, "queued {when}", when=f"<t:{int(job.created_at)}:R>")]
    if job.started_at and job.finished_at:
        timing.append(tr(locale, "ran {seconds} s", seconds=f"{job.finished_at - job.started_at:.1f}"))
    if job.attempts == 1:
        timing.append(tr(locale, "1 retry"))
    elif job.attempts:
        timing.append(tr(locale, "{count} retries", count=job.attempts))
    embed.add_field(name=tr(locale, "Timing"), value=" · ".join(timing), inline=False)
    if job.parent_job_id and job.origin == UPSCALE:
        parent = job.parent_job_id
        if upscaled_image is None:
            value = tr(locale, "job #{job}", job=parent)
        else:
            value = tr(locale, "job #{job}, image #{image}", job=parent, image=upscaled_image + 1)
        embed.add_field(name=tr(locale, "Upscale (2×) of"), value=value)
    elif job.parent_job_id:
        embed.add_field(
            name=tr(locale, "Rerolled from"), value=tr(locale, "job #{job}", job=job.parent_job_id)
        )
    if job.error:
        embed.add_field(
            name=tr(locale, "Error"),
            value=shorten(translate(job.error, locale), FIELD_VALUE_MAX),
            inline=False,
        )
    if delivery:
        embed.add_field(
            name=tr(locale, "Result"),
            value=shorten(translate(delivery, locale), FIELD_VALUE_MAX),
            inline=False,
        )
    return embed


# A job's status as /job, /history and Info name it.
STATUS_NAMES = {
    JobStatus.QUEUED: N_("queued"),
    JobStatus.RUNNING: N_("running"),
    JobStatus.COMPLETE: N_("complete"),
    JobStatus.FAILED: N_("failed"),
    JobStatus.CANCELLED: N_("cancelled"),
}
