"""A member's own history: /history, /job, /queue and /forget. Every answer is ephemeral.

/job also shows another member's job to those it was shared with (job_controls.check_may_see).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from i2p2i_bot.cards import COLOR, STATUS_NAMES, info_embed, shorten
from i2p2i_bot.i18n import tr
from i2p2i_bot.job_controls import (
    bot_of,
    check_may_see,
    job_models,
    job_view,
    offered_image_actions,
    queue_message,
    upscaled_image,
)
from i2p2i_bot.jobs import UPSCALE
from i2p2i_bot.replies import PrivateView, Refusal, member_locale, report_error

if TYPE_CHECKING:
    from i2p2i_bot.app import I2P2IBot

log = logging.getLogger("i2p2i.history")
PAGE_SIZE = 5
HISTORY_LIMIT = 50


class HistoryCog(commands.Cog, name="History"):
    def __init__(self, bot: I2P2IBot) -> None:
        self.bot = bot

    @app_commands.command(name="history", description="Your recent jobs and prompts")
    @app_commands.describe(query="Only jobs whose prompt contains this text")
    async def history(self, interaction: discord.Interaction, query: str | None = None) -> None:
        store = self.bot.store
        user = interaction.user.id
        # Jobs whose result their owner deleted are left out, except for admins, who see them marked.
        admin = self.bot.is_admin(interaction.user)
        if query:
            jobs = await store.search_jobs(query, owner_id=user, limit=HISTORY_LIMIT, include_hidden=admin)
            cards = await store.search_interrogations(query, user_id=user, limit=HISTORY_LIMIT)
        else:
            jobs = await store.recent_jobs(user, limit=HISTORY_LIMIT, include_hidden=admin)
            cards = await store.recent_interrogations(user, limit=HISTORY_LIMIT)
        delivery = self.bot.delivery
        locale = member_locale(interaction)
        lines = [
            tr(locale, "**Job #{job}**", job=j.id)
            + f" · {tr(locale, STATUS_NAMES[j.status])}"
            + (tr(locale, " · hidden") if j.hidden_at is not None else "")
            + (
                tr(locale, " · upscale of job #{job}", job=j.parent_job_id)
                if j.origin == UPSCALE and j.parent_job_id
                else ""
            )
            + (tr(locale, " · ⚠️ not posted, see /job") if delivery.undeliverable(j) else "")
            + tr(locale, " · {count} image(s)", count=j.request.count)
            + f" · <t:{int(j.created_at)}:R>\n> {shorten(j.request.prompt, 180)}"
            for j in jobs
        ]
        for c in cards:
            when = f"<t:{int(c.created_at)}:R>"
            card = tr(locale, "**Card {card}**", card=c.id)
            lines.append(
                f"{card} · {c.interrogation.mode} · {when}\n> {shorten(c.interrogation.prompt, 180)}"
            )
        if not lines:
            if query:
                said = tr(locale, "You have no history matching “{query}” yet.", query=shorten(query, 100))
            else:
                said = tr(locale, "You have no history yet.")
            await interaction.response.send_message(said, ephemeral=True)
            return
        title = tr(locale, "Your history")
        if query:
            title += f" · “{shorten(query, 60)}”"
        view = Pager(lines, title=title, owner=user, locale=locale)
        await interaction.response.send_message(embed=view.page(), view=view, ephemeral=True)

    @app_commands.command(
        name="job", description="Show a past job: yours with working buttons, or one shared here"
    )
    @app_commands.describe(job_id="The job's number, as shown on its message")
    async def job(self, interaction: discord.Interaction, job_id: app_commands.Range[int, 1]) -> None:
        record = await self.bot.store.job_record(job_id)
        if record is None:
            raise Refusal(f"There is no job #{job_id}.")
        job = record.job
        check_may_see(self.bot, interaction, job)
        models = await job_models(self.bot, job)
        locale = member_locale(interaction)
        upscaled = await upscaled_image(self.bot, job)
        if job.owner_id != interaction.user.id and not self.bot.is_admin(interaction.user):
            # Another member's job, shared where they asked for it: what was posted there, without why
            # its result may not have arrived (that is the owner's business) and without the owner's buttons.
            embed = info_embed(job, record.images, models, locale=locale, upscaled_image=upscaled)
            await interaction.response.send_message(embed=embed, ephemeral=True)
            return
        delivery = self.bot.delivery.delivery_state(job)
        embed = info_embed(
            job, record.images, models, delivery=delivery, locale=locale, upscaled_image=upscaled
        )
        await interaction.response.send_message(
            embed=embed,
            view=job_view(
                job,
                running=not job.status.finished,
                locale=locale,
                images=record.images,
                image_actions=offered_image_actions(self.bot, job),
            ),
            ephemeral=True,
        )

    @app_commands.command(name="queue", description="Your queued and running jobs, with Cancel buttons")
    async def queue(self, interaction: discord.Interaction) -> None:
        jobs = self.bot.queue.active_jobs(owner_id=interaction.user.id)
        locale = member_locale(interaction)
        notice = self.bot.workers_notice(locale)
        if not jobs:
            empty = tr(locale, "You have nothing queued.")
            await interaction.response.send_message(f"{notice}\n{empty}" if notice else empty, ephemeral=True)
            return
        embed, view = queue_message(self.bot, jobs, locale=locale)
        await interaction.response.send_message(notice, embed=embed, view=view, ephemeral=True)

    @app_commands.command(name="forget", description="Delete your whole history: prompts, jobs and images")
    async def forget(self, interaction: discord.Interaction) -> None:
        stats = await self.bot.store.user_stats(interaction.user.id)
        total = sum(stats.jobs.values())
        locale = member_locale(interaction)
        view = ForgetConfirm(interaction.user.id, locale=locale)
        said = tr(
            locale,
            "This deletes {jobs} job(s), {images} image(s) and {prompts} prompt(s) of yours, and the "
            "pictures you uploaded that no other member used, and cancels anything you have queued. It "
            "cannot be undone.",
            jobs=total,
            images=stats.images,
            prompts=stats.interrogations,
        )
        await interaction.response.send_message(said, view=view, ephemeral=True)


class Pager(PrivateView):
    """Previous / next over ephemeral pages; in memory, as ephemeral messages are short-lived."""

    def __init__(self, lines: list[str], *, title: str, owner: int, locale: str | None) -> None:
        super().__init__(owner, timeout=600)
        self.lines, self.title, self.index, self.locale = lines, title, 0, locale
        self.pages = max(1, -(-len(lines) // PAGE_SIZE))
        self.previous.label = tr(locale, "Previous")
        self.next.label = tr(locale, "Next")
        self._sync()

    def page(self) -> discord.Embed:
        chunk = self.lines[self.index * PAGE_SIZE : (self.index + 1) * PAGE_SIZE]
        embed = discord.Embed(colour=COLOR, title=self.title, description=shorten("\n\n".join(chunk), 4000))
        page = tr(self.locale, "Page {page} of {pages}", page=self.index + 1, pages=self.pages)
        embed.set_footer(text=page)
        return embed

    def _sync(self) -> None:
        self.previous.disabled = self.index == 0
        self.next.disabled = self.index >= self.pages - 1

    @discord.ui.button(label="Previous", style=discord.ButtonStyle.secondary)
    async def previous(self, interaction: discord.Interaction, button: discord.ui.Button[Pager]) -> None:
        self.index = max(0, self.index - 1)
        self._sync()
        await interaction.response.edit_message(embed=self.page(), view=self)

    @discord.ui.button(label="Next", style=discord.ButtonStyle.secondary)
    async def next(self, interaction: discord.Interaction, button: discord.ui.Button[Pager]) -> None:
        self.index = min(self.pages - 1, self.index + 1)
        self._sync()
        await interaction.response.edit_message(embed=self.page(), view=self)


class ForgetConfirm(PrivateView):
    """Delete everything, or keep it; only the member who ran /forget may press either."""

    def __init__(self, user_id: int, *, locale: str | None) -> None:
        super().__init__(user_id, timeout=120)
        self.user_id, self.locale = user_id, locale
        self.confirm.label = tr(locale, "Delete everything")
        self.keep.label = tr(locale, "Keep it")

    @discord.ui.button(label="Delete everything", style=discord.ButtonStyle.danger)
    async def confirm(
        self, interaction: discord.Interaction, button: discord.ui.Button[ForgetConfirm]
    ) -> None:
        bot = bot_of(interaction)
        try:
            if interaction.user.id != self.user_id:
                raise Refusal("Only the member who asked can confirm this.")
            result = await bot.queue.forget(self.user_id)
            log.info("user %d forgot their history", self.user_id)
            await interaction.response.edit_message(
                content=tr(
                    member_locale(interaction),
                    "Deleted {jobs} job(s), {images} image(s), {prompts} prompt(s) and {sources} uploaded "
                    "picture(s).",
                    jobs=result.jobs,
                    images=result.images,
                    prompts=result.interrogations,
                    sources=result.sources,
                ),
                view=None,
            )
        except Exception as exc:
            await report_error(interaction, exc)

    @discord.ui.button(label="Keep it", style=discord.ButtonStyle.secondary)
    async def keep(self, interaction: discord.Interaction, button: discord.ui.Button[ForgetConfirm]) -> None:
        said = tr(member_locale(interaction), "Nothing was deleted.")
        await interaction.response.edit_message(content=said, view=None)


async def setup(bot: I2P2IBot) -> None:
    await bot.add_cog(HistoryCog(bot))
