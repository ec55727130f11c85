"""A loopback Discord (REST API + gateway) for end-to-end tests of the real, unmodified discord.py client.

Typical use::

    async with running_fake_discord() as server:
        async with running_bot(make_bot(), server) as bot:
            handle = await server.push_slash("ping")
            followup = await handle.wait_followup()
            assert followup.files[0].data == b"pong"
"""

from __future__ import annotations

from . import interactions, world
from .faults import ApiError, FakeClock, Fault, FaultPlan
from .harness import patched_discord_urls, running_bot
from .interactions import InteractionHandle, InteractionRecord
from .messages import StoredAttachment, StoredMessage
from .records import GatewayFrame, RecordedCall, UploadedFile
from .rest import ROUTE_KEYS
from .server import FakeDiscord, running_fake_discord
from .world import FakeChannel, FakeGuild, FakeMember, FakeRole, FakeUser, World

__all__ = [
    "ROUTE_KEYS",
    "ApiError",
    "FakeChannel",
    "FakeClock",
    "FakeDiscord",
    "FakeGuild",
    "FakeMember",
    "FakeRole",
    "FakeUser",
    "Fault",
    "FaultPlan",
    "GatewayFrame",
    "InteractionHandle",
    "InteractionRecord",
    "RecordedCall",
    "StoredAttachment",
    "StoredMessage",
    "UploadedFile",
    "World",
    "interactions",
    "patched_discord_urls",
    "running_bot",
    "running_fake_discord",
    "world",
]
