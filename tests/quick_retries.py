"""Retries of a post to Discord a hundred times quicker: discord.py's backoff after a 5xx answer or a reset
connection (1, 3, 5, 7, 9 s), and the bot's pause before trying one way of posting again (2 s).

discord.py's HTTP client and its webhook adapter (interaction answers, follow-ups and their edits) each sleep
through the ``asyncio`` module they imported; handing them a copy whose ``sleep`` is quick keeps every retry,
in the same order, without the waiting. Discord's Retry-After (under a second in the fake) and the bot's
other pauses are left alone.

`python -m tests.quick_retries BOT.PY-ARGS`, from the repository root, runs the real bot.py so.
"""

from __future__ import annotations

import asyncio
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

import discord.http
import discord.webhook.async_

from i2p2i_bot import delivery

SHRINK = 100
# The modules that sleep out discord.py's backoff.
RETRYING = (discord.http, discord.webhook.async_)


def quick_asyncio(asked: list[float]) -> types.SimpleNamespace:
    """``asyncio``, except that a sleep of a second or more lasts a hundredth as long; ``asked`` gets every
    delay asked for, so a test still sees the backoff it would have waited."""
    real_sleep = asyncio.sleep

    async def sleep(delay: float, result: Any = None) -> Any:
        asked.append(delay)
        return await real_sleep(delay / SHRINK if delay >= 1 else delay, result)

    quick = types.SimpleNamespace(**{name: getattr(asyncio, name) for name in dir(asyncio)})
    quick.sleep = sleep
    return quick


def shorten_retries(set_attribute: Callable[[Any, str, Any], None] = setattr) -> list[float]:
    """Make retries quick (through ``set_attribute``: a monkeypatch's, to undo it after a test); returns the
    list of delays discord.py will ask for."""
    asked: list[float] = []
    quick = quick_asyncio(asked)
    for module in RETRYING:
        set_attribute(module, "asyncio", quick)
    set_attribute(delivery, "RETRY_PAUSE_S", delivery.RETRY_PAUSE_S / SHRINK)
    return asked


def main(argv: Sequence[str] | None = None) -> int:
    import bot

    shorten_retries()
    return bot.main(argv)


if __name__ == "__main__":
    sys.exit(main())
