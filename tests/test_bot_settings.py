"""/settings through the loopback Discord: admins change a server's defaults, bounds, banned terms and
channels; members get them in every command; the settings live in SQLite across restarts."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
from PIL import Image

from i2p2i_bot.config import Settings
from i2p2i_bot.engine import Engine
from tests.bot_harness import moderated_settings, png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord, StoredMessage
from tests.test_bot import ephemeral_answer


@pytest.fixture
def settings(base_settings: Settings, tmp_path: Path, discord_server: FakeDiscord) -> Settings:
    return moderated_settings(base_settings, tmp_path / "data", discord_server)


async def set_setting(server: FakeDiscord, key: str, value: str, *, user: str = "mod") -> str:
    handle = await server.push_slash("settings set", {"key": key, "value": value}, user=user)
    return await ephemeral_answer(handle)


async def test_admins_narrow_a_servers_bounds_and_members_meet_them(
    discord_server: FakeDiscord, settings: Settings, engine: Engine
) -> None:
    server = discord_server
    async with running_i2p2i(settings, server, engine) as bot:
        refused = await set_setting(server, "max_count", "2", user="alice")
        assert refused == "Only the bot's owner and members with an admin role can use /settings."
        assert await bot.store.server_settings() == []

        answer = await set_setting(server, "max_count", "2")
        assert answer.startswith("Set max_count to 2 for this server.")
        assert await set_setting(server, "steps", "2") == "Set steps to 2 for this server."
        wrong = await set_setting(server, "max_count", "64")
        assert wrong == "The most images must be between 1 and 8 (got 64)."
        guild = server.world.guild().id
        assert await bot.store.server_settings() == [(guild, '{"max_count": 2, "steps": 2}')]

        too_many = await server.push_slash("imagine", {"prompt": "a red kite", "count": 3})
        assert await ephemeral_answer(too_many) == "The number of images must be between 1 and 2 (got 3)."
        handle = await server.push_slash("imagine", {"prompt": "a red kite"})
        await handle.wait_followup(timeout_s=30)
        job = await bot.store.get_job(1)
        # The server's default count (4, capped by its maximum of 2) and its steps.
        assert job is not None and (job.request.count, job.request.steps) == (2, 2)
        await bot.queue.join()

        shown = await server.push_slash("settings show", user="owner")
        embed = (await shown.wait_response()).json["data"]["embeds"][0]
        fields = {f["name"]: f["value"] for f in embed["fields"]}
        assert fields["max_count (set here)"].startswith("2\n")
        assert fields["max_steps"].startswith(f"{settings.generate.max_steps}\n")

        # Set to the bot's own value, a key follows the default again rather than reading "set here".
        said = await set_setting(server, "max_count", str(settings.generate.max_count))
        assert said == "max_count is the bot's default again here."
        shown = await server.push_slash("settings show", user="owner")
        embed = (await shown.wait_response()).json["data"]["embeds"][0]
        assert "max_count" in {f["name"] for f in embed["fields"]}
        assert "max_count (set here)" not in {f["name"] for f in embed["fields"]}
        assert await bot.store.server_settings() == [(guild, '{"steps": 2}')]
        assert await set_setting(server, "max_count", "2") == "Set max_count to 2 for this server."

    # A restart keeps them.
    async with running_i2p2i(settings, server, engine) as bot:
        assert bot.servers.get(guild).max_count == 2
        reset = await server.push_slash("settings reset", {"key": "all"}, user="mod")
        assert (await ephemeral_answer(reset)).startswith("Every setting is the bot's default again here.")
        assert await bot.store.server_settings() == []


async def test_a_server_may_keep_the_bot_to_some_channels_and_ban_its_own_terms(
    discord_server: FakeDiscord, settings: Settings, engine: Engine
) -> None:
    server = discord_server
    art = server.channel("art-nsfw")
    async with running_i2p2i(settings, server, engine) as bot:
        assert (await set_setting(server, "channels", f"<#{art.id}>")).startswith("Set channels to")
        elsewhere = await server.push_slash("imagine", {"prompt": "a red kite"}, channel="general")
        assert await ephemeral_answer(elsewhere) == f"In this server I answer only in <#{art.id}>."
        assert await bot.store.get_job(1) is None
        # Admins may still use commands anywhere, so a wrong channel list can be put right.
        fixed = await server.push_slash("settings show", user="mod", channel="general")
        assert (await fixed.wait_response()).json["data"]["embeds"]

        assert (await set_setting(server, "banned_terms", "kite, balloon")).startswith("Set banned_terms")
        kite = await server.push_slash("imagine", {"prompt": "a red kite"}, channel=art)
        assert await ephemeral_answer(kite) == "That prompt contains banned terms (kite); remove them first."
        assert await bot.store.get_job(1) is None
        # Direct messages have the bot's own settings: no channel list, no server terms.
        direct = await server.push_slash("imagine", {"prompt": "a red kite", "count": 1}, dm=True)
        await direct.wait_followup(timeout_s=30)
        job = await bot.store.get_job(1)
        assert job is not None and job.guild_id is None
        await bot.queue.join()


async def test_a_servers_model_is_what_members_get_unless_they_name_one(
    discord_server: FakeDiscord, settings: Settings, engine: Engine, astronaut: Image.Image
) -> None:
    """An admin sets the server's model: a member's /imagine-from card is described with its CLIP and
    keeps it, the card's job and an /imagine job are made with it; an explicit model wins; an unknown one
    is the presets' sentence; reset and the bot's default both return the server to the default."""
    server = discord_server
    engine = engine.sharing(settings=settings)  # its generators swap in a copy, not the session's engine
    async with running_i2p2i(settings, server, engine) as bot:
        guild = server.world.guild().id
        unknown = await set_setting(server, "model", "sd3")
        names = ", ".join(engine.presets.names)
        assert unknown == f"There is no model preset “sd3”; choose one of {names}."
        assert await set_setting(server, "model", "sd2") == "Set model to sd2 for this server."
        assert await bot.store.server_settings() == [(guild, '{"model": "sd2"}')]

        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        slash = await server.push_slash("imagine-from", {"image": upload, "count": 1})
        await slash.wait_followup(timeout_s=60)
        card = cast(StoredMessage, slash.original)
        fields = {f["name"]: f["value"] for f in card.embeds[0].get("fields", [])}
        assert fields["Model"] == "sd2"
        generate_id = next(c for c in card.custom_ids() if c.startswith("i2p:card:gen:"))
        card_id = int(generate_id.split(":")[3])
        stored = await bot.store.get_interrogation(card_id)
        assert stored is not None and stored.interrogation.models["clip"] == "smoke:sd2-clip"
        assert (await bot.store.card_choices(card_id)).preset == "sd2"
        press = await server.push_button(card, generate_id)
        await press.wait_followup(timeout_s=30)
        job = await bot.store.get_job(1)
        assert job is not None and (job.request.preset, job.request.model) == ("sd2", "smoke:generator-sd2")

        text = await server.push_slash("imagine", {"prompt": "a red kite", "count": 1})
        await text.wait_followup(timeout_s=30)
        job = await bot.store.get_job(2)
        assert job is not None and job.request.preset == "sd2"

        # A member's own model wins over the server's.
        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        own = await server.push_slash("imagine-from", {"image": upload, "count": 1, "model": "sd-v1-4"})
        await own.wait_followup(timeout_s=60)
        own_card = cast(StoredMessage, own.original)
        own_id = int(next(c for c in own_card.custom_ids() if c.startswith("i2p:card:gen:")).split(":")[3])
        described = await bot.store.get_interrogation(own_id)
        assert described is not None and described.interrogation.models["clip"] != "smoke:sd2-clip"
        assert (await bot.store.card_choices(own_id)).preset == "sd-v1-4"

        shown = await server.push_slash("settings show", user="owner")
        embed = (await shown.wait_response()).json["data"]["embeds"][0]
        assert {f["name"]: f["value"] for f in embed["fields"]}["model (set here)"].startswith("sd2\n")

        reset = await server.push_slash("settings reset", {"key": "model"}, user="mod")
        assert (await ephemeral_answer(reset)).startswith("model is the bot's default again here.")
        assert await bot.store.server_settings() == []
        again = await server.push_slash("imagine", {"prompt": "a red kite", "count": 1})
        await again.wait_followup(timeout_s=30)
        job = await bot.store.get_job(3)
        assert job is not None and job.request.preset == "sd-v1-4"

        # Naming the bot's default keeps nothing for the server, as a reset does.
        assert await set_setting(server, "model", "sd2") == "Set model to sd2 for this server."
        assert await set_setting(server, "model", "sd-v1-4") == "model is the bot's default again here."
        assert await bot.store.server_settings() == []
        await bot.queue.join()
