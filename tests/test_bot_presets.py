"""Model presets through the loopback Discord: the model option, the card, the job, Info and Reroll."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

from PIL import Image

from cogs.imagine import preset_choices
from i2p2i_bot.config import BUILTIN_PRESET, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.models import resolve_presets
from i2p2i_bot.presets import Preset, Presets
from tests.bot_harness import bot_settings, png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord, StoredMessage
from tests.fake_engine import FakeEngine, OneModelEngine
from tests.test_bot import ephemeral_answer


def button(message: StoredMessage, prefix: str) -> str:
    return next(c for c in message.custom_ids() if c.startswith(prefix))


async def test_a_card_for_a_preset_describes_and_generates_with_it(
    discord_server: FakeDiscord,
    base_settings: Settings,
    tmp_path: Path,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """/imagine-from model:sd2 describes with SD 2.x's CLIP, the card shows and keeps the model, its job
    records the preset and is made by it, Info names it, and Reroll fails in one sentence once the preset
    is gone from the config."""
    server = discord_server
    settings = bot_settings(base_settings, tmp_path / "data", server)
    engine = engine.sharing(settings=settings)  # its generators swap in a copy, not the session's engine
    async with running_i2p2i(settings, server, engine) as bot:
        (command,) = [c for c in server.synced_commands() if c["name"] == "imagine-from"]
        (model,) = [o for o in command["options"] if o["name"] == "model"]
        assert model["autocomplete"] is True

        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        slash = await server.push_slash("imagine-from", {"image": upload, "count": 1, "model": "sd2"})
        await slash.wait_followup(timeout_s=60)
        card = cast(StoredMessage, slash.original)
        fields = {f["name"]: f["value"] for f in card.embeds[0].get("fields", [])}
        assert fields["Model"] == "sd2"
        card_id = int(button(card, "i2p:card:gen:").split(":")[3])
        stored = await bot.store.get_interrogation(card_id)
        assert stored is not None and stored.interrogation.models["clip"] == "smoke:sd2-clip"
        assert (await bot.store.card_choices(card_id)).preset == "sd2"

        press = await server.push_button(card, button(card, "i2p:card:gen:"))
        await press.wait_followup(timeout_s=30)
        await server.wait_until(lambda: cast(StoredMessage, press.original).attachments or None, timeout_s=60)
        job = await bot.store.get_job(1)
        assert job is not None and job.status == "complete"
        assert (job.request.preset, job.request.model) == ("sd2", "smoke:generator-sd2")
        assert "sd2" in engine.resident_presets
        rows = await bot.store._fetchall("SELECT preset FROM jobs WHERE id = 1")
        assert rows[0]["preset"] == "sd2"

        result = cast(StoredMessage, press.original)
        info = await server.push_button(result, "i2p:job:info:1")
        embed = (await info.wait_response()).json["data"]["embeds"][0]
        models = next(f["value"] for f in embed["fields"] if f["name"] == "Models")
        assert "preset: sd2" in models and "generator: smoke:generator-sd2" in models

        # The admin removes the preset: a Reroll says so in one sentence and queues nothing.
        without = dataclasses.replace(settings, models=dataclasses.replace(settings.models, preset="default"))
        engine.presets = resolve_presets(without)
        reroll = await server.push_button(result, "i2p:job:reroll:1")
        data = (await reroll.wait_response()).json.get("data") or {}
        text = data.get("content") or (await reroll.wait_call("POST /webhooks/{app}/{token}")).json["content"]
        assert text == "There is no model preset “sd2”; choose one of sd-v1-4."
        assert await bot.store.get_job(2) is None


async def test_an_unknown_model_is_one_private_sentence(
    discord_server: FakeDiscord, base_settings: Settings, tmp_path: Path, astronaut: Image.Image
) -> None:
    """/imagine-from with a model the bot does not have answers privately, before describing anything."""
    server = discord_server
    settings = bot_settings(base_settings, tmp_path / "data", server)
    fake = FakeEngine()
    async with running_i2p2i(settings, server, cast(Any, fake)) as bot:
        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        slash = await server.push_slash("imagine-from", {"image": upload, "model": "sdxl"})
        answer = (await slash.wait_response()).json
        assert answer["data"]["flags"] & 64
        assert answer["data"]["content"] == "There is no model preset “sdxl”; choose one of sd-v1-4, other."
        assert await bot.store._fetchall("SELECT id FROM interrogations") == []


def test_model_autocomplete_offers_matching_presets_the_default_first() -> None:
    bot = cast(Any, type("Bot", (), {"engine": FakeEngine()})())
    assert [c.value for c in preset_choices(bot, "")] == ["sd-v1-4", "other"]
    assert [(c.name, c.value) for c in preset_choices(bot, "OTH")] == [("other (sd1)", "other")]
    assert preset_choices(bot, "xl") == []


async def test_the_job_and_queue_say_which_model_loads(
    discord_server: FakeDiscord, base_settings: Settings, tmp_path: Path, astronaut: Image.Image
) -> None:
    """A job for a preset the GPU does not hold says "loading model other" on its message and in /queue
    until the model is there, then makes its images as usual."""
    server = discord_server
    settings = bot_settings(base_settings, tmp_path / "data", server)
    fake = OneModelEngine()
    fake.gate.clear()  # the batch holds before its first step, as a load from disk does
    async with running_i2p2i(settings, server, cast(Any, fake)):
        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        slash = await server.push_slash("imagine-from", {"image": upload, "count": 1, "model": "other"})
        await slash.wait_followup(timeout_s=30)
        card = cast(StoredMessage, slash.original)
        press = await server.push_button(card, button(card, "i2p:card:gen:"))
        await press.wait_followup(timeout_s=30)
        message = cast(StoredMessage, press.original)
        await server.wait_until(lambda: "loading model other" in message.content or None, timeout_s=30)
        assert message.content.startswith("🔄 Job #1: loading model other")
        queue = await server.push_slash("queue")
        embed = (await queue.wait_response()).json["data"]["embeds"][0]
        assert "🔄 Job #1: loading model other…" in embed["description"]
        fake.gate.set()
        await server.wait_until(lambda: message.attachments or None, timeout_s=30)
        assert "loading" not in message.content
        assert fake.resident_presets == ("other",)


def model_options(message: StoredMessage) -> list[str]:
    select = message.component(button(message, "i2p:card:mode:"))
    assert select is not None
    return [o["value"] for o in select["options"] if o["value"].startswith("model:")]


async def test_the_cards_select_changes_its_model_and_generate_uses_it(
    discord_server: FakeDiscord, base_settings: Settings, tmp_path: Path, astronaut: Image.Image
) -> None:
    """The card's select offers the other presets; picking one keeps it on the card, shows it, and
    Generate makes the job with it; a preset the config no longer has is one private sentence and the
    card keeps its model."""
    server = discord_server
    settings = bot_settings(base_settings, tmp_path / "data", server)
    fake = FakeEngine()
    async with running_i2p2i(settings, server, cast(Any, fake)) as bot:
        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        slash = await server.push_slash("imagine-from", {"image": upload, "count": 1})
        await slash.wait_followup(timeout_s=30)
        card = cast(StoredMessage, slash.original)
        assert model_options(card) == ["model:other"]
        card_id = int(button(card, "i2p:card:gen:").split(":")[3])

        pick = await server.push_select(card, button(card, "i2p:card:mode:"), ["model:other"])
        await server.wait_until(lambda: "other" in str(server.message(card.id).embeds) or None, timeout_s=30)
        assert pick.callbacks()[0].json["type"] == 7  # the card itself is redrawn
        redrawn = server.message(card.id)
        fields = {f["name"]: f["value"] for f in redrawn.embeds[0].get("fields", [])}
        assert fields["Model"] == "other"
        assert model_options(redrawn) == ["model:sd-v1-4"]
        assert (await bot.store.card_choices(card_id)).preset == "other"

        stale = await server.push_select(redrawn, button(redrawn, "i2p:card:mode:"), ["model:sdxl"])
        answer = (await stale.wait_response()).json
        assert answer["data"]["flags"] & 64
        assert answer["data"]["content"] == "There is no model preset “sdxl”; choose one of sd-v1-4, other."
        assert (await bot.store.card_choices(card_id)).preset == "other"

        press = await server.push_button(redrawn, button(redrawn, "i2p:card:gen:"))
        await press.wait_followup(timeout_s=30)
        job = await bot.store.get_job(1)
        assert job is not None and job.request.preset == "other"


class ThreePresetEngine(FakeEngine):
    """FakeEngine with a third preset; an admin takes presets out of its config by changing `names`."""

    def __init__(self) -> None:
        super().__init__()
        self.names: tuple[str, ...] = (BUILTIN_PRESET, "other", "third")

    @property
    def presets(self) -> Presets:
        def preset(name: str) -> Preset:
            return Preset(name, f"fake-{name}", "sd1", f"fake-clip-{name}", self.settings)

        return Presets({name: preset(name) for name in self.names})


async def set_server_model(server: FakeDiscord, name: str) -> None:
    handle = await server.push_slash("settings set", {"key": "model", "value": name}, user="owner")
    assert await ephemeral_answer(handle) == f"Set model to {name} for this server."


async def finished(server: FakeDiscord, handle: Any) -> StoredMessage:
    """The job message an interaction's job posted, once its images are on it."""
    await handle.wait_followup(timeout_s=30)
    await server.wait_until(lambda: cast(StoredMessage, handle.original).attachments or None, timeout_s=30)
    return cast(StoredMessage, handle.original)


async def test_imagine_takes_a_model_of_its_own(
    discord_server: FakeDiscord, base_settings: Settings, tmp_path: Path
) -> None:
    """/imagine has /imagine-from's model option (same checks, text and autocomplete); the member's model
    wins over the server's, the job records it, Info names it and Reroll keeps it; an unknown name is the
    presets' sentence, privately, and queues nothing."""
    server = discord_server
    settings = bot_settings(base_settings, tmp_path / "data", server)
    fake = ThreePresetEngine()
    async with running_i2p2i(settings, server, cast(Any, fake)) as bot:
        commands = {c["name"]: c for c in server.synced_commands()}
        options = {c: {o["name"]: o for o in commands[c]["options"]} for c in ("imagine", "imagine-from")}
        assert options["imagine"]["model"] == options["imagine-from"]["model"]
        assert options["imagine"]["model"]["autocomplete"] is True
        typed = await server.push_autocomplete("imagine", {"prompt": "a kite", "model": "THI"}, "model")
        answer = (await typed.wait_response()).json
        assert answer["type"] == 8
        assert [(c["name"], c["value"]) for c in answer["data"]["choices"]] == [("third (sd1)", "third")]

        await set_server_model(server, "other")
        own = await server.push_slash("imagine", {"prompt": "a red kite", "count": 1, "model": " third "})
        result = await finished(server, own)
        job = await bot.store.get_job(1)
        assert job is not None and (job.request.preset, job.request.model) == ("third", "fake-third")
        rows = await bot.store._fetchall("SELECT preset FROM jobs WHERE id = 1")
        assert rows[0]["preset"] == "third"
        assert [params.preset for params, _ in fake.batches] == ["third"]

        unknown = await server.push_slash("imagine", {"prompt": "a red kite", "model": "sdxl"})
        said = await ephemeral_answer(unknown)
        assert said == "There is no model preset “sdxl”; choose one of sd-v1-4, other, third."
        assert await bot.store.get_job(2) is None

        info = await server.push_button(result, "i2p:job:info:1")
        embed = (await info.wait_response()).json["data"]["embeds"][0]
        models = next(f["value"] for f in embed["fields"] if f["name"] == "Models")
        assert "preset: third" in models and "generator: fake-third" in models

        await finished(server, await server.push_button(result, "i2p:job:reroll:1"))
        again = await bot.store.get_job(2)
        assert again is not None and again.request.preset == "third" and again.parent_job_id == 1
        await bot.queue.join()


async def test_use_as_source_describes_for_the_model_the_image_was_made_with(
    discord_server: FakeDiscord, base_settings: Settings, tmp_path: Path, astronaut: Image.Image
) -> None:
    """A result's Use as source describes it with its job's preset's CLIP, and the card keeps that preset
    for Generate; once the config no longer has that preset, the server's model does both."""
    server = discord_server
    settings = bot_settings(base_settings, tmp_path / "data", server)
    fake = ThreePresetEngine()
    async with running_i2p2i(settings, server, cast(Any, fake)) as bot:
        await set_server_model(server, "other")
        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        slash = await server.push_slash("imagine-from", {"image": upload, "count": 1, "model": "third"})
        await slash.wait_followup(timeout_s=30)
        first = cast(StoredMessage, slash.original)
        result = await finished(server, await server.push_button(first, button(first, "i2p:card:gen:")))

        async def use_as_source() -> tuple[StoredMessage, int]:
            use = await server.push_select(result, "i2p:job:image:1", ["source:0"])
            await use.wait_followup(timeout_s=30)
            card = cast(StoredMessage, use.original)
            return card, int(button(card, "i2p:card:gen:").split(":")[3])

        card, card_id = await use_as_source()
        stored = await bot.store.get_interrogation(card_id)
        assert stored is not None and stored.interrogation.models["clip"] == "fake-clip-third"
        assert (await bot.store.card_choices(card_id)).preset == "third"
        fields = {f["name"]: f["value"] for f in card.embeds[0].get("fields", [])}
        assert fields["Model"] == "third"
        await finished(server, await server.push_button(card, button(card, "i2p:card:gen:")))
        job = await bot.store.get_job(2)
        assert job is not None and (job.request.preset, job.interrogation_id) == ("third", card_id)
        assert [params.preset for params, _ in fake.batches] == ["third", "third"]

        fake.names = (BUILTIN_PRESET, "other")  # the admin takes "third" out of the config
        card, card_id = await use_as_source()
        stored = await bot.store.get_interrogation(card_id)
        assert stored is not None and stored.interrogation.models["clip"] == "fake-clip-other"
        assert (await bot.store.card_choices(card_id)).preset == "other"
        await bot.queue.join()
