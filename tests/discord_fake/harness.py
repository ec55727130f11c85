"""Running the real discord.py client against the fake: URL patching and a bot's start and clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import discord

    from .server import FakeDiscord

log = logging.getLogger(__name__)

ClientT = TypeVar("ClientT", bound="discord.Client")


@contextlib.contextmanager
def patched_discord_urls(api_base: str, gateway_url: str) -> Iterator[None]:
    """Point ``discord.http.Route.BASE`` and ``DiscordWebSocket.DEFAULT_GATEWAY`` elsewhere; restore on exit.

    Both are class attributes, so this is process-wide: one fake per process at a time.
    """
    import yarl
    from discord.gateway import DiscordWebSocket
    from discord.http import Route

    old_base, old_gateway = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    Route.BASE = api_base.rstrip("/")
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    try:
        yield
    finally:
        Route.BASE = old_base
        DiscordWebSocket.DEFAULT_GATEWAY = old_gateway


@contextlib.asynccontextmanager
async def running_bot(
    bot: ClientT, server: FakeDiscord, *, ready_timeout_s: float = 10.0, close_timeout_s: float = 10.0
) -> AsyncIterator[ClientT]:
    """Log ``bot`` in to ``server``, connect it, wait for ``on_ready``; close it and its task on exit.

    Give the bot ``guild_ready_timeout=0.05`` (or similar): discord.py waits that long after the last
    GUILD_CREATE before it fires ``on_ready``, 2 s by default.
    """
    with server.patch_discord():
        task: asyncio.Task[None] | None = None
        try:
            await bot.login(server.token)
            task = asyncio.create_task(bot.connect(reconnect=True), name="fake-discord-bot-connect")
            ready = asyncio.create_task(bot.wait_until_ready(), name="fake-discord-bot-ready")
            done, _ = await asyncio.wait(
                {ready, task}, timeout=ready_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if ready not in done:
                ready.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ready
                if task in done:
                    task.result()  # the connect error, if it failed
                    raise RuntimeError("the bot's gateway connection ended before it was ready")
                raise TimeoutError(f"the bot was not ready after {ready_timeout_s}s")
            yield bot
        finally:
            await bot.close()
            if task is not None:
                try:
                    await asyncio.wait_for(task, close_timeout_s)
                except TimeoutError:
                    log.error("the bot's gateway task did not end within %ss of close()", close_timeout_s)
                    raise
