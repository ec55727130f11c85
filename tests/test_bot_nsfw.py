"""Images the safety checker flags, through the loopback Discord: withheld everywhere by default; a server's
`nsfw` setting opens its age-restricted channels (#art-nsfw in the fake world) alone, never #general or a
DM; what is withheld is blacked out before it is stored."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from PIL import Image

from i2p2i_bot.config import Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.flagged import FlaggedPolicy
from tests.bot_harness import moderated_settings, running_i2p2i
from tests.discord_fake import FakeDiscord, StoredMessage
from tests.discord_fake.world import ATTACH_FILES, SEND_MESSAGES
from tests.safety import flagging_everything
from tests.test_bot import gpu_blocked
from tests.test_bot_settings import set_setting

WITHHELD_ONE = "1 image(s) withheld: the safety checker flagged them."


@pytest.fixture
def settings(base_settings: Settings, tmp_path: Path, discord_server: FakeDiscord) -> Settings:
    return moderated_settings(base_settings, tmp_path / "data", discord_server)


async def imagine(server: FakeDiscord, *, count: int = 1, **where: Any) -> tuple[int, Any]:
    """Run /imagine where asked (channel=... or dm=True); the job's id and its interaction."""
    handle = await server.push_slash("imagine", {"prompt": "a red kite", "count": count}, **where)
    await handle.wait_followup(timeout_s=30)
    match = re.search(r"Job #(\d+)", cast(StoredMessage, handle.original).content)
    assert match is not None
    return int(match[1]), handle


async def result_of(server: FakeDiscord, handle: Any) -> StoredMessage:
    """The job's message once its result is in it."""
    return await server.wait_until(
        lambda: handle.original if "is done" in handle.original.content else None, timeout_s=60
    )


def notes(message: StoredMessage) -> str:
    fields = message.embeds[0].get("fields", [])
    return next((f["value"] for f in fields if f["name"] == "Notes"), "")


def stored_pixels(bot: Any, job_id: int, index: int = 0) -> np.ndarray:
    with Image.open(bot.store.image_path(job_id, index)) as image:
        return np.asarray(image.convert("RGB"))


async def test_flagged_images_are_withheld_everywhere_by_default(
    discord_server: FakeDiscord, settings: Settings, engine: Engine
) -> None:
    """Without a server setting, an age-restricted channel withholds flagged images as #general does, and
    neither stores their pixels."""
    server = discord_server
    with flagging_everything(engine.generator.pipe):
        async with running_i2p2i(settings, server, engine) as bot:
            for channel in ("general", "art-nsfw"):
                job_id, handle = await imagine(server, channel=channel)
                result = await result_of(server, handle)
                assert result.attachments == [] and WITHHELD_ONE in notes(result), channel
                job = await bot.store.get_job(job_id)
                assert job is not None and job.flagged_policy is FlaggedPolicy.WITHHOLD
                assert stored_pixels(bot, job_id).max() == 0


async def test_unfiltered_shows_flagged_images_in_age_restricted_channels_only(
    discord_server: FakeDiscord, settings: Settings, engine: Engine
) -> None:
    """nsfw=unfiltered: #art-nsfw gets the flagged image as made; #general and a DM still withhold it, and
    /job from #general shows no image of the job that #art-nsfw showed."""
    server = discord_server
    with flagging_everything(engine.generator.pipe):
        async with running_i2p2i(settings, server, engine) as bot:
            bad = await set_setting(server, "nsfw", "on")
            assert bad.startswith("nsfw must be filtered, spoiler or unfiltered")
            assert await bot.store.server_settings() == []
            assert (
                await set_setting(server, "nsfw", "unfiltered") == "Set nsfw to unfiltered for this server."
            )

            shown_id, handle = await imagine(server, channel="art-nsfw")
            shown = await result_of(server, handle)
            assert [a.filename for a in shown.attachments] == [f"job{shown_id}-1-seed{_seed(shown)}.png"]
            assert notes(shown) == ""
            posted = np.asarray(
                Image.open(io.BytesIO(shown.file(shown.attachments[0].filename))).convert("RGB")
            )
            assert posted.max() > 0 and np.array_equal(posted, stored_pixels(bot, shown_id))
            job = await bot.store.get_job(shown_id)
            assert job is not None and job.flagged_policy is FlaggedPolicy.SHOW

            for where in ({"channel": "general"}, {"dm": True}):
                job_id, handle = await imagine(server, **where)
                result = await result_of(server, handle)
                assert result.attachments == [] and WITHHELD_ONE in notes(result), where
                assert stored_pixels(bot, job_id).max() == 0

            again = await server.push_slash("job", {"job_id": shown_id}, channel="general")
            answer = (await again.wait_response()).json["data"]
            assert answer["flags"] & 64 and not answer.get("attachments")
            assert answer["embeds"][0]["title"].startswith(f"Job #{shown_id}")


async def test_spoiler_posts_flagged_images_as_spoilers_outside_the_grid(
    discord_server: FakeDiscord, settings: Settings, engine: Engine
) -> None:
    """nsfw=spoiler: in #art-nsfw flagged images are SPOILER_ files, none in a grid or as the embed's image;
    #general withholds them."""
    server = discord_server
    with flagging_everything(engine.generator.pipe):
        async with running_i2p2i(settings, server, engine) as bot:
            assert await set_setting(server, "nsfw", "spoiler") == "Set nsfw to spoiler for this server."
            job_id, handle = await imagine(server, channel="art-nsfw", count=2)
            result = await result_of(server, handle)
            names = [a.filename for a in result.attachments]
            assert len(names) == 2 and all(n.startswith(f"SPOILER_job{job_id}-") for n in names), names
            assert "image" not in result.embeds[0]
            assert "posted as a spoiler" in str(result.embeds[0])
            assert all(stored_pixels(bot, job_id, i).max() > 0 for i in range(2))

            job_id, handle = await imagine(server, channel="general")
            result = await result_of(server, handle)
            assert result.attachments == [] and WITHHELD_ONE in notes(result)


async def test_a_shown_job_delivered_elsewhere_or_after_a_stricter_setting_withholds(
    discord_server: FakeDiscord, settings: Settings, engine: Engine
) -> None:
    """A job asked in #art-nsfw under unfiltered withholds its flagged images when the setting is made
    stricter before it is delivered, and when the bot may not post in the channel any more and the result
    goes by DM."""
    server = discord_server
    with flagging_everything(engine.generator.pipe):
        async with running_i2p2i(settings, server, engine) as bot:
            assert (await set_setting(server, "nsfw", "unfiltered")).startswith("Set nsfw")
            with gpu_blocked(bot):
                _, stricter = await imagine(server, channel="art-nsfw")
                said = await set_setting(server, "nsfw", "filtered")  # the bot's default
                assert said == "nsfw is the bot's default again here."
            result = await result_of(server, stricter)
            assert result.attachments == [] and WITHHELD_ONE in notes(result)

            assert (await set_setting(server, "nsfw", "unfiltered")).startswith("Set nsfw")
            with gpu_blocked(bot):
                job_id, moved = await imagine(server, channel="art-nsfw")
                moved.expire()
                await server.deny_bot_permissions("art-nsfw", SEND_MESSAGES | ATTACH_FILES)
            await server.wait_until(lambda: server.dm_messages("alice") or None, timeout_s=60)
            dm = server.dm_messages("alice")[0]
            assert "could not be posted" in dm.content and dm.attachments == []
            assert WITHHELD_ONE in notes(dm)
            job = await bot.store.get_job(job_id)
            assert job is not None and job.flagged_policy is FlaggedPolicy.SHOW


def _seed(message: StoredMessage) -> str:
    match = re.search(r"seed `(\d+)`", str(message.embeds[0]))
    assert match is not None
    return match[1]


@pytest.mark.parametrize("checker", [True, False])
async def test_a_bot_without_the_safety_checker_says_at_start_that_nothing_is_filtered(
    discord_server: FakeDiscord,
    settings: Settings,
    engine: Engine,
    checker: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """generate.safety_checker = false disables the nsfw policy; the bot warns once at start."""
    changed = dataclasses.replace(settings.generate, safety_checker=checker)
    async with running_i2p2i(dataclasses.replace(settings, generate=changed), discord_server, engine):
        pass
    warnings = [r.getMessage() for r in caplog.records if "safety_checker is off" in r.getMessage()]
    assert len(warnings) == (0 if checker else 1)
    if warnings:
        assert warnings[0].startswith("generate.safety_checker is off: no image is flagged")
