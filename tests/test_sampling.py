"""Per-request settings: steps, guidance, aspect ratio and scheduler on /imagine, /imagine-from and a card's
Settings button, checked by the one validator, kept by Reroll."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path
from typing import cast

import pytest
from PIL import Image

from i2p2i_bot.config import GenerateSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.guides import Guide
from i2p2i_bot.request import GenerationError, size_for_aspect
from tests.bot_harness import bot_settings, png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord, StoredMessage
from tests.test_bot import button, ephemeral_answer

SD = GenerateSettings(width=512, height=512, min_side=256, max_side=768)


@pytest.mark.parametrize(
    ("aspect", "size"),
    [
        ("1:1", (512, 512)),
        ("3:2", (768, 512)),
        ("2:3", (512, 768)),
        ("16:9", (768, 432)),
        ("9:16", (432, 768)),
    ],
)
def test_aspect_ratios_keep_the_short_side_and_fit_the_largest(aspect: str, size: tuple[int, int]) -> None:
    assert size_for_aspect(aspect, SD) == size


def test_an_unknown_aspect_ratio_is_one_sentence() -> None:
    with pytest.raises(GenerationError) as info:
        size_for_aspect("4:3", SD)
    assert str(info.value) == "The aspect ratio must be one of 1:1, 3:2, 2:3, 16:9, 9:16 (got “4:3”)."


@pytest.fixture
def settings(base_settings: Settings, tmp_path: Path, discord_server: FakeDiscord) -> Settings:
    return bot_settings(base_settings, tmp_path / "data", discord_server)


def job_row(bot, job_id: int) -> tuple:
    db = sqlite3.connect(bot.settings.data_path / "i2p2i.sqlite3")
    try:
        row = db.execute(
            "SELECT count, steps, guidance, width, height, scheduler FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
    finally:
        db.close()
    return tuple(row) if row else ()


async def test_imagine_takes_steps_guidance_aspect_and_scheduler(
    discord_server: FakeDiscord, settings: Settings, engine: Engine
) -> None:
    server = discord_server
    async with running_i2p2i(settings, server, engine) as bot:
        too_many = await server.push_slash("imagine", {"prompt": "a kite", "steps": 101})
        assert await ephemeral_answer(too_many) == "Steps must be between 1 and 100 (got 101)."
        assert await bot.store.get_job(1) is None

        options = {
            "prompt": "a kite",
            "count": 1,
            "steps": 2,
            "guidance": 3.5,
            "aspect": "3:2",
            "scheduler": "pndm",
        }
        handle = await server.push_slash("imagine", options)
        await handle.wait_followup(timeout_s=30)
        await server.wait_until(
            lambda: cast(StoredMessage, handle.original).attachments or None, timeout_s=30
        )
        # The smoke settings' 64×64 default, 3:2 on its short side.
        assert job_row(bot, 1) == (1, 2, 3.5, 96, 64, "pndm")
        posted = cast(StoredMessage, handle.original).attachments[0]
        assert Image.open(io.BytesIO(posted.data)).size == (96, 64)

        reroll = await server.push_button(cast(StoredMessage, handle.original), "i2p:job:reroll:1")
        await reroll.wait_followup(timeout_s=30)
        assert job_row(bot, 2) == job_row(bot, 1)
        await bot.queue.join()


async def test_a_cards_settings_come_from_imagine_from_and_its_settings_button(
    discord_server: FakeDiscord, settings: Settings, engine: Engine, astronaut: Image.Image
) -> None:
    server = discord_server
    async with running_i2p2i(settings, server, engine) as bot:
        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        options = {"image": upload, "count": 1, "steps": 2, "aspect": "9:16"}
        handle = await server.push_slash("imagine-from", options)
        await handle.wait_followup(timeout_s=60)
        card = cast(StoredMessage, handle.original)
        fields = {f["name"]: f["value"] for f in card.embeds[0]["fields"]}
        assert fields["Settings · yours"] == "2 steps · aspect 9:16 (the rest: the server's defaults)"

        press = await server.push_button(card, button(card, "i2p:card:set:"))
        await press.wait_response()
        assert press.modal is not None
        defaults = {
            c["components"][0]["label"]: c["components"][0].get("value") for c in press.modal["components"]
        }
        assert defaults == {
            "Images (1–8)": "1",
            "Steps (1–100)": "2",
            "Guidance, CFG (0–30)": "7.5",
            "Aspect ratio (1:1, 3:2, 2:3, 16:9, 9:16)": "9:16",
            "Scheduler (dpm or pndm)": "dpm",
        }
        bad = await server.push_modal_submit(press, {"Guidance, CFG (0–30)": "lots"})
        assert await ephemeral_answer(bad) == "Guidance must be a number like 7.5; you typed “lots”."
        outside = await server.push_modal_submit(press, {"Guidance, CFG (0–30)": "31"})
        assert await ephemeral_answer(outside) == "Guidance must be between 0 and 30 (got 31)."

        values = {
            "Images (1–8)": "2",
            "Steps (1–100)": "3",
            "Guidance, CFG (0–30)": "4",
            "Aspect ratio (1:1, 3:2, 2:3, 16:9, 9:16)": "",
            "Scheduler (dpm or pndm)": "PNDM",
        }
        submit = await server.push_modal_submit(press, values)
        update = await submit.wait_response()
        assert update.json["type"] == 7  # the card itself, redrawn
        choices = await bot.store.card_choices(int(button(card, "i2p:card:gen:").split(":")[3]))
        # Steps 3 is the smoke server's default: it keeps following the default.
        assert (choices.steps, choices.guidance, choices.aspect, choices.scheduler) == (
            None,
            4.0,
            None,
            "pndm",
        )
        card = server.message(card.id)
        assert button(card, "i2p:card:gen:").endswith(":2")
        fields = {f["name"]: f["value"] for f in card.embeds[0]["fields"]}
        assert fields["Settings · yours"] == "guidance 4 · pndm (the rest: the server's defaults)"

        generate = await server.push_button(card, button(card, "i2p:card:gen:"))
        await generate.wait_followup(timeout_s=30)
        assert job_row(bot, 1) == (2, 3, 4.0, 64, 64, "pndm")
        await bot.queue.join()


async def test_re_describe_keeps_what_the_member_chose_for_the_cards_images(
    discord_server: FakeDiscord, settings: Settings, engine: Engine, astronaut: Image.Image
) -> None:
    """Settings from /imagine-from and the guides kept stay on the new card Re-describe makes, and its
    Generate uses them; only the prompt is the new description's."""
    server = discord_server
    async with running_i2p2i(settings, server, engine) as bot:
        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        options = {"image": upload, "count": 1, "steps": 2, "guidance": 5.5, "aspect": "3:2"}
        handle = await server.push_slash("imagine-from", options)
        await handle.wait_followup(timeout_s=60)
        card = cast(StoredMessage, handle.original)
        await bot.store.set_card_keep(1, [Guide("layout", 0.6)])
        before = await bot.store.card_choices(1)

        redo = await server.push_select(card, button(card, "i2p:card:mode:"), ["fast"])
        await redo.wait_response()
        await server.wait_until(
            lambda: "Prompt · fast" in str(server.message(card.id).embeds) or None, timeout_s=30
        )
        card = server.message(card.id)
        assert button(card, "i2p:card:gen:").startswith("i2p:card:gen:2:")
        after = await bot.store.card_choices(2)
        assert (after.steps, after.guidance, after.aspect, after.scheduler) == (2, 5.5, "3:2", None)
        assert after.keep == before.keep == (Guide("layout", 0.6),)
        fields = {f["name"]: f["value"] for f in card.embeds[0]["fields"]}
        assert fields["Settings · yours"].startswith("2 steps · guidance 5.5 · aspect 3:2")

        # Keeping nothing again, Generate makes the new card's images with the carried settings.
        await bot.store.set_card_keep(2, [])
        generate = await server.push_button(card, button(card, "i2p:card:gen:"))
        await generate.wait_followup(timeout_s=30)
        assert job_row(bot, 1) == (1, 2, 5.5, 96, 64, "dpm")
        await bot.queue.join()
