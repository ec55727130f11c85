"""i2p2i: image → prompt → image with CLIP Interrogator and Stable Diffusion."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The bot pulls in discord.py; the command line and the engine never need it.
    if name == "create_bot":
        from i2p2i_bot.app import create_bot

        return create_bot
    raise AttributeError(f"module 'i2p2i_bot' has no attribute {name!r}")
