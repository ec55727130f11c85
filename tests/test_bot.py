"""The bot end to end: the real discord.py client, the smoke engine and the loopback Discord."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import itertools
import os
import sys
import threading
from pathlib import Path
from typing import cast

import pytest
from PIL import Image

from cogs.imagine import card_view
from i2p2i_bot import app
from i2p2i_bot.cards import prompt_card
from i2p2i_bot.config import Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.gpu import Priority
from i2p2i_bot.interrogation import Candidate, Interrogation
from i2p2i_bot.models import resolve_presets
from i2p2i_bot.replies import WITHDRAWN
from i2p2i_bot.store import CardChoices, Store, StoredInterrogation
from tests.bot_harness import png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord, StoredMessage
from tests.discord_fake.validation import check_message
from tests.safety import flagging_everything

ROOT = Path(__file__).resolve().parent.parent
FOLLOWUP = "POST /webhooks/{app}/{token}"
# A real photograph's PNG cut in half: the header is fine, the pixels are not all there.
TRUNCATED_PNG = png_bytes(Image.effect_noise((128, 128), 64).convert("RGB"))[:6000]
EDIT_FOLLOWUP = "PATCH /webhooks/{app}/{token}/messages/{message}"


def card_ids(message) -> list[str]:
    return message.custom_ids()


async def test_happy_path(
    discord_server: FakeDiscord, settings_for, engine: Engine, astronaut: Image.Image
) -> None:
    """/imagine-from → card → Generate → progress → result files → Reroll → Info → Delete."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        commands = {c["name"] for c in server.synced_commands()}
        assert {
            "imagine-from",
            "history",
            "job",
            "queue",
            "forget",
            "admin",
            "Imagine from image",
        } <= commands

        upload = server.add_attachment(png_bytes(astronaut), "astronaut.png")
        slash = await server.push_slash("imagine-from", {"image": upload, "count": 2})
        await slash.wait_followup(timeout_s=20)
        assert slash.callbacks()[0].json["type"] == 5
        card = slash.original
        assert card is not None and not card.ephemeral
        embed = card.embeds[0]
        assert embed["title"] == "Prompt · best"
        stored = await bot.store.get_interrogation(int(card.custom_ids()[0].split(":")[3]))
        assert stored is not None and stored.interrogation.prompt in embed["description"]
        assert card.attachments[0].filename == "source.jpg"
        gen_id = next(c for c in card.custom_ids() if c.startswith("i2p:card:gen:"))

        press = await server.push_button(card, gen_id)
        await press.wait_followup(timeout_s=30)
        job_message = press.original
        assert job_message is not None and "Job #1" in job_message.content
        assert "i2p:job:cancel:1" in job_message.custom_ids()

        done = await server.wait_until(
            lambda: cast(StoredMessage, press.original).attachments or None, timeout_s=20
        )
        assert done
        result = press.original
        assert result is not None
        names = [a.filename for a in result.attachments]
        assert names[0] == "job1-grid.png" and len(names) == 3
        assert sum(a.size for a in result.attachments) <= slash.payload["attachment_size_limit"]
        assert "job 1 is done" in result.content.lower() or "job #1 is done" in result.content
        assert {"i2p:job:reroll:1", "i2p:job:edit:1", "i2p:job:info:1", "i2p:job:delete:1"} <= set(
            result.custom_ids()
        )
        record = await bot.store.job_record(1)
        assert record is not None and record.job.status == "complete" and len(record.images) == 2
        single = Image.open(io.BytesIO(result.file(names[1])))
        assert single.size == (64, 64)

        reroll = await server.push_button(result, "i2p:job:reroll:1")
        await reroll.wait_followup(timeout_s=30)
        await server.wait_until(
            lambda: cast(StoredMessage, reroll.original).attachments or None, timeout_s=20
        )
        second = await bot.store.job_record(2)
        assert (
            second is not None
            and second.job.parent_job_id == 1
            and second.job.request.prompt == record.job.request.prompt
        )
        assert set(second.job.request.seeds).isdisjoint(record.job.request.seeds)

        info = await server.push_button(result, "i2p:job:info:1")
        answer = await info.wait_response()
        assert answer.json["type"] == 4 and answer.json["data"]["flags"] & 64
        assert "Job #1" in answer.json["data"]["embeds"][0]["title"]

        await server.push_button(result, "i2p:job:delete:1")
        await server.wait_until(lambda: server.message(result.id).deleted or None, timeout_s=10)


async def describe(
    server: FakeDiscord, image: Image.Image, *, user: str = "alice", count: int = 1, **options
):
    """Run /imagine-from and return (interaction handle, card message)."""
    upload = server.add_attachment(png_bytes(image), "photo.png")
    handle = await server.push_slash("imagine-from", {"image": upload, "count": count, **options}, user=user)
    await handle.wait_followup(timeout_s=60)
    return handle, handle.original


async def eventually(fetch, check, timeout_s: float = 10.0):
    """Poll an async fetch until check passes; returns the value (or fails after timeout_s)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await fetch()
        if check(value):
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still {value!r} after {timeout_s}s")
        await asyncio.sleep(0.02)


async def generate(server: FakeDiscord, card, **context):
    """Press a card's Generate button and wait for the job's message."""
    press = await server.push_button(card, button(card, "i2p:card:gen:"), **context)
    await press.wait_followup(timeout_s=30)
    return press


def button(message, prefix: str) -> str:
    return next(c for c in message.custom_ids() if c.startswith(prefix))


@contextlib.contextmanager
def gpu_blocked(bot):
    """Hold the GPU thread, so queued jobs wait until the block ends."""
    gate = threading.Event()
    bot.gpu.submit(gate.wait, priority=Priority.URGENT)
    try:
        yield
    finally:
        gate.set()


async def ephemeral_answer(handle) -> str:
    """The text of a reply only the member sees, sent as the callback or as a followup; fails when the
    member's answer was shown in the channel (as Discord shows a first followup after a public deferral)."""
    data = (await handle.wait_response()).json.get("data") or {}
    text = data.get("content") or (await handle.wait_call(FOLLOWUP)).json["content"]
    shown = [m for m in (handle.original, *handle.followups) if m is not None and m.content == text]
    assert shown, f"{text!r} was never shown"
    assert all(m.ephemeral and not m.deleted for m in shown), f"{text!r} was shown in the channel"
    return text


async def test_context_menu(
    discord_server: FakeDiscord, settings_for, engine: Engine, astronaut: Image.Image
) -> None:
    """'Imagine from image' on a member's message with one image posts a prompt card for it."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine):
        upload = server.add_attachment(png_bytes(astronaut), "astro.png", ephemeral=False)
        posted = await server.post_user_message("general", "bob", "look at this", attachments=[upload])
        handle = await server.push_message_command("Imagine from image", posted)
        await handle.wait_followup(timeout_s=60)
        card = handle.original
        assert card is not None
        assert card.embeds[0]["title"].startswith("Prompt")
        assert any(c.startswith("i2p:card:gen:") for c in card.custom_ids())


async def test_context_menu_without_image(discord_server: FakeDiscord, settings_for, engine: Engine) -> None:
    """A message with no image gets one ephemeral sentence."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine):
        posted = await server.post_user_message("general", "bob", "just words")
        handle = await server.push_message_command("Imagine from image", posted)
        assert "no image" in await ephemeral_answer(handle)


@pytest.mark.parametrize(
    ("data", "filename", "content_type", "needle"),
    [
        (b"x" * (26 * 1024 * 1024), "huge.png", "image/png", "the limit is 25 MB"),
        (b"hello, not an image", "notes.png", "text/plain", "not an image I can read"),
        (TRUNCATED_PNG, "broken.png", "image/png", "damaged or incomplete"),
    ],
)
async def test_bad_attachments_get_one_sentence(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    data: bytes,
    filename: str,
    content_type: str,
    needle: str,
) -> None:
    """Too big, not an image, or broken: an ephemeral sentence, and no public card (at most the neutral line
    a public "thinking…" becomes when the file turns out broken only once downloaded)."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine):
        upload = server.add_attachment(data, filename, content_type=content_type)
        handle = await server.push_slash("imagine-from", {"image": upload})
        assert needle in await ephemeral_answer(handle)
        public = [m for m in server.messages_in("general") if not m.ephemeral and not m.deleted]
        assert [(m.content, m.embeds, m.attachments) for m in public] in ([], [(WITHDRAWN, [], [])])


async def test_decompression_bomb_is_refused_before_download(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
) -> None:
    """An image declaring 30000×30000 pixels is refused from its metadata; the file is never fetched."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine):
        upload = server.add_attachment(
            b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "bomb.png", content_type="image/png", width=30000, height=30000
        )
        handle = await server.push_slash("imagine-from", {"image": upload})
        assert "30000×30000" in await ephemeral_answer(handle)
        assert server.calls(route="GET /attachments/{channel}/{attachment}/{filename}") == []


async def test_non_owner_buttons_are_refused(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Bob pressing Edit on Alice's card, or Delete and Cancel on her job, gets an ephemeral refusal."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        edit = await server.push_button(card, button(card, "i2p:card:edit:"), user="bob")
        assert "This card belongs to" in await ephemeral_answer(edit)
        with gpu_blocked(bot):
            press = await generate(server, card)
            status = press.original
            cancel = await server.push_button(status, "i2p:job:cancel:1", user="bob")
            assert "Only <@" in await ephemeral_answer(cancel)
            assert bot.queue.active_jobs()[0].id == 1
        done = await server.wait_until(lambda: press.original.attachments or None, timeout_s=30)
        assert done
        delete = await server.push_button(press.original, "i2p:job:delete:1", user="bob")
        assert "Only <@" in await ephemeral_answer(delete)
        assert not server.message(press.original.id).deleted


async def test_owner_cancels_a_queued_job(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """The owner's Cancel stops a queued job; its message says so, no image is made, and Retry on it makes
    the same request again."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        with gpu_blocked(bot):
            press = await generate(server, card)
            cancel = await server.push_button(press.original, "i2p:job:cancel:1")
            assert "Cancelled job #1" in await ephemeral_answer(cancel)
        await server.wait_until(lambda: "cancelled" in str(press.original.embeds) or None, timeout_s=20)
        record = await bot.store.job_record(1)
        assert record is not None and record.job.status == "cancelled" and record.images == ()

        # Retry makes the same request again, seeds and all, as a new job.
        result = server.message(press.original.id)
        assert "i2p:job:retry:1" in result.custom_ids() and "i2p:job:reroll:1" not in result.custom_ids()
        retry = await server.push_button(result, "i2p:job:retry:1")
        await retry.wait_followup(timeout_s=30)
        again = await eventually(
            lambda: bot.store.get_job(2), lambda job: job and job.status == "complete", 30
        )
        assert again.origin == "retry" and again.parent_job_id == 1
        assert again.request == record.job.request


async def test_edit_modal_generates_with_typed_values(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Edit prompt opens a prefilled modal; its prompt, negative, count and seed make the job."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        edit = await server.push_button(card, button(card, "i2p:card:edit:"))
        await edit.wait_response()
        stored = await bot.store.get_interrogation(1)
        assert stored is not None
        modal = edit.modal
        assert modal is not None
        fields = {c["components"][0]["label"]: c["components"][0] for c in modal["components"]}
        assert fields["Prompt"]["value"] == stored.interrogation.prompt
        submit = await server.push_modal_submit(
            edit,
            {
                "Prompt": "a red fox in snow",
                "Negative prompt": "blurry",
                "Images (1–8)": "2",
                "Seed (blank for random)": "42",
            },
        )
        await submit.wait_followup(timeout_s=30)
        await server.wait_until(
            lambda: cast(StoredMessage, submit.original).attachments or None, timeout_s=30
        )
        record = await bot.store.job_record(1)
        assert record is not None
        job = record.job
        assert (job.request.prompt, job.request.negative_prompt, job.request.seeds) == (
            "a red fox in snow",
            "blurry",
            (42, 43),
        )


async def test_jobs_take_the_server_defaults_and_rerolls_keep_their_own(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """The server's default negative prompt reaches a card's job; a Reroll and Edit & regenerate keep the
    job's steps, guidance and negative prompt after the defaults change; Info names the job's own models."""
    server = discord_server
    settings = settings_for(server)
    settings = dataclasses.replace(
        settings, generate=dataclasses.replace(settings.generate, negative_prompt="blurry, lowres")
    )
    described_with = engine.interrogator.models
    engine = engine.sharing(settings=settings)
    try:
        async with running_i2p2i(settings, server, engine) as bot:
            _, card = await describe(server, astronaut)
            edit = await server.push_button(card, button(card, "i2p:card:edit:"))
            await edit.wait_response()
            assert edit.modal is not None
            fields = {c["components"][0]["label"]: c["components"][0] for c in edit.modal["components"]}
            assert fields["Negative prompt"]["value"] == "blurry, lowres"

            press = await generate(server, card)
            await server.wait_until(
                lambda: cast(StoredMessage, press.original).attachments or None, timeout_s=30
            )
            first = await bot.store.get_job(1)
            assert first is not None and first.request.negative_prompt == "blurry, lowres"
            rows = await bot.store._fetchall("SELECT negative_prompt, steps, guidance FROM jobs WHERE id = 1")
            assert tuple(rows[0]) == ("blurry, lowres", settings.generate.steps, settings.generate.guidance)

            # The server's defaults and models change; the job's settings are its own.
            changed = dataclasses.replace(
                settings.generate, steps=settings.generate.steps + 1, guidance=2.5, negative_prompt="new"
            )
            engine.presets = resolve_presets(dataclasses.replace(settings, generate=changed))
            engine.interrogator.models = {"clip": "now/clip", "caption": "now/caption"}
            result = cast(StoredMessage, press.original)
            reroll = await server.push_button(result, "i2p:job:reroll:1")
            await reroll.wait_followup(timeout_s=30)
            again = await bot.store.get_job(2)
            assert again is not None and again.parent_job_id == 1 and again.origin == "reroll"
            assert again.request.seed != first.request.seed
            assert dataclasses.replace(again.request, seed=first.request.seed) == first.request

            edit = await server.push_button(result, "i2p:job:edit:1")
            await edit.wait_response()
            submit = await server.push_modal_submit(edit, {"Prompt": "a calmer sea", "Images (1–8)": "1"})
            await submit.wait_followup(timeout_s=30)
            edited = await bot.store.get_job(3)
            assert edited is not None and edited.request.prompt == "a calmer sea"
            assert (edited.request.steps, edited.request.guidance) == (
                first.request.steps,
                first.request.guidance,
            )
            assert edited.request.negative_prompt == "blurry, lowres"

            info = await server.push_button(result, "i2p:job:info:1")
            answer = await info.wait_response()
            embed = answer.json["data"]["embeds"][0]
            models = next(f["value"] for f in embed["fields"] if f["name"] == "Models")
            assert "generator: smoke:generator" in models and "clip: smoke:clip" in models
            assert "now/" not in models
            await bot.queue.join()
    finally:
        engine.interrogator.models = described_with


async def test_a_negative_card_generates_its_caption_without_those_words(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Generate on a negative card makes images of the caption, with the suggestion as negative prompt."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut, mode="negative")
        stored = await bot.store.get_interrogation(1)
        assert stored is not None and stored.interrogation.negative
        press = await generate(server, card)
        await server.wait_until(lambda: cast(StoredMessage, press.original).attachments or None, timeout_s=30)
        job = await bot.store.get_job(1)
        assert job is not None
        assert job.request.prompt == stored.interrogation.caption
        assert job.request.negative_prompt == stored.interrogation.negative


async def test_imagine_makes_images_from_a_written_prompt(
    discord_server: FakeDiscord, settings_for, engine: Engine
) -> None:
    """/imagine queues the member's own prompt with their seed and the server's negative prompt, and posts the
    result; a count out of bounds is one private sentence and queues nothing."""
    server = discord_server
    settings = settings_for(server)
    settings = dataclasses.replace(
        settings, generate=dataclasses.replace(settings.generate, negative_prompt="blurry")
    )
    await imagine_a_kite(server, settings, engine.sharing(settings=settings))


async def imagine_a_kite(server: FakeDiscord, settings: Settings, engine: Engine) -> None:
    async with running_i2p2i(settings, server, engine) as bot:
        too_many = await server.push_slash("imagine", {"prompt": "a red kite", "count": 9})
        text = await ephemeral_answer(too_many)
        assert text == "The number of images must be between 1 and 8 (got 9)."
        assert await bot.store.get_job(1) is None

        handle = await server.push_slash("imagine", {"prompt": "a red kite", "count": 2, "seed": 77})
        await handle.wait_followup(timeout_s=30)
        await server.wait_until(
            lambda: cast(StoredMessage, handle.original).attachments or None, timeout_s=30
        )
        job = await bot.store.get_job(1)
        assert job is not None and job.origin == "imagine" and job.interrogation_id is None
        assert (job.request.prompt, job.request.negative_prompt, job.request.seeds) == (
            "a red kite",
            "blurry",
            (77, 78),
        )
        record = await bot.store.job_record(1)
        assert record is not None and [i.fidelity for i in record.images] == [None, None]


async def test_edit_modal_bad_input_is_echoed(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """A count that is not a number gets a sentence that quotes it and gives the typed prompt back."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        edit = await server.push_button(card, button(card, "i2p:card:edit:"))
        await edit.wait_response()
        submit = await server.push_modal_submit(edit, {"Prompt": "my careful prompt", "Images (1–8)": "lots"})
        text = await ephemeral_answer(submit)
        assert "you typed “lots”" in text and "my careful prompt" in text
        assert bot.queue.active_jobs() == [] and await bot.store.get_job(1) is None


async def test_banned_prompt_is_refused(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """A typed prompt with a banned term is refused with a sentence naming it."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        edit = await server.push_button(card, button(card, "i2p:card:edit:"))
        await edit.wait_response()
        submit = await server.push_modal_submit(edit, {"Prompt": "a NSFW poster"})
        assert "banned terms (nsfw)" in await ephemeral_answer(submit)
        assert await bot.store.get_job(1) is None


async def test_disguised_banned_terms_are_refused_in_the_edit_modal(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """An edited prompt that spells a banned term in fullwidth letters, with a zero-width space or a soft
    hyphen inside, or with a Cyrillic look-alike, is refused like the plain word."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        for prompt in (
            "a ＮＳＦＷ poster",
            "a ns\u200bfw poster",
            "a ns\u00adfw poster",
            "a n\u0455fw poster",
        ):
            edit = await server.push_button(card, button(card, "i2p:card:edit:"))
            await edit.wait_response()
            submit = await server.push_modal_submit(edit, {"Prompt": prompt})
            assert "banned terms (nsfw)" in await ephemeral_answer(submit), prompt
        assert await bot.store.get_job(1) is None


async def test_typed_prompts_are_read_as_they_look(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
) -> None:
    """/imagine: a look-alike in the prompt or a soft hyphen in the negative is refused; a prompt of only
    zero-width characters is empty; one with a zero-width space inside is made without it."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        cyrillic = await server.push_slash("imagine", {"prompt": "a nud\u0435 statue"})
        assert "banned terms (nude)" in await ephemeral_answer(cyrillic)
        negative = await server.push_slash("imagine", {"prompt": "a statue", "negative": "go\u00adre"})
        assert "banned terms (gore)" in await ephemeral_answer(negative)
        blank = await server.push_slash("imagine", {"prompt": "\u200b\u200b\u2060"})
        assert await ephemeral_answer(blank) == "The prompt is empty; write what the image should show."
        assert await bot.store.get_job(1) is None
        kite = await server.push_slash("imagine", {"prompt": "a red\u200b kite", "count": 1})
        await kite.wait_followup(timeout_s=30)
        job = await bot.store.get_job(1)
        assert job is not None and job.request.prompt == "a red kite"


async def test_expired_token_delivers_in_the_channel(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """When the token dies before the job ends, the result goes to the channel with a mention."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        with gpu_blocked(bot):
            press = await generate(server, card)
            press.expire()
        posted = await server.wait_for(route="POST /channels/{channel}/messages", timeout_s=30)
        assert f"<@{server.user('alice').id}>" in posted.json["content"]
        assert posted.files and posted.files[0].filename.startswith("job1")
        assert await eventually(lambda: bot.store.get_job(1), lambda job: job.delivered_at is not None)


async def test_deleted_channel_delivers_by_dm(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Token gone and channel deleted: the owner gets the result by DM."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        with gpu_blocked(bot):
            press = await generate(server, card)
            press.expire()
            await server.delete_channel("general")
        await server.wait_until(lambda: server.dm_messages("alice") or None, timeout_s=30)
        dm = server.dm_messages("alice")[0]
        assert "could not be posted" in dm.content and dm.attachments
        assert await eventually(lambda: bot.store.get_job(1), lambda job: job.delivered_at is not None)


async def test_rate_limits_and_server_errors_on_followups_are_retried(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """A 429 and a 500 on the result's webhook edit are retried by discord.py; the result arrives once."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine):
        _, card = await describe(server, astronaut)
        server.rate_limit_next(EDIT_FOLLOWUP, times=1, retry_after_s=0.05)
        server.fail_next(EDIT_FOLLOWUP, status=500, times=1)
        press = await generate(server, card)
        await server.wait_until(lambda: press.original.attachments or None, timeout_s=60)
        statuses = [c.status for c in server.calls(route=EDIT_FOLLOWUP)]
        assert 429 in statuses and 500 in statuses and statuses[-1] == 200
        assert len([m for m in server.messages_in("general") if m.attachments and not m.deleted]) == 2


async def test_buttons_work_after_a_restart(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """A card made before a restart still generates afterwards: its state comes from SQLite."""
    server = discord_server
    settings = settings_for(server)
    async with running_i2p2i(settings, server, engine):
        _, card = await describe(server, astronaut)
    async with running_i2p2i(settings, server, engine) as bot:
        press = await generate(server, card)
        await server.wait_until(lambda: press.original.attachments or None, timeout_s=60)
        job = await bot.store.get_job(1)
        assert job is not None and job.interrogation_id == 1


async def test_gateway_disconnect_mid_job(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """The gateway drops while a job waits; the bot resumes, delivers, and still answers new commands."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        with gpu_blocked(bot):
            press = await generate(server, card)
            mark = server.frame_mark()
            server.drop_connection()
            await server.wait_for_frame(op=6, since=mark, timeout_s=30)  # RESUME
        await server.wait_until(lambda: press.original.attachments or None, timeout_s=60)
        _, second = await describe(server, astronaut)
        assert second.embeds


async def test_two_users_are_served_fairly(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Alice queues two jobs, then Bob one: Bob's images come before Alice's second job."""
    server = discord_server
    async with running_i2p2i(settings_for(server, max_batch_images=1), server, engine) as bot:
        _, alice_card = await describe(server, astronaut, user="alice", count=2)
        _, bob_card = await describe(server, astronaut, user="bob", count=1)
        with gpu_blocked(bot):
            for user, card in (("alice", alice_card), ("alice", alice_card), ("bob", bob_card)):
                await generate(server, card, user=user)
        await bot.queue.join()
        finished: dict[int, float | None] = {}
        for job_id in (1, 2, 3):
            job = await bot.store.get_job(job_id)
            assert job is not None
            finished[job_id] = job.finished_at
        bob_done, alice_second_done = finished[3], finished[2]
        assert bob_done is not None and alice_second_done is not None and bob_done < alice_second_done


async def test_upload_limit_is_respected(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """With a tiny upload limit, the bot posts what fits and says what it left out."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine):
        _, card = await describe(server, astronaut, count=4)
        press = await generate(server, card, attachment_size_limit=96 * 1024)
        await server.wait_until(lambda: "done" in press.original.content or None, timeout_s=60)
        total = sum(a.size for a in press.original.attachments)
        assert total <= 96 * 1024


async def test_history_queue_job_and_forget(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """/history lists the job, /job shows it with buttons, /queue is empty after, /forget deletes it all."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        press = await generate(server, card)
        await server.wait_until(lambda: press.original.attachments or None, timeout_s=60)
        history = await server.push_slash("history")
        data = (await history.wait_response()).json["data"]
        assert data["flags"] & 64 and "Job #1" in data["embeds"][0]["description"]
        job = await server.push_slash("job", {"job_id": 1})
        data = (await job.wait_response()).json["data"]
        assert "i2p:job:reroll:1" in str(data["components"])
        queue = await server.push_slash("queue")
        assert "nothing queued" in (await queue.wait_response()).json["data"]["content"]
        forget = await server.push_slash("forget")
        await forget.wait_response()
        asked = forget.original
        assert asked is not None
        confirm_id = next(c for c in asked.custom_ids() if c)
        confirm = await server.push_button(asked, confirm_id)
        await confirm.wait_response()
        assert "Deleted 1 job(s)" in (await confirm.wait_response()).json["data"]["content"]
        assert await bot.store.get_job(1) is None


async def test_forget_removes_uploads_only_that_member_used(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """/forget deletes the member's uploaded picture that nobody else sent, and its cached prompt; a picture
    another member also sent stays on disk, and so does the prompt the cache served them."""
    server = discord_server
    settings = settings_for(server)
    async with running_i2p2i(settings, server, engine) as bot:
        alice, bob = server.user("alice").id, server.user("bob").id
        await describe(server, astronaut, user="alice")
        await describe(server, astronaut.rotate(90), user="alice")
        await describe(server, astronaut.rotate(90), user="bob")
        private, shared = [c.source_sha256 for c in reversed(await bot.store.recent_interrogations(alice))]
        sources = settings.data_path / "sources"
        assert {p.name for p in sources.iterdir()} == {f"{private}.png", f"{shared}.png"}

        forget = await server.push_slash("forget")
        await forget.wait_response()
        asked = forget.original
        assert asked is not None and "pictures you uploaded" in asked.content
        confirm = await server.push_button(asked, next(c for c in asked.custom_ids() if c))
        answer = (await confirm.wait_response()).json["data"]["content"]
        assert "1 uploaded picture(s)" in answer, answer

        assert {p.name for p in sources.iterdir()} == {f"{shared}.png"}
        assert await bot.store.recent_interrogations(alice) == []
        (kept,) = await bot.store.recent_interrogations(bob)
        assert kept.source_sha256 == shared and kept.cached
        rows = await bot.store._fetchall("SELECT source_sha256 FROM interrogation_results")
        assert [row[0] for row in rows] == [shared]


async def test_a_picture_described_during_another_members_forget_is_kept(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Bob's description of a picture only Alice had sent is still running when Alice's /forget removes
    it; once Bob's card is stored the picture is on disk again, so his Re-describe works."""
    server = discord_server
    settings = settings_for(server)
    async with running_i2p2i(settings, server, engine) as bot:
        await describe(server, astronaut, user="alice")
        (alices,) = await bot.store.recent_interrogations(server.user("alice").id)
        path = settings.data_path / "sources" / f"{alices.source_sha256}.png"
        assert path.exists()
        with gpu_blocked(bot):
            upload = server.add_attachment(png_bytes(astronaut), "photo.png")
            bobs = await server.push_slash(
                "imagine-from", {"image": upload, "count": 1, "mode": "fast"}, user="bob"
            )
            # Bob's interrogation waits behind the block (asyncio.sleep(0, x) is an awaitable of x).
            await eventually(lambda: asyncio.sleep(0, bot.gpu.pending()), lambda n: n >= 1, 30)
            forget = await server.push_slash("forget")
            await forget.wait_response()
            asked = forget.original
            assert asked is not None
            confirm = await server.push_button(asked, next(c for c in asked.custom_ids() if c))
            assert "1 uploaded picture(s)" in (await confirm.wait_response()).json["data"]["content"]
            assert not path.exists()
        await bobs.wait_followup(timeout_s=60)
        assert path.exists()
        card = bobs.original
        assert card is not None
        await server.push_select(card, button(card, "i2p:card:mode:"), ["best"], user="bob")
        await server.wait_until(
            lambda: "Prompt · best" in str(server.message(card.id).embeds) or None, timeout_s=60
        )


async def test_queue_position_and_throttled_progress(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """A waiting job shows its place at once; progress edits on one message are at least 1.5 s apart."""
    server = discord_server
    async with running_i2p2i(settings_for(server, max_batch_images=1), server, engine) as bot:
        _, alice_card = await describe(server, astronaut, user="alice", count=2)
        _, bob_card = await describe(server, astronaut, user="bob", count=1)
        with gpu_blocked(bot):
            first = await generate(server, alice_card, user="alice")
            second = await generate(server, bob_card, user="bob")
            position = bot.queue.position(2)
            assert position is not None
            ahead = position.images_ahead
            assert ahead >= 1
            assert f"Job #2 is queued: {ahead} image{'s' * (ahead != 1)} ahead" in second.original.content
            await asyncio.sleep(2)  # progress edits pile up while the GPU is held
        await server.wait_until(lambda: second.original.attachments or None, timeout_s=60)
        progress_edits = 0
        for handle in (first, second):
            edits = [
                c
                for c in server.calls(route=EDIT_FOLLOWUP)
                if c.params.get("token") == handle.token and not c.files and c.status == 200
            ]
            times = [c.at for c in edits]
            progress_edits += len(times)
            assert all(b - a >= 1.45 for a, b in itertools.pairwise(times)), times
        assert progress_edits >= 3  # the throttle had edits to space out


async def test_flagged_images_are_withheld(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Images the safety checker flags are never posted; the result says how many were withheld."""
    server = discord_server
    with flagging_everything(engine.generator.pipe):
        async with running_i2p2i(settings_for(server), server, engine) as bot:
            _, card = await describe(server, astronaut, count=2)
            press = await generate(server, card)
            await server.wait_until(lambda: "done" in press.original.content or None, timeout_s=60)
            assert press.original.attachments == []
            assert "2 image(s) withheld" in str(press.original.embeds[0])
            record = await bot.store.job_record(1)
            assert record is not None and [m.nsfw for m in record.images] == [True, True]


async def test_candidates_card_and_redescribe(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """A candidates card scores each prompt and offers Use #k; Re-describe redoes the card in place."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut, mode="candidates")
        fields = card.embeds[0]["fields"]
        heads = [f["name"].split(" · ")[0] for f in fields[:3]]
        assert [h[:2] for h in heads] == ["#1", "#2", "#3"]
        assert sorted(h.split()[1] for h in heads) == ["best", "classic", "fast"]
        scores = [float(f["name"].rsplit("CLIP ", 1)[1]) for f in fields[:3]]
        assert scores == sorted(scores, reverse=True)
        use2 = button(card, "i2p:card:use:")
        assert use2.endswith(":1")
        press = await server.push_button(card, use2.removesuffix(":1") + ":2")
        await press.wait_followup(timeout_s=30)
        stored = await bot.store.get_interrogation(1)
        assert stored is not None
        positives = [c for c in stored.interrogation.candidates if c.mode != "negative"]
        await server.wait_until(lambda: cast(StoredMessage, press.original).attachments or None, timeout_s=60)
        job = await bot.store.get_job(1)
        assert job is not None and job.request.prompt == positives[1].prompt
        select_id = button(card, "i2p:card:mode:")
        redo = await server.push_select(card, select_id, ["fast"])
        await server.wait_until(
            lambda: "Prompt · fast" in str(server.message(card.id).embeds) or None, timeout_s=30
        )
        assert redo.callbacks()[0].json["type"] == 6


def embed_fields(message) -> dict[str, str]:
    """A card's embed fields, by name."""
    return {f["name"]: f["value"] for f in message.embeds[0].get("fields", [])}


def described_with(engine: Engine) -> dict[str, str]:
    return {k: v for k, v in engine.models.items() if k != "generator"}


async def test_apply_negative_works_the_suggestion_out_once_and_holds_after_a_restart(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Apply negative on a best card works its suggestion out on the GPU and shows it applied; after a
    restart Edit prefills it and Generate makes it the job's negative prompt. Remove negative puts the
    server's default back, and applying again needs no GPU."""
    server = discord_server
    settings = settings_for(server)
    alice = server.user("alice").id
    async with running_i2p2i(settings, server, engine) as bot:
        _, card = await describe(server, astronaut)
        assert embed_fields(card)["Negative prompt · the server's default"] == "none"
        assert not any(name.startswith("Negative suggestion") for name in embed_fields(card))
        assert card.component(button(card, "i2p:card:neg:"))["label"] == "Apply negative"

        apply = await server.push_button(card, button(card, "i2p:card:neg:"))
        assert (await apply.wait_response()).json["type"] == 6
        await server.wait_until(
            lambda: "Negative prompt · suggestion applied" in embed_fields(server.message(card.id)) or None,
            timeout_s=30,
        )
        stored = await bot.store.get_interrogation(1)
        assert stored is not None
        found = await bot.store.find_interrogation(stored.source_sha256, "negative", described_with(engine))
        assert found is not None and found[1].negative
        suggestion = found[1].negative
        assert (await bot.store.card_choices(1)).negative_prompt == suggestion
        assert suggestion in embed_fields(card)["Negative prompt · suggestion applied"]
        assert [i.id for i in await bot.store.recent_interrogations(alice)] == [1]
        assert not any(c.startswith("i2p:card:neg:") for c in card.custom_ids())
        assert card.component(button(card, "i2p:card:noneg:"))["label"] == "Remove negative"

    async with running_i2p2i(settings, server, engine) as bot:
        edit = await server.push_button(card, button(card, "i2p:card:edit:"))
        await edit.wait_response()
        assert edit.modal is not None
        fields = {c["components"][0]["label"]: c["components"][0] for c in edit.modal["components"]}
        assert fields["Negative prompt"]["value"] == suggestion
        await generate(server, card)
        first = await bot.store.get_job(1)
        assert first is not None and first.request.negative_prompt == suggestion

        remove = await server.push_button(card, button(card, "i2p:card:noneg:"))
        assert (await remove.wait_response()).json["type"] == 7
        shown = embed_fields(server.message(card.id))
        assert shown["Negative prompt · the server's default"] == "none"
        assert suggestion in shown["Negative suggestion · Apply negative uses it"]
        assert (await bot.store.card_choices(1)).negative_prompt is None
        await generate(server, card)
        second = await bot.store.get_job(2)
        assert second is not None and second.request.negative_prompt == ""

        again = await server.push_button(card, button(card, "i2p:card:neg:"))
        assert (await again.wait_response()).json["type"] == 7
        assert (await bot.store.card_choices(1)).negative_prompt == suggestion
        await bot.queue.join()


async def test_more_prompts_lists_what_a_best_card_scored(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """More prompts turns a best card into its prompts with their CLIP scores and Use #k, at once and with
    nothing described again; the list stays after a restart, and Use #k makes that prompt."""
    server = discord_server
    settings = settings_for(server)
    async with running_i2p2i(settings, server, engine) as bot:
        _, card = await describe(server, astronaut)
        stored = await bot.store.get_interrogation(1)
        assert stored is not None
        ranked = stored.interrogation.ranked
        assert len(ranked) > 1 and ranked[0].prompt in card.embeds[0]["description"]
        assert not any(c.startswith("i2p:card:use:") for c in card.custom_ids())
        more_id = button(card, "i2p:card:more:")
        assert card.component(more_id)["label"] == f"More prompts ({len(ranked) - 1})"
        described = await bot.store._fetchall("SELECT COUNT(*) FROM interrogation_results")

        more = await server.push_button(card, more_id)
        assert (await more.wait_response()).json["type"] == 7
        listed = [(name, value) for name, value in embed_fields(card).items() if name.startswith("#")]
        assert [name for name, _ in listed] == [
            f"#{k} {c.mode} · CLIP {c.score:.3f}" for k, c in enumerate(ranked, start=1)
        ]
        assert all(c.prompt in value for c, (_, value) in zip(ranked, listed, strict=True))
        uses = [c for c in card.custom_ids() if c.startswith("i2p:card:use:")]
        assert uses == [f"i2p:card:use:1:1:{k}" for k in range(1, len(ranked) + 1)]
        assert not any(c.startswith("i2p:card:more:") for c in card.custom_ids())
        assert await bot.store._fetchall("SELECT COUNT(*) FROM interrogation_results") == described
        assert (await bot.store.card_choices(1)).all_prompts

    async with running_i2p2i(settings, server, engine) as bot:
        apply = await server.push_button(card, button(card, "i2p:card:neg:"))
        await apply.wait_response()
        await server.wait_until(
            lambda: "Negative prompt · suggestion applied" in embed_fields(server.message(card.id)) or None,
            timeout_s=30,
        )
        assert [n for n in embed_fields(card) if n.startswith("#")] == [name for name, _ in listed]
        press = await server.push_button(card, uses[-1])
        await press.wait_followup(timeout_s=30)
        job = await bot.store.get_job(1)
        assert job is not None and job.request.prompt == ranked[-1].prompt
        await bot.queue.join()


async def test_a_candidates_card_applies_its_own_suggestion_and_redescribe_keeps_it(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """A candidates card shows its negative suggestion and applies it in place; Re-describe keeps it applied
    on the new card, whose Generate uses it."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut, mode="candidates")
        stored = await bot.store.get_interrogation(1)
        assert stored is not None and stored.interrogation.negative
        suggestion = stored.interrogation.negative
        assert suggestion in embed_fields(card)["Negative suggestion · Apply negative uses it"]
        apply = await server.push_button(card, button(card, "i2p:card:neg:"))
        assert (await apply.wait_response()).json["type"] == 7
        assert suggestion in embed_fields(card)["Negative prompt · suggestion applied"]

        redo = await server.push_select(card, button(card, "i2p:card:mode:"), ["fast"])
        await redo.wait_response()
        await server.wait_until(
            lambda: "Prompt · fast" in str(server.message(card.id).embeds) or None, timeout_s=30
        )
        assert "i2p:card:noneg:2:1" in card.custom_ids()
        assert suggestion in embed_fields(card)["Negative prompt · suggestion applied"]
        assert (await bot.store.card_choices(2)).negative_prompt == suggestion
        await generate(server, card)
        job = await bot.store.get_job(1)
        assert job is not None and job.interrogation_id == 2 and job.request.negative_prompt == suggestion
        await bot.queue.join()


async def test_an_applied_negative_suggestion_meets_the_same_cap_as_a_typed_one(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """A suggestion longer than a negative prompt may be is refused on Apply with the sentence a typed one
    gets, and the card keeps the server's negative prompt."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut, mode="candidates")
        long = "blurry, " * 600
        await bot.store._execute("UPDATE interrogation_results SET negative = ?", (long,))
        apply = await server.push_button(card, button(card, "i2p:card:neg:"))
        said = await ephemeral_answer(apply)
        assert said == f"The negative prompt is {len(long)} characters; the limit is 4000."
        assert (await bot.store.card_choices(1)).negative_prompt is None


@pytest.mark.parametrize("all_prompts", [False, True])
@pytest.mark.parametrize("applied", [False, True])
def test_a_card_of_the_longest_prompts_fits_discords_limits(all_prompts: bool, applied: bool) -> None:
    """However long its prompts, suggestion and the server's default, and however large its id and count,
    a card's embed and buttons stay within Discord's limits."""
    longest = "word, " * 700
    stored = StoredInterrogation(
        id=2**63 - 1,
        result_id=1,
        user_id=1,
        guild_id=None,
        channel_id=None,
        source_sha256="0" * 64,
        cached=False,
        created_at=0.0,
        interrogation=Interrogation(
            mode="best",
            prompt=longest + "best",
            score=0.3,
            caption=longest,
            negative=None,
            candidates=tuple(
                Candidate(mode, longest + mode, 0.1) for mode in ("caption", "classic", "fast", "best")
            ),
            image_embedding=(1.0,),
        ),
    )
    choices = CardChoices(negative_prompt=longest if applied else None, all_prompts=all_prompts)
    embed = prompt_card(
        stored,
        "x" * 32,
        choices=choices,
        suggestion=longest,
        default_negative=longest,
        banned=["banned"] * 20,
    )
    view = card_view(stored, 64, choices, blocked=True)
    body = {"embeds": [embed.to_dict()], "components": view.to_components()}
    check_message(body, [], upload_limit_bytes=10 * 1024 * 1024, creating=True)
    assert len([f for f in embed.fields if f.name and f.name.startswith("#")]) == (4 if all_prompts else 0)


async def test_missing_token_exits_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bot.py without DISCORD_TOKEN stops with exit code 2 and one line."""
    import bot as entry

    monkey = pytest.MonkeyPatch()
    monkey.delenv("DISCORD_TOKEN", raising=False)
    try:
        assert entry.main([]) == 2
    finally:
        monkey.undo()
    out = capsys.readouterr().err.strip().splitlines()
    assert out == ["bot.py: DISCORD_TOKEN is not set; put the bot's token in that environment variable"]


async def test_admin_commands(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Members cannot use /admin; the application owner and admin-role members can pause, list and cancel."""
    server = discord_server
    settings = settings_for(server)
    moderator_role = server.role("Moderator").id
    settings = dataclasses.replace(
        settings, discord=dataclasses.replace(settings.discord, admin_role_ids=[moderator_role])
    )
    async with running_i2p2i(settings, server, engine) as bot:
        refused = await server.push_slash("admin pause", user="alice")
        assert "Only the bot's owner" in await ephemeral_answer(refused)
        assert not bot.queue.paused
        paused = await server.push_slash("admin pause", user="owner")
        assert "Paused" in await ephemeral_answer(paused)
        assert bot.queue.paused
        _, card = await describe(server, astronaut)
        await generate(server, card)
        listing = await server.push_slash("admin queue", user="mod")
        data = (await listing.wait_response()).json["data"]
        assert "paused" in data["content"] and "Job #1" in data["embeds"][0]["description"]
        cancel = await server.push_slash("admin cancel", {"job_id": 1}, user="mod")
        assert "Cancelled job #1" in await ephemeral_answer(cancel)
        resumed = await server.push_slash("admin resume", user="owner")
        assert "Resumed" in await ephemeral_answer(resumed)
        assert (await bot.store.get_job(1)).status == "cancelled"


async def test_job_queued_before_a_restart_is_delivered_after(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """A job still queued when the bot stops is run and delivered by the next start, exactly once."""
    server = discord_server
    settings = settings_for(server, stop_grace_s=0.2)
    async with running_i2p2i(settings, server, engine) as bot:
        _, card = await describe(server, astronaut)
        with gpu_blocked(bot):
            press = await generate(server, card)
            await bot.close()
    async with running_i2p2i(settings, server, engine) as bot:
        await server.wait_until(lambda: press.original.attachments or None, timeout_s=60)
        job = await eventually(lambda: bot.store.get_job(1), lambda j: j.delivered_at is not None)
        assert job.status == "complete"
        record = await bot.store.job_record(1)
        assert record is not None and sorted(m.index for m in record.images) == [0]
        results = [c for c in server.calls(route=EDIT_FOLLOWUP) if c.files]
        assert len(results) == 1


async def test_rejected_token_exits_with_one_line(discord_server: FakeDiscord, tmp_path: Path) -> None:
    """bot.py with a token Discord refuses stops with exit code 2 and one line, before loading models."""
    server = discord_server
    config = tmp_path / "bot.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[discord]\napi_base = "{server.api_base}"\n'
        f'gateway_url = "{server.gateway_url}"\n',
        encoding="utf-8",
    )
    env = {**os.environ, "DISCORD_TOKEN": "not-the-right-token", "HF_HUB_OFFLINE": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bot.py"), "--config", str(config),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 2
    lines = [line for line in err.decode().splitlines() if line.startswith("bot.py:")]
    assert lines == ["bot.py: Discord rejected the token in DISCORD_TOKEN; check it in the Developer Portal"]
    assert "Traceback" not in err.decode()


async def test_undeliverable_job_stays_undelivered(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Token expired, channel deleted and DMs closed: the job is kept as undelivered, not lost."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        with gpu_blocked(bot):
            press = await generate(server, card)
            press.expire()
            await server.delete_channel("general")
            server.block_dms("alice")
        await server.wait_for(route="POST /channels/{channel}/messages", predicate=lambda c: c.status == 403,
                              timeout_s=30)  # fmt: skip
        await asyncio.sleep(0.2)
        job = await bot.store.get_job(1)
        assert job is not None and job.status == "complete" and job.delivered_at is None
        assert [j.id for j in await bot.store.undelivered_jobs()] == [1]


async def test_context_menu_with_several_images_offers_a_choice(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """A message with two images gets a private picker; the picked image becomes the card."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        first = server.add_attachment(png_bytes(astronaut), "astro.png", ephemeral=False)
        second = server.add_attachment(png_bytes(astronaut.rotate(90)), "turned.png", ephemeral=False)
        posted = await server.post_user_message("general", "bob", "two", attachments=[first, second])
        handle = await server.push_message_command("Imagine from image", posted)
        answer = (await handle.wait_response()).json["data"]
        assert answer["flags"] & 64 and "Which image" in answer["content"]
        picker = handle.original
        assert picker is not None
        select_id = picker.custom_ids()[0]
        pick = await server.push_select(picker, select_id, ["1"])
        await pick.wait_followup(timeout_s=60)
        stored = await bot.store.get_interrogation(1)
        assert stored is not None
        turned = hashlib.sha256(png_bytes(astronaut.rotate(90))).hexdigest()
        assert stored.source_sha256 == turned
        card = pick.original
        assert card is not None and card.embeds[0]["title"].startswith("Prompt")


async def test_commands_sync_only_when_changed(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
) -> None:
    """A restart with the same commands does not sync again."""
    server = discord_server
    settings = settings_for(server)
    async with running_i2p2i(settings, server, engine):
        pass
    async with running_i2p2i(settings, server, engine):
        pass
    assert len(server.calls(route="PUT /applications/{app}/commands")) == 1


async def test_missing_models_stop_the_bot_with_one_line(discord_server: FakeDiscord, tmp_path: Path) -> None:
    """Models that are not there stop bot.py with exit code 2 and a line naming them and how to get them."""
    server = discord_server
    config = tmp_path / "bot.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[models]\ndevice = "cpu"\n'
        f'[discord]\napi_base = "{server.api_base}"\ngateway_url = "{server.gateway_url}"\n',
        encoding="utf-8",
    )
    env = {**os.environ, "DISCORD_TOKEN": server.token, "HF_HOME": str(tmp_path / "empty-hf-cache")}
    env.pop("HF_HUB_OFFLINE", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bot.py"), "--config", str(config),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 2
    lines = [line for line in err.decode().splitlines() if line.startswith("bot.py:")]
    assert len(lines) == 1 and lines[0].startswith("bot.py: Not downloaded: Stable Diffusion")
    assert "CLIP" in lines[0] and "BLIP" in lines[0] and lines[0].endswith("run `i2p2i download-models`")
    assert "Traceback" not in err.decode()


@pytest.mark.parametrize("damage", ["newer schema", "not a database"])
async def test_an_unusable_database_stops_the_bot_with_one_line(
    discord_server: FakeDiscord, tmp_path: Path, damage: str
) -> None:
    """A database from a newer version, or a file that is no database, stops bot.py with one line."""
    import sqlite3

    server = discord_server
    data = tmp_path / "data"
    data.mkdir()
    database = data / "i2p2i.sqlite3"
    if damage == "newer schema":
        with contextlib.closing(sqlite3.connect(database)) as db:
            db.execute("PRAGMA user_version = 99")
    else:
        database.write_bytes(b"this is not a database, it only has its name" * 100)
    before = database.read_bytes()
    config = tmp_path / "bot.toml"
    config.write_text(
        f'data_dir = "{data}"\n'
        f'[discord]\napi_base = "{server.api_base}"\ngateway_url = "{server.gateway_url}"\n',
        encoding="utf-8",
    )
    env = {**os.environ, "DISCORD_TOKEN": server.token, "HF_HUB_OFFLINE": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "bot.py"), "--config", str(config), "--models", "smoke",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 2
    lines = [line for line in err.decode().splitlines() if line.startswith("bot.py:")]
    assert len(lines) == 1 and f"the database {database} cannot be used" in lines[0], err.decode()
    assert "Traceback" not in err.decode()
    if damage == "newer schema":  # refused, not migrated
        with contextlib.closing(sqlite3.connect(database)) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (99,)
            assert db.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    else:
        assert database.read_bytes() == before


async def test_delete_works_on_a_result_posted_in_the_channel(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Delete on a result the bot posted itself (after the token expired) removes that message."""
    server = discord_server
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        with gpu_blocked(bot):
            press = await generate(server, card)
            press.expire()
        posted = await server.wait_for(route="POST /channels/{channel}/messages", timeout_s=30)
        message = server.message(int(posted.response["id"]))
        delete = await server.push_button(message, "i2p:job:delete:1")
        await delete.wait_response()
        await server.wait_until(lambda: server.message(message.id).deleted or None, timeout_s=10)


async def test_delete_hides_the_job_from_everyone_but_admins(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """Delete removes the result's message and image files and says so; the job leaves its owner's
    /history and /job, admins still see it marked hidden, and pressing Delete again changes nothing."""
    server = discord_server
    settings = settings_for(server)
    async with running_i2p2i(settings, server, engine) as bot:
        _, card = await describe(server, astronaut, count=2)
        press = await generate(server, card)
        await server.wait_until(lambda: cast(StoredMessage, press.original).attachments or None, timeout_s=60)
        await eventually(lambda: bot.store.get_job(1), lambda job: job.delivered_at is not None)
        result = press.original
        assert result is not None
        folder = settings.data_path / "images" / "1"
        assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png"]
        earlier = await server.push_slash("job", {"job_id": 1})
        await earlier.wait_response()
        kept_reply = earlier.original
        assert kept_reply is not None and "i2p:job:delete:1" in kept_reply.custom_ids()

        delete = await server.push_button(result, "i2p:job:delete:1")
        said = await ephemeral_answer(delete)
        assert said == (
            "Deleted job #1: its message and image files are gone, and only admins can still see it in "
            "/history or /job."
        )
        assert server.message(result.id).deleted
        assert not folder.exists()
        job = await bot.store.get_job(1)
        assert job is not None and job.hidden_by == server.user("alice").id and job.hidden_at is not None
        record = await bot.store.job_record(1)
        assert record is not None and len(record.images) == 2  # seeds and hashes stay, for admins

        history = await server.push_slash("history")
        data = (await history.wait_response()).json["data"]
        assert "Job #1" not in data["embeds"][0]["description"]  # only the card is left
        assert await ephemeral_answer(await server.push_slash("job", {"job_id": 1})) == "Job #1 was deleted."
        info = await server.push_button(kept_reply, "i2p:job:info:1")
        assert await ephemeral_answer(info) == "Job #1 was deleted."

        admin_view = await server.push_slash("job", {"job_id": 1}, user="owner")
        embed = (await admin_view.wait_response()).json["data"]["embeds"][0]
        assert embed["title"] == "Job #1 · complete · hidden"
        hidden = next(f["value"] for f in embed["fields"] if f["name"] == "Hidden")
        assert hidden.startswith(f"Deleted by <@{server.user('alice').id}> <t:")

        # Delete again, from the /job reply Alice had opened before: the same sentence, the same row.
        again = await server.push_button(kept_reply, "i2p:job:delete:1")
        assert await ephemeral_answer(again) == said
        assert await bot.store.get_job(1) == job
        assert server.message(kept_reply.id).deleted


async def test_a_gpu_fault_mid_job_is_explained_and_the_restart_delivers(
    discord_server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The UNet hits a CUDA error under a member's job: its message says the images come after the
    restart, the bot stops with EXIT_GPU_LOST, and the next start makes and posts them (one attempt)."""
    monkeypatch.setattr(app, "GPU_WATCH_INTERVAL_S", 0.05)
    server = discord_server
    settings = settings_for(server)
    unet = engine.generator.pipe.unet

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    async with running_i2p2i(settings, server, engine) as bot:
        _, card = await describe(server, astronaut)
        monkeypatch.setitem(vars(unet), "forward", broken)
        press = await generate(server, card)
        await server.wait_until(lambda: bot.is_closed() or None, timeout_s=60)
        assert bot.exit_code == app.EXIT_GPU_LOST
    store = await Store.from_settings(settings)
    try:
        held = await store.get_job(1)
    finally:
        await store.close()
    assert held is not None and (held.status, held.attempts) == ("running", 0)
    assert press.original.content == (
        "⏸️ Job #1: the GPU failed while making these images; they will be made once the bot has restarted."
    )
    monkeypatch.delitem(vars(unet), "forward")
    async with running_i2p2i(settings, server, engine) as bot:
        await server.wait_until(lambda: press.original.attachments or None, timeout_s=60)
        job = await eventually(lambda: bot.store.get_job(1), lambda j: j.delivered_at is not None)
        assert (job.status, job.attempts, job.error) == ("complete", 1, None)
        results = [c for c in server.calls(route=EDIT_FOLLOWUP) if c.files]
        assert len(results) == 1
