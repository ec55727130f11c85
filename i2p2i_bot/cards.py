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
from i2p2i_bot.interrogation import Candidate, Interrogation
from i2p2i_bot.jobs import Job, JobStatus, Position
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
) -> discord.Embed:
    """The prompt card: the prompt (or every prompt it offers, with its score) and the negative prompt its
    images get: the applied suggestion, or the server's default with the suggestion where one is known."""
    result: Interrogation = stored.interrogation
    choices = choices or CardChoices()
    embed = discord.Embed(colour=COLOR, title=f"Prompt · {result.mode}")
    listed = listed_prompts(result, choices)
    if len(listed) > 1:
        embed.description = "Pick a prompt below with Use #k, or edit one."
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
        embed.add_field(name="CLIP score", value=f"{result.score:.3f}", inline=True)
    if choices.prompt is not None:
        embed.add_field(
            name="Your prompt · Generate and Edit prompt use it",
            value=code(choices.prompt, FIELD_VALUE_MAX),
            inline=False,
        )
    if result.mode != "negative":
        if choices.negative_prompt is not None:
            embed.add_field(
                name="Negative prompt · suggestion applied",
                value=code(choices.negative_prompt, FIELD_VALUE_MAX),
                inline=False,
            )
        else:
            embed.add_field(
                name="Negative prompt · the server's default",
                value=code(default_negative, DEFAULT_NEGATIVE_SHOWN_MAX) if default_negative else "none",
                inline=False,
            )
            if suggestion:
                embed.add_field(
                    name="Negative suggestion · Apply negative uses it",
                    value=code(suggestion, FIELD_VALUE_MAX),
                    inline=False,
                )
    if choices.preset is not None:
        embed.add_field(name="Model", value=choices.preset, inline=False)
    if choices.sampling:
        embed.add_field(name="Settings · yours", value=sampling_text(choices), inline=False)
    if choices.keep:
        embed.add_field(name="Keep from the image", value=guides_text(choices.keep), inline=False)
    if banned:
        embed.add_field(
            name="Cannot generate",
            value=f"This description contains banned terms ({', '.join(banned)}); edit it first.",
            inline=False,
        )
    embed.set_thumbnail(url=f"attachment://{THUMBNAIL_NAME}")
    took = result.timings_s.get("total_s")
    footer = [f"for {owner_name}", f"card {stored.id}"]
    footer.append("cached" if stored.cached else (f"{took:.1f} s" if took is not None else ""))
    embed.set_footer(text=" · ".join(p for p in footer if p))
    return embed


def sampling_text(choices: CardChoices) -> str:
    """A card's chosen sampling settings in one line; the server's defaults fill what is not chosen."""
    parts = []
    if choices.steps is not None:
        parts.append(f"{choices.steps} steps")
    if choices.guidance is not None:
        parts.append(f"guidance {choices.guidance:g}")
    if choices.aspect is not None:
        parts.append(f"aspect {choices.aspect}")
    if choices.scheduler is not None:
        parts.append(choices.scheduler)
    return " · ".join(parts) + " (the rest: the server's defaults)"


def guides_text(keep: Sequence[Guide]) -> str:
    """What images keep of their source besides the prompt, each guide with its weight, in one line."""
    if not keep:
        return "the prompt only"
    return " · ".join(f"{g.name} {g.weight:g} ({g.kind.keeps})" for g in keep)


def status_text(
    job: Job,
    position: Position | None,
    *,
    step: tuple[int, int] | None = None,
    images_done: int = 0,
    held: str | None = None,
) -> str:
    """The one-line status of a queued or running job; ``held`` says why it waits for a restart."""
    if held is not None:
        return f"⏸️ Job #{job.id}: {held}; they will be made once the bot has restarted."
    if job.status is JobStatus.QUEUED or (position is not None and position.status is JobStatus.QUEUED):
        if position is None:
            return f"⏳ Job #{job.id} is queued."
        ahead = position.images_ahead
        eta = f", about {_duration(position.eta_s)} to go" if position.eta_s else ""
        if ahead == 0:
            return f"⏳ Job #{job.id} is next in line{eta}."
        return f"⏳ Job #{job.id} is queued: {ahead} image{'s' * (ahead != 1)} ahead{eta}."
    parts = [f"🎨 Job #{job.id}: making {job.request.count} image{'s' * (job.request.count != 1)}"]
    if images_done:
        parts.append(f"{images_done}/{job.request.count} done")
    if step is not None:
        parts.append(f"step {step[0]}/{step[1]}")
    return " · ".join(parts) + "…"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"


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
    """The finished job: its prompt, and each image's seed and fidelity, best first."""
    failed = job.status is JobStatus.FAILED
    cancelled = job.status is JobStatus.CANCELLED
    colour = COLOR_FAILED if failed else (COLOR if cancelled else COLOR_DONE)
    title = f"Job #{job.id}" + (" · failed" if failed else " · cancelled" if cancelled else "")
    embed = discord.Embed(colour=colour, title=title, description=code(job.request.prompt, 1500))
    if job.request.negative_prompt:
        embed.add_field(
            name="Negative", value=shorten(job.request.negative_prompt, FIELD_VALUE_MAX), inline=False
        )
    if job.request.keep:
        embed.add_field(name="Kept from the source", value=guides_text(job.request.keep), inline=False)
    ranked = sorted(images, key=lambda m: -(m.fidelity if m.fidelity is not None else -2.0))
    lines = []
    for meta in ranked:
        fid = f"fidelity {meta.fidelity:.3f}" if meta.fidelity is not None else "no source"
        flag = _FLAGGED_NOTES[files.flagged] if meta.nsfw else ""
        lines.append(f"#{meta.index + 1} seed `{meta.seed}` · {fid}{flag}")
    if lines:
        embed.add_field(
            name="Images (closest to the source first)", value=shorten("\n".join(lines), FIELD_VALUE_MAX)
        )
    notes = []
    if failed and job.error:
        notes.append(f"Failed: {job.error}")
    if cancelled:
        notes.append(f"Cancelled after {len(images)} of {job.request.count} images.")
    if files.withheld_nsfw:
        notes.append(f"{files.withheld_nsfw} image(s) withheld: the safety checker flagged them.")
    if files.left_out:
        notes.append(
            f"{files.left_out} image(s) did not fit in this channel's upload limit; use Info for seeds."
        )
    if notes:
        embed.add_field(name="Notes", value=shorten("\n".join(notes), FIELD_VALUE_MAX), inline=False)
    p = job.request.params
    embed.set_footer(text=f"{p.width}×{p.height} · {p.steps} steps · guidance {p.guidance:g} · {p.scheduler}")
    if files.cover is not None:
        embed.set_image(url=f"attachment://{files.cover}")
    return embed


# What a result's image line says of an image the safety checker flagged, by what it got there.
_FLAGGED_NOTES = {
    FlaggedPolicy.WITHHOLD: " · withheld by the safety checker",
    FlaggedPolicy.SPOILER: " · flagged by the safety checker, posted as a spoiler",
    FlaggedPolicy.SHOW: " · flagged by the safety checker",
}


def info_embed(
    job: Job, images: Sequence[StoredImage], models: dict[str, str], *, delivery: str | None = None
) -> discord.Embed:
    """Everything about a job, for the Info button and /job; ``delivery`` says why a result is not posted.

    A job Delete hid (only admins see it then) says so in its title and when and by whom it was hidden.
    """
    p = job.request.params
    hidden = " · hidden" if job.hidden_at is not None else ""
    embed = discord.Embed(colour=COLOR, title=f"Job #{job.id} · {job.status}{hidden}")
    if job.hidden_at is not None:
        by = f" by <@{job.hidden_by}>" if job.hidden_by is not None else ""
        when = f"<t:{int(job.hidden_at)}:R>"
        note = f"Deleted{by} {when}: only admins see it, and its image files are gone."
        embed.add_field(name="Hidden", value=note, inline=False)
    embed.add_field(name="Prompt", value=code(job.request.prompt, FIELD_VALUE_MAX), inline=False)
    if job.request.negative_prompt:
        embed.add_field(
            name="Negative", value=code(job.request.negative_prompt, FIELD_VALUE_MAX), inline=False
        )
    if job.request.keep:
        source = job.request.guide_source or "?"
        embed.add_field(
            name="Kept from the source",
            value=f"{guides_text(job.request.keep)}\nsource image `{source[:12]}`",
            inline=False,
        )
    embed.add_field(name="Size", value=f"{p.width}×{p.height}")
    embed.add_field(name="Steps", value=str(p.steps))
    embed.add_field(name="Guidance", value=f"{p.guidance:g}")
    embed.add_field(name="Scheduler", value=p.scheduler)
    embed.add_field(name="Seeds", value=", ".join(f"`{s}`" for s in job.request.seeds))
    embed.add_field(name="Owner", value=f"<@{job.owner_id}>")
    if images:
        per_image = [
            f"#{m.index + 1} `{m.seed}` · "
            + (f"fidelity {m.fidelity:.3f}" if m.fidelity is not None else "no source")
            + (" · flagged" if m.nsfw else "")
            for m in sorted(images, key=lambda m: m.index)
        ]
        embed.add_field(name="Images", value=shorten("\n".join(per_image), FIELD_VALUE_MAX), inline=False)
    embed.add_field(
        name="Models", value=shorten("\n".join(f"{k}: {v}" for k, v in models.items()), 1024), inline=False
    )
    timing = [f"queued <t:{int(job.created_at)}:R>"]
    if job.started_at and job.finished_at:
        timing.append(f"ran {job.finished_at - job.started_at:.1f} s")
    if job.attempts:
        timing.append(f"{job.attempts} retr{'ies' if job.attempts != 1 else 'y'}")
    embed.add_field(name="Timing", value=" · ".join(timing), inline=False)
    if job.parent_job_id:
        embed.add_field(name="Rerolled from", value=f"job #{job.parent_job_id}")
    if job.error:
        embed.add_field(name="Error", value=shorten(job.error, FIELD_VALUE_MAX), inline=False)
    if delivery:
        embed.add_field(name="Result", value=shorten(delivery, FIELD_VALUE_MAX), inline=False)
    return embed
