"""/loras: the LoRAs a prompt may name with <lora:NAME:WEIGHT>, and the words that call each up. Ephemeral."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from i2p2i_bot.cards import COLOR, shorten
from i2p2i_bot.i18n import tr
from i2p2i_bot.loras import LoraLibrary
from i2p2i_bot.replies import member_locale

if TYPE_CHECKING:
    from i2p2i_bot.app import I2P2IBot

# An embed's description holds 4096 characters; the list stops short of it and says how many are left.
LIST_CHARS = 3800


def loras_embed(library: LoraLibrary, locale: str | None = None) -> discord.Embed:
    """The LoRAs on offer, one line each: its tag, and its trigger words where its metadata has them."""
    offered = library.available()
    if not offered:
        said = tr(locale, "This server offers no LoRAs.")
        return discord.Embed(colour=COLOR, title="LoRAs", description=said)
    lines: list[str] = []
    used = 0
    for index, lora in enumerate(offered):
        words = f" · {shorten(', '.join(lora.trigger_words), 200)}" if lora.trigger_words else ""
        line = f"`<lora:{lora.name}:1>`{words}"
        if used + len(line) + 1 > LIST_CHARS:
            lines.append(tr(locale, "… and {count} more", count=len(offered) - index))
            break
        lines.append(line)
        used += len(line) + 1
    embed = discord.Embed(colour=COLOR, title=f"LoRAs ({len(offered)})", description="\n".join(lines))
    limit = library.max_per_prompt
    footer = tr(
        locale, "Put a tag in your prompt; weights go from -3 to 3. At most {limit} a prompt.", limit=limit
    )
    embed.set_footer(text=footer)
    return embed


class LorasCog(commands.Cog, name="LoRAs"):
    def __init__(self, bot: I2P2IBot) -> None:
        self.bot = bot
        models = bot.settings.models
        self.library = LoraLibrary(models.lora_dir, max_per_prompt=models.max_loras)

    @app_commands.command(
        name="loras", description="The LoRAs your prompts can use, with their trigger words"
    )
    async def loras(self, interaction: discord.Interaction) -> None:
        # Listing reads every file's header, from a folder that may be on a slow disk: off the event loop.
        embed = await asyncio.to_thread(loras_embed, self.library, member_locale(interaction))
        await interaction.response.send_message(embed=embed, ephemeral=True)


async def setup(bot: I2P2IBot) -> None:
    await bot.add_cog(LorasCog(bot))
