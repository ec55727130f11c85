"""/settings: a server's own defaults and bounds, model, banned terms and channels, for its admins.

Admins are the application's owner and members with a role listed in discord.admin_role_ids. What they set is
stored in SQLite (i2p2i_bot/server_settings.py); the config file stays the fallback for every server.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, get_args

import discord
from discord import app_commands
from discord.ext import commands

from i2p2i_bot.cards import shorten
from i2p2i_bot.i18n import tr
from i2p2i_bot.replies import Refusal, member_locale
from i2p2i_bot.server_settings import KEYS, SettingError, SettingKey

if TYPE_CHECKING:
    from i2p2i_bot.app import I2P2IBot

log = logging.getLogger("i2p2i.settings")

KEY_CHOICES = [app_commands.Choice(name=key, value=key) for key in get_args(SettingKey)]


@app_commands.guild_only()
class SettingsCog(
    commands.GroupCog,
    name="Settings",
    group_name="settings",
    group_description="This server's i2p2i settings",
):
    def __init__(self, bot: I2P2IBot) -> None:
        self.bot = bot
        super().__init__()

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if not self.bot.is_admin(interaction.user):
            raise Refusal("Only the bot's owner and members with an admin role can use /settings.")
        return True

    @app_commands.command(name="show", description="Every setting of this server and where it comes from")
    async def show(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(embed=self._embed(interaction), ephemeral=True)

    @app_commands.command(name="set", description="Change one setting for this server")
    @app_commands.describe(key="The setting", value="Its new value (see /settings show)")
    @app_commands.choices(key=KEY_CHOICES)
    async def set(
        self,
        interaction: discord.Interaction,
        key: app_commands.Choice[str],
        value: app_commands.Range[str, 1, 4000],
    ) -> None:
        guild_id = _guild(interaction)
        book = self.bot.servers
        name: SettingKey = _key(key.value)
        try:
            updated = book.get(guild_id).changed(name, value, book.base, self.bot.engine.presets)
        except SettingError as exc:
            raise Refusal(str(exc)) from None
        await book.put(guild_id, updated, by=interaction.user.id)
        log.info("admin %d set %s on server %d", interaction.user.id, name, guild_id)
        shown, changed = updated.describe(name, book.base, self.bot.engine.presets)
        locale = member_locale(interaction)
        if changed:
            said = tr(locale, "Set {key} to {value} for this server.", key=name, value=shown)
        else:  # the bot's default: nothing is kept for this server, as after a reset
            said = tr(locale, "{key} is the bot's default again here.", key=name)
        await interaction.response.send_message(said, embed=self._embed(interaction), ephemeral=True)

    @app_commands.command(name="reset", description="Put a setting (or all) back to the bot's default")
    @app_commands.describe(key="The setting, or all")
    @app_commands.choices(key=[*KEY_CHOICES, app_commands.Choice(name="all", value="all")])
    async def reset(self, interaction: discord.Interaction, key: app_commands.Choice[str]) -> None:
        guild_id = _guild(interaction)
        book = self.bot.servers
        updated = book.get(guild_id).reset("all" if key.value == "all" else _key(key.value))
        try:
            updated.check(book.base)
        except SettingError as exc:  # a default left outside a bound the server still narrows
            raise Refusal(f"{exc} Reset or change that first.") from None
        await book.put(guild_id, updated, by=interaction.user.id)
        log.info("admin %d reset %s on server %d", interaction.user.id, key.value, guild_id)
        locale = member_locale(interaction)
        if key.value == "all":
            said = tr(locale, "Every setting is the bot's default again here.")
        else:
            said = tr(locale, "{key} is the bot's default again here.", key=key.value)
        await interaction.response.send_message(said, embed=self._embed(interaction), ephemeral=True)

    def _embed(self, interaction: discord.Interaction) -> discord.Embed:
        book = self.bot.servers
        server = book.get(_guild(interaction))
        locale = member_locale(interaction)
        embed = discord.Embed(title=tr(locale, "Settings of this server"))
        for key, meaning in KEYS.items():
            value, changed = server.describe(key, book.base, self.bot.engine.presets)
            mark = tr(locale, " (set here)") if changed else ""
            embed.add_field(
                name=f"{key}{mark}", value=f"{shorten(value, 900)}\n-# {tr(locale, meaning)}", inline=False
            )
        embed.set_footer(text=tr(locale, "Change one with /settings set; /settings reset puts it back."))
        return embed


def _guild(interaction: discord.Interaction) -> int:
    if interaction.guild_id is None:  # guild_only keeps commands out of DMs; a stale client may not
        raise Refusal("/settings works in a server, not in direct messages.")
    return interaction.guild_id


def _key(value: str) -> SettingKey:
    for key in get_args(SettingKey):
        if key == value:
            return key
    raise Refusal(f"There is no setting called {value!r}.")


async def setup(bot: I2P2IBot) -> None:
    await bot.add_cog(SettingsCog(bot))
