"""What members and admins are told about remote GPU workers, through the real bot and the loopback Discord.

The runner's state is set by hand: the cogs only read it, so no Redis is needed here (tests/test_remote.py
runs the real one).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from i2p2i_bot.config import Settings
from tests.bot_harness import bot_settings, running_i2p2i
from tests.discord_fake import FakeDiscord
from tests.fake_engine import FakeEngine

EPHEMERAL = 64
UNREACHABLE = "GPU workers unreachable"
NOTICE = "⚠️ GPU workers unreachable: jobs wait in the queue and start once the workers can be reached again."


async def answer(server: FakeDiscord, command: str, user: str) -> dict[str, object]:
    handle = await server.push_slash(command, user=user)
    data = (await handle.wait_response()).json["data"]
    assert isinstance(data, dict) and data["flags"] & EPHEMERAL
    return data


async def test_queue_and_admin_queue_say_when_gpu_workers_are_unreachable(
    server: FakeDiscord, base_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the runner cannot reach Redis, /queue (with or without jobs) and /admin queue open with one
    line saying so, and the queued job is still listed; once it can, the line is gone."""
    settings = bot_settings(base_settings, tmp_path / "data", server)
    async with running_i2p2i(settings, server, FakeEngine()) as bot:
        bot.queue.pause()
        job = await server.push_slash("imagine", {"prompt": "a red kite", "count": 1}, user="alice")
        await job.wait_followup(timeout_s=30)
        monkeypatch.setattr(bot.runner, "problem", UNREACHABLE, raising=False)

        mine = await answer(server, "queue", "alice")
        assert mine["content"] == NOTICE
        assert "Job #1" in str(mine["embeds"])
        assert (await answer(server, "queue", "bob"))["content"] == f"{NOTICE}\nYou have nothing queued."
        listing = await answer(server, "admin queue", "owner")
        assert listing["content"] == f"{NOTICE}\nThe queue is paused."
        assert "Job #1" in str(listing["embeds"])

        monkeypatch.setattr(bot.runner, "problem", None, raising=False)
        assert (await answer(server, "queue", "bob"))["content"] == "You have nothing queued."
        assert (await answer(server, "admin queue", "owner"))["content"] == "The queue is paused."


async def test_a_job_no_live_worker_can_run_says_why_on_its_message_and_in_queue(
    server: FakeDiscord, base_settings: Settings, tmp_path: Path
) -> None:
    """When the queue hears that nothing can make a job now, its status message is edited to say what it
    waits for, and /queue says the same; the job stays queued, and once something can, the line goes."""
    settings = bot_settings(base_settings, tmp_path / "data", server)
    async with running_i2p2i(settings, server, FakeEngine()) as bot:
        bot.queue.pause()
        job = await server.push_slash("imagine", {"prompt": "a red kite", "count": 1}, user="alice")
        await job.wait_followup(timeout_s=30)
        waiting = "⏳ Job #1 is queued, waiting for a GPU worker that can keep edges."

        def shown() -> list[str]:
            return [m.content for m in (job.original, *job.followups) if m is not None]

        bot.queue.set_blocker(lambda params: "waiting for a GPU worker that can keep edges")
        await server.wait_until(lambda: waiting in shown() or None, timeout_s=10, what="the waiting line")
        assert waiting in str((await answer(server, "queue", "alice"))["embeds"])
        assert [j.status for j in bot.queue.active_jobs()] == ["queued"]

        bot.queue.set_blocker(None)
        await server.wait_until(
            lambda: "⏳ Job #1 is next in line." in shown() or None, timeout_s=10, what="the line gone"
        )
        assert waiting not in str((await answer(server, "queue", "alice"))["embeds"])
