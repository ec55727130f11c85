"""Reply-edit through the loopback Discord: a member replies to a card or a result with text; the bot asks for
message content only when discord.reply_edits is on."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import cast

import pytest
from PIL import Image

from i2p2i_bot.config import Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.smoke import SmokeModels, write_smoke_lora
from tests.bot_harness import bot_settings, png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord, StoredMessage
from tests.test_bot import button, describe

MESSAGE_CONTENT = 1 << 15
EDIT_MESSAGE = "PATCH /channels/{channel}/messages/{message}"
GUILD_MESSAGES = 1 << 9


@pytest.fixture
def settings(base_settings: Settings, tmp_path: Path, discord_server: FakeDiscord) -> Settings:
    made = bot_settings(base_settings, tmp_path / "data", discord_server)
    return dataclasses.replace(made, discord=dataclasses.replace(made.discord, reply_edits=True))


def identified_intents(server: FakeDiscord) -> int:
    session = server.gateway.current
    assert session is not None
    return session.intents


def replies_to(server: FakeDiscord, message: StoredMessage) -> list[StoredMessage]:
    """The bot's messages that reply to `message`."""
    return [
        m
        for m in server.messages_in("general")
        if m.author.id == server.world.bot_user.id
        and str((m.message_reference or {}).get("message_id")) == str(message.id)
    ]


async def bot_reply_to(server: FakeDiscord, message: StoredMessage) -> StoredMessage:
    """The bot's reply to `message`, once it is there."""
    found = await server.wait_until(lambda: next(iter(replies_to(server, message)), None), timeout_s=30)
    return cast(StoredMessage, found)


async def test_replies_edit_a_card_and_make_a_result_again(
    discord_server: FakeDiscord, settings: Settings, engine: Engine, astronaut: Image.Image
) -> None:
    server = discord_server
    async with running_i2p2i(settings, server, engine) as bot:
        assert identified_intents(server) & MESSAGE_CONTENT and identified_intents(server) & GUILD_MESSAGES
        _, card = await describe(server, astronaut)
        card_id = int(button(card, "i2p:card:gen:").split(":")[3])
        reply = await server.post_user_message("general", "alice", "a red kite\n--neg fog", reply_to=card)
        answer = await bot_reply_to(server, reply)
        fields = {f["name"]: f["value"] for f in answer.embeds[0]["fields"]}
        assert "a red kite" in fields["Your prompt · Generate and Edit prompt use it"]
        choices = await bot.store.card_choices(card_id)
        assert (choices.prompt, choices.negative_prompt) == ("a red kite", "fog")

        # Another member's reply changes nothing and gets no answer.
        bobs = await server.post_user_message("general", "bob", "a blue kite", reply_to=answer)
        alices = await server.post_user_message("general", "alice", "+ at dawn", reply_to=answer)
        again = await bot_reply_to(server, alices)
        assert (await bot.store.card_choices(card_id)).prompt == "a red kite, at dawn"
        assert replies_to(server, bobs) == []

        # Generate uses the member's prompt; replying to the result makes it again with an edit.
        press = await server.push_button(again, button(again, "i2p:card:gen:"))
        await press.wait_followup(timeout_s=30)
        await server.wait_until(lambda: cast(StoredMessage, press.original).attachments or None, timeout_s=30)
        first = await bot.store.get_job(1)
        assert first is not None and first.request.prompt == "a red kite, at dawn"
        assert first.request.negative_prompt == "fog"
        result = cast(StoredMessage, press.original)
        edit = await server.post_user_message("general", "alice", "- at dawn\n+ at dusk", reply_to=result)
        status = await bot_reply_to(server, edit)
        assert "Job #2" in status.content or any("Job #2" in (e.get("title") or "") for e in status.embeds)
        second = await bot.store.get_job(2)
        assert second is not None and second.origin == "reply" and second.parent_job_id == 1
        assert second.request.prompt == "a red kite, at dusk"
        assert (second.request.steps, second.request.negative_prompt) == (first.request.steps, "fog")
        await bot.queue.join()
        # The status reply is the job's message, as a card's Generate has one: the bot edits its own
        # message (no interaction token, so no 15 minutes) with progress, then with the result.
        done = await server.wait_until(lambda: server.message(status.id).attachments or None, timeout_s=30)
        assert done
        shown = server.message(status.id)
        assert shown.content == f"<@{server.user('alice').id}> job #2 is done." and shown.embeds
        assert "i2p:job:reroll:2" in shown.custom_ids()
        assert not [m for m in server.messages_in("general") if m.id != status.id and "job #2" in m.content]
        edits = server.calls(
            route=EDIT_MESSAGE, predicate=lambda c: c.params.get("message") == str(status.id)
        )
        # Progress edits may come first (a fast job can finish before its first one); the result's is last.
        assert edits and edits[-1].files

        # A banned term or an unknown option: one sentence in reply, nothing queued.
        bad = await server.post_user_message("general", "alice", "--ar 16:9", reply_to=result)
        said = await bot_reply_to(server, bad)
        assert said.content.startswith("I do not know the option --ar")
        banned = await server.post_user_message("general", "alice", "+ nsfw", reply_to=result)
        said = await bot_reply_to(server, banned)
        assert said.content == "That prompt contains banned terms (nsfw); remove them first."
        assert await bot.store.get_job(3) is None


async def test_without_reply_edits_the_bot_asks_for_no_privileged_intent(
    discord_server: FakeDiscord, settings: Settings, engine: Engine, astronaut: Image.Image
) -> None:
    server = discord_server
    off = dataclasses.replace(settings, discord=dataclasses.replace(settings.discord, reply_edits=False))
    async with running_i2p2i(off, server, engine) as bot:
        assert not identified_intents(server) & (MESSAGE_CONTENT | GUILD_MESSAGES)
        _, card = await describe(server, astronaut)
        await server.post_user_message("general", "alice", "a red kite", reply_to=card)
        card_id = int(button(card, "i2p:card:gen:").split(":")[3])
        assert (await bot.store.card_choices(card_id)).prompt is None


async def test_a_reply_to_a_card_is_checked_against_the_cards_model(
    discord_server: FakeDiscord,
    settings: Settings,
    engine: Engine,
    astronaut: Image.Image,
    smoke_models: SmokeModels,
    tmp_path: Path,
) -> None:
    """A LoRA made for SD 2.x may be named in a reply to a card made for the sd2 preset: the reply is checked
    as that card's Generate will plan it, not against the bot's default model."""
    server = discord_server
    folder = tmp_path / "loras"
    metadata = {"ss_base_model_version": "sd_v2"}
    write_smoke_lora(smoke_models.generator, folder / "two.safetensors", seed=3, metadata=metadata)
    models = dataclasses.replace(settings.models, lora_dir=str(folder))
    settings = dataclasses.replace(settings, models=models)
    async with running_i2p2i(settings, server, engine.sharing(settings=settings)) as bot:
        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        slash = await server.push_slash("imagine-from", {"image": upload, "count": 1, "model": "sd2"})
        await slash.wait_followup(timeout_s=60)
        card = cast(StoredMessage, slash.original)
        card_id = int(button(card, "i2p:card:gen:").split(":")[3])
        reply = await server.post_user_message("general", "alice", "a kite <lora:two:0.5>", reply_to=card)
        answer = await bot_reply_to(server, reply)
        assert answer.embeds, answer.content
        assert (await bot.store.card_choices(card_id)).prompt == "a kite <lora:two:0.5>"

        # The same reply to a card for the default model (SD 1.x) is refused in one sentence.
        _, plain = await describe(server, astronaut)
        plain_id = int(button(plain, "i2p:card:gen:").split(":")[3])
        refused = await server.post_user_message("general", "alice", "a kite <lora:two:0.5>", reply_to=plain)
        said = await bot_reply_to(server, refused)
        assert said.content == (
            "The LoRA “two” was made for another model than this server's (it was made for "
            "Stable Diffusion 2.x); choose another."
        )
        assert (await bot.store.card_choices(plain_id)).prompt is None
