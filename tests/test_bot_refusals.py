"""What a member is refused, or told went wrong, stays between the bot and that member.

Discord shows the first follow-up after a public "thinking…" deferral in the channel, whatever its flags say
(the loopback Discord does the same), so refusals are made before anything public is said, and an error
after a public deferral turns the placeholder into a neutral line and tells the member privately.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image

from i2p2i_bot.config import Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.replies import WITHDRAWN
from tests.bot_harness import png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord
from tests.discord_fake.interactions import CHANNEL_MESSAGE, InteractionHandle
from tests.test_bot import button, describe, ephemeral_answer, gpu_blocked

CALLBACK = "POST /interactions/{interaction}/{token}/callback"


def public_texts(server: FakeDiscord) -> list[str]:
    """The text of every message the channel can see."""
    return [m.content for m in server.messages_in("general", include_ephemeral=False) if not m.deleted]


async def imagine(server: FakeDiscord, prompt: str, *, user: str = "alice") -> InteractionHandle:
    return await server.push_slash("imagine", {"prompt": prompt, "count": 1}, user=user)


@pytest.mark.parametrize(
    ("limits", "first_by", "closing", "said"),
    [
        (
            {"max_queued_jobs_per_user": 1},
            "alice",
            False,
            "You already have 1 job queued, the most allowed; wait for one to finish or cancel one.",
        ),
        ({"max_queued_jobs": 1}, "bob", False, "The queue is full (1 job); try again in a few minutes."),
        ({}, None, True, "The bot is shutting down and takes no new jobs; try again in a minute."),
    ],
)
async def test_queue_refusals_come_before_anything_public(
    server: FakeDiscord,
    settings_for: Callable[..., Settings],
    engine: Engine,
    limits: dict[str, int],
    first_by: str | None,
    closing: bool,
    said: str,
) -> None:
    """A member over their cap, a full queue or a bot shutting down: the refusal is the interaction's first
    answer, seen by the member alone, and no job is stored."""
    async with running_i2p2i(settings_for(server, **limits), server, engine) as bot:
        with gpu_blocked(bot):
            if first_by is not None:
                await (await imagine(server, "a red kite", user=first_by)).wait_followup(timeout_s=30)
            if closing:
                bot.queue.close()
            refused = await imagine(server, "a blue kite")
            assert await ephemeral_answer(refused) == said
            assert refused.response_type == CHANNEL_MESSAGE  # no public "thinking…" first
            assert said not in public_texts(server)
            assert await bot.store.get_job(2 if first_by else 1) is None


async def test_a_card_gone_before_its_modal_is_sent_is_refused_privately(
    server: FakeDiscord, settings_for: Callable[..., Settings], engine: Engine, astronaut: Image.Image
) -> None:
    """Edit prompt opened on a card the member then forgot: submitting says so privately, typed prompt and
    all, and queues nothing."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        edit = await server.push_button(card, button(card, "i2p:card:edit:"))
        await edit.wait_response()
        await bot.queue.forget(server.user("alice").id)
        submit = await server.push_modal_submit(edit, {"Prompt": "my careful prompt"})
        text = await ephemeral_answer(submit)
        assert text.startswith("The prompt card this came from no longer exists; describe the image again.")
        assert "my careful prompt" in text
        assert submit.response_type == CHANNEL_MESSAGE
        assert await bot.store.get_job(1) is None


async def test_a_refusal_that_races_the_deferral_is_told_privately(
    server: FakeDiscord, settings_for: Callable[..., Settings], engine: Engine
) -> None:
    """Two /imagine at once from a member allowed one job: both pass the check before their public
    deferral, one is queued, and the other's placeholder becomes a neutral line while the reason is told to
    the member alone."""
    async with running_i2p2i(settings_for(server, max_queued_jobs_per_user=1), server, engine) as bot:
        held = server.hold_next(CALLBACK, times=2)
        with gpu_blocked(bot):
            first, second = await imagine(server, "a red kite"), await imagine(server, "a blue kite")
            await server.wait_until(lambda: len(held.hits) == 2 or None, timeout_s=30)
            held.release()
            await first.wait_followup(timeout_s=30)
            await second.wait_followup(timeout_s=30)
            [loser] = [
                h for h in (first, second) if h.original is not None and h.original.content == WITHDRAWN
            ]
            [winner] = [h for h in (first, second) if h is not loser]
            assert await ephemeral_answer(loser) == (
                "You already have 1 job queued, the most allowed; wait for one to finish or cancel one."
            )
            assert loser.original is not None and not loser.original.ephemeral
            assert winner.original is not None and "#1" in winner.original.content
            assert await bot.store.get_job(2) is None


async def test_an_unexpected_error_after_describing_began_is_told_privately(
    server: FakeDiscord,
    settings_for: Callable[..., Settings],
    engine: Engine,
    astronaut: Image.Image,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug after /imagine-from deferred in public: the channel sees a neutral line, the member an id."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:

        async def broken(*args: Any, **kwargs: Any) -> bytes:
            raise RuntimeError("internal-detail-5c1e")

        monkeypatch.setattr(bot.get_cog("Imagine"), "download", broken)
        handle, _ = await describe(server, astronaut)
        text = await ephemeral_answer(handle)
        assert text.startswith("Sorry, something went wrong on my side (error id")
        assert public_texts(server) == [WITHDRAWN]
        assert handle.original is not None and handle.original.content == WITHDRAWN


async def test_ids_past_sqlites_integers_are_no_such_job_or_card(
    server: FakeDiscord, settings_for: Callable[..., Settings], engine: Engine, astronaut: Image.Image
) -> None:
    """A button whose custom id names a card or job past SQLite's integers (a modified client), or /job with
    such a number, gets the sentence for one that does not exist, not an internal error."""
    huge = 2**63
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        generate = button(card, "i2p:card:gen:")
        edit = button(card, "i2p:card:edit:")
        forged_card = generate.replace(f":{generate.split(':')[3]}:", f":{huge}:")
        forged_job = f"i2p:job:reroll:{huge}"
        for real, forged in ((generate, forged_card), (edit, forged_job)):
            component = card.component(real)
            assert component is not None
            component["custom_id"] = forged
        said = [
            await ephemeral_answer(await server.push_button(card, forged_card)),
            await ephemeral_answer(await server.push_button(card, forged_job)),
            await ephemeral_answer(await server.push_slash("job", {"job_id": huge})),
        ]
        assert said == [
            "That card's history was deleted; run /imagine-from again.",
            f"Job #{huge} no longer exists (its history may have been deleted).",
            f"There is no job #{huge}.",
        ]
        assert await bot.store.get_job(1) is None


@pytest.mark.parametrize(
    ("count", "seed", "said"),
    [
        ("²", "", "Images must be a whole number; you typed “²”."),
        ("1", "１２", "The seed must be a whole number; you typed “１２”."),
        ("1", "4²", "The seed must be a whole number; you typed “4²”."),
    ],
)
async def test_digits_other_than_0_to_9_are_not_a_whole_number(
    server: FakeDiscord,
    settings_for: Callable[..., Settings],
    engine: Engine,
    astronaut: Image.Image,
    count: str,
    seed: str,
    said: str,
) -> None:
    """A superscript or fullwidth digit in the edit modal's count or seed gets the field's own sentence, with
    the typed prompt given back, and queues nothing."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        edit = await server.push_button(card, button(card, "i2p:card:edit:"))
        await edit.wait_response()
        typed = {"Prompt": "my careful prompt", "Images (1–8)": count, "Seed (blank for random)": seed}
        text = await ephemeral_answer(await server.push_modal_submit(edit, typed))
        assert text.startswith(said) and "my careful prompt" in text
        assert await bot.store.get_job(1) is None


async def test_a_forged_pick_of_an_image_is_refused_in_one_sentence(
    server: FakeDiscord, settings_for: Callable[..., Settings], engine: Engine, astronaut: Image.Image
) -> None:
    """The picker of a message's images answered with a value it never offered (a modified client) says so
    privately, and describes nothing."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        files = [server.add_attachment(png_bytes(astronaut), f"{n}.png", ephemeral=False) for n in "ab"]
        posted = await server.post_user_message("general", "bob", "two", attachments=files)
        handle = await server.push_message_command("Imagine from image", posted)
        await handle.wait_response()
        picker = handle.original
        assert picker is not None
        for value in ("2", "１", "-1"):
            pick = await server.push_select(picker, picker.custom_ids()[0], [value])
            assert await ephemeral_answer(pick) == "Choose one of the images listed."
        assert await bot.store.get_interrogation(1) is None
