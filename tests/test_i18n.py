"""Simplified Chinese (zh-CN): the catalogue covers every command string, keeps each sentence's parts, and
a zh-CN member gets Chinese replies while everyone else reads English."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import discord
import pytest
from discord import app_commands

from i2p2i_bot.app import EXTENSIONS, I2P2IBot
from i2p2i_bot.config import Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.i18n import catalogue, placeholders, translate
from tests.bot_harness import bot_settings, running_i2p2i
from tests.discord_fake import FakeDiscord, running_fake_discord
from tests.test_bot import ephemeral_answer

ZH = catalogue("zh-CN")
# Choice names that are values, not words: setting keys, aspect ratios, "all".
_CODE_LIKE = re.compile(r"[a-z_0-9:]+")


async def command_strings() -> set[str]:
    """Every description, parameter description and choice name of the bot's commands, and the menu's name."""
    bot = I2P2IBot(Settings())
    try:
        for name in EXTENSIONS:
            await bot.load_extension(name)
        found = set()
        for command in bot.tree.walk_commands():
            found.add(command.description)
            if isinstance(command, app_commands.Command):
                for parameter in command.parameters:
                    found.add(parameter.description)
                    found.update(c.name for c in parameter.choices if not _CODE_LIKE.fullmatch(c.name))
        found.update(m.name for m in bot.tree.get_commands(type=discord.AppCommandType.message))
        return {s for s in found if s and s != "…"}
    finally:
        await bot.close()


async def test_every_command_string_has_its_chinese_and_no_entry_is_stale() -> None:
    assert ZH is not None
    strings = await command_strings()
    assert strings - set(ZH.commands) == set()
    assert set(ZH.commands) - strings == set()
    assert all(text.strip() for text in ZH.commands.values())


def test_every_sentence_keeps_its_parts() -> None:
    """A translation names exactly the placeholders of its English sentence, so nothing is lost."""
    assert ZH is not None and len(ZH.messages) >= 30
    for english, chinese in ZH.messages.items():
        assert placeholders(english) == placeholders(chinese), english


def test_finished_sentences_are_matched_to_their_templates() -> None:
    assert translate("Steps must be between 1 and 100 (got 120).", "zh-CN") == (
        "步数必须在 1 到 100 之间（收到 120）。"
    )
    assert translate("There is no job #42.", "zh-CN") == "没有任务 #42。"
    assert translate("Steps must be between 1 and 100 (got 120).", "en-US") == (
        "Steps must be between 1 and 100 (got 120)."
    )
    # Without an entry a sentence stays English rather than being lost.
    assert translate("A sentence nobody translated.", "zh-CN") == "A sentence nobody translated."


@pytest.fixture
async def discord_server() -> AsyncIterator[FakeDiscord]:
    async with running_fake_discord() as server:
        yield server


async def test_a_zh_cn_member_reads_chinese_and_the_commands_carry_it(
    discord_server: FakeDiscord, base_settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    server = discord_server
    settings = bot_settings(base_settings, tmp_path / "data", server)
    async with running_i2p2i(settings, server, engine):
        imagine = next(c for c in server.synced_commands() if c["name"] == "imagine")
        assert imagine["description_localizations"]["zh-CN"] == "用你写的提示词生成图片"
        assert imagine["name"] == "imagine" and not imagine.get("name_localizations")
        menu = next(c for c in server.synced_commands() if c["name"] == "Imagine from image")
        assert menu["name_localizations"]["zh-CN"] == "用这张图片创作"

        chinese = await server.push_slash("imagine", {"prompt": "a kite", "count": 9}, locale="zh-CN")
        assert await ephemeral_answer(chinese) == "图片数量必须在 1 到 8 之间（收到 9）。"
        english = await server.push_slash("imagine", {"prompt": "a kite", "count": 9}, locale="en-GB")
        assert await ephemeral_answer(english) == "The number of images must be between 1 and 8 (got 9)."
