"""Admin commands: the whole queue, cancelling any job, pausing and resuming the GPU.

Admins are the application's owner and members with a role listed in discord.admin_role_ids.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from i2p2i_bot.i18n import tr
from i2p2i_bot.job_controls import queue_message
from i2p2i_bot.replies import Refusal, member_locale

if TYPE_CHECKING:
    from i2p2i_bot.app import I2P2IBot

log = logging.getLogger("i2p2i.admin")


class AdminCog(commands.GroupCog, name="Admin", group_name="admin", group_description="Run the i2p2i queue"):
    def __init__(self, bot: I2P2IBot) -> None:
        self.bot = bot
        super().__init__()

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if not self.bot.is_admin(interaction.user):
            raise Refusal("Only the bot's owner and members with an admin role can use /admin.")
        return True

    @app_commands.command(name="queue", description="Every queued and running job")
    async def queue(self, interaction: discord.Interaction) -> None:
        jobs = self.bot.queue.active_jobs()
        locale = member_locale(interaction)
        paused = self.bot.queue.paused
        notices = [
            self.bot.workers_notice(locale),
            self.bot.presets_notice(locale),
            self.bot.engine.presets.safety_notice(locale),
        ]
        if not jobs:
            said = (
                tr(locale, "The queue is empty (paused).")
                if paused
                else tr(locale, "The queue is empty (running).")
            )
        else:
            said = tr(locale, "The queue is paused.") if paused else tr(locale, "The queue is running.")
        said = "\n".join([*(n for n in notices if n), said])
        if not jobs:
            await interaction.response.send_message(said, ephemeral=True)
            return
        embed, view = queue_message(self.bot, jobs, locale=locale, everyone=True)
        await interaction.response.send_message(said, embed=embed, view=view, ephemeral=True)

    @app_commands.command(name="cancel", description="Cancel any member's job")
    @app_commands.describe(job_id="The job's number")
    async def cancel(self, interaction: discord.Interaction, job_id: app_commands.Range[int, 1]) -> None:
        job = await self.bot.queue.cancel(job_id, interaction.user.id, admin=True)
        log.info("admin %d cancelled job %d of user %d", interaction.user.id, job.id, job.owner_id)
        said = tr(
            member_locale(interaction),
            "Cancelled job #{job} of {owner}.",
            job=job.id,
            owner=f"<@{job.owner_id}>",
        )
        await interaction.response.send_message(said, ephemeral=True)

    @app_commands.command(name="pause", description="Stop starting new batches (the running one finishes)")
    async def pause(self, interaction: discord.Interaction) -> None:
        self.bot.queue.pause()
        log.info("admin %d paused the queue", interaction.user.id)
        said = tr(member_locale(interaction), "Paused: no new batches start; jobs are still accepted.")
        await interaction.response.send_message(said, ephemeral=True)

    @app_commands.command(name="resume", description="Start batches again")
    async def resume(self, interaction: discord.Interaction) -> None:
        self.bot.queue.resume()
        log.info("admin %d resumed the queue", interaction.user.id)
        await interaction.response.send_message(tr(member_locale(interaction), "Resumed."), ephemeral=True)


async def setup(bot: I2P2IBot) -> None:
    await bot.add_cog(AdminCog(bot))
