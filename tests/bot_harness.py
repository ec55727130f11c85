"""The real bot, with the smoke engine, against the loopback Discord."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from PIL import Image

from i2p2i_bot.app import I2P2IBot, create_bot
from i2p2i_bot.config import DiscordSettings, QueueSettings, Settings
from tests.discord_fake import FakeDiscord, running_bot


def bot_settings(base: Settings, data_dir: Path, server: FakeDiscord, **queue: Any) -> Settings:
    """Settings for a bot that talks to `server` and keeps its data in `data_dir`."""
    return dataclasses.replace(
        base,
        data_dir=str(data_dir),
        discord=DiscordSettings(token=server.token, api_base=server.api_base, gateway_url=server.gateway_url),
        queue=dataclasses.replace(QueueSettings(), **queue),
    )


class TestBot(I2P2IBot):
    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """No 5 s pause before a re-IDENTIFY: that is Discord's rate limit, not ours to test."""


@contextlib.asynccontextmanager
async def running_i2p2i(settings: Settings, server: FakeDiscord, engine: Any) -> AsyncIterator[I2P2IBot]:
    """Start the production bot (its setup_hook, cogs and sync) with an already loaded engine."""
    create_bot(settings)  # applies the endpoints exactly as bot.py does
    bot = TestBot(settings, engine_loader=lambda _settings: engine, guild_ready_timeout=0.05)
    async with running_bot(bot, server, ready_timeout_s=60) as running:
        yield running


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
