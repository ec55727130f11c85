"""A member's own history: /history, /job, /queue and /forget. Every answer is ephemeral.

/job also shows another member's job to those it was shared with (job_controls.check_may_see).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from i2p2i_bot.cards import COLOR, info_embed, shorten
from i2p2i_bot.job_controls import bot_of, check_may_see, job_models, job_view, queue_message
from i2p2i_bot.replies import PrivateView, Refusal, report_error

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
        lines = [
            f"**Job #{j.id}** · {j.status}"
            + (" · hidden" if j.hidden_at is not None else "")
            + (" · ⚠️ not posted, see /job" if delivery.undeliverable(j) else "")
            + f" · {j.request.count} image(s) · <t:{int(j.created_at)}:R>\n> {shorten(j.request.prompt, 180)}"
            for j in jobs
        ]
        for c in cards:
            when = f"<t:{int(c.created_at)}:R>"
            lines.append(
                f"**Card {c.id}** · {c.interrogation.mode} · {when}\n> {shorten(c.interrogation.prompt, 180)}"
            )
        if not lines:
            found = f" matching “{shorten(query, 100)}”" if query else ""
            await interaction.response.send_message(f"You have no history{found} yet.", ephemeral=True)
            return
        view = Pager(
            lines, title="Your history" + (f" · “{shorten(query, 60)}”" if query else ""), owner=user
        )
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
        if job.owner_id != interaction.user.id and not self.bot.is_admin(interaction.user):
            # Another member's job, shared where they asked for it: what was posted there, without why
            # its result may not have arrived (that is the owner's business) and without the owner's buttons.
            embed = info_embed(job, record.images, models)
            await interaction.response.send_message(embed=embed, ephemeral=True)
            return
        delivery = self.bot.delivery.delivery_state(job)
        embed = info_embed(job, record.images, models, delivery=delivery)
        await interaction.response.send_message(
            embed=embed,
            view=job_view(
                job,
                running=not job.status.finished,
                images=record.images,
                vary="layout" in self.bot.engine.offered_guides,
            ),
            ephemeral=True,
        )

    @app_commands.command(name="queue", description="Your queued and running jobs, with Cancel buttons")
    async def queue(self, interaction: discord.Interaction) -> None:
        jobs = self.bot.queue.active_jobs(owner_id=interaction.user.id)
        notice = self.bot.workers_notice()
        if not jobs:
            empty = "You have nothing queued."
            await interaction.response.send_message(f"{notice}\n{empty}" if notice else empty, ephemeral=True)
            return
        embed, view = queue_message(self.bot, jobs)
        await interaction.response.send_message(notice, embed=embed, view=view, ephemeral=True)

    @app_commands.command(name="forget", description="Delete your whole history: prompts, jobs and images")
    async def forget(self, interaction: discord.Interaction) -> None:
        stats = await self.bot.store.user_stats(interaction.user.id)
        total = sum(stats.jobs.values())
        view = ForgetConfirm(interaction.user.id)
        await interaction.response.send_message(
            f"This deletes {total} job(s), {stats.images} image(s) and {stats.interrogations} prompt(s) of "
            "yours, and the pictures you uploaded that no other member used, and cancels anything you have "
            "queued. It cannot be undone.",
            view=view,
            ephemeral=True,
        )


class Pager(PrivateView):
    """Previous / next over ephemeral pages; in memory, as ephemeral messages are short-lived."""

    def __init__(self, lines: list[str], *, title: str, owner: int) -> None:
        super().__init__(owner, timeout=600)
        self.lines, self.title, self.index = lines, title, 0
        self.pages = max(1, -(-len(lines) // PAGE_SIZE))
        self._sync()

    def page(self) -> discord.Embed:
        chunk = self.lines[self.index * PAGE_SIZE : (self.index + 1) * PAGE_SIZE]
        embed = discord.Embed(colour=COLOR, title=self.title, description=shorten("\n\n".join(chunk), 4000))
        embed.set_footer(text=f"Page {self.index + 1} of {self.pages}")
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

    def __init__(self, user_id: int) -> None:
        super().__init__(user_id, timeout=120)
        self.user_id = user_id

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
                content=f"Deleted {result.jobs} job(s), {result.images} image(s), {result.interrogations} "
                f"prompt(s) and {result.sources} uploaded picture(s).",
                view=None,
            )
        except Exception as exc:
            await report_error(interaction, exc)

    @discord.ui.button(label="Keep it", style=discord.ButtonStyle.secondary)
    async def keep(self, interaction: discord.Interaction, button: discord.ui.Button[ForgetConfirm]) -> None:
        await interaction.response.edit_message(content="Nothing was deleted.", view=None)


async def setup(bot: I2P2IBot) -> None:
    await bot.add_cog(HistoryCog(bot))
