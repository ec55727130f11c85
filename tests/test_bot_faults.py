"""Delivery under Discord's bad days: 429 storms, 5xx, cut connections, dead tokens, lost channels and rights.

The real bot and the smoke engine against the loopback Discord. Every test counts the attempts in the fake's
call log: a result arrives exactly once, or the job is kept as undelivered with a reason the owner can read.
"""

from __future__ import annotations

import asyncio
import logging
import re
import types
from collections.abc import Callable, Iterator
from typing import Any

import discord
import pytest
from PIL import Image

from i2p2i_bot import delivery as result_delivery
from i2p2i_bot.engine import Engine
from tests.bot_harness import png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord, RecordedCall
from tests.discord_fake.faults import RateLimitScope
from tests.discord_fake.world import ATTACH_FILES, SEND_MESSAGES, VIEW_CHANNEL
from tests.quick_retries import shorten_retries
from tests.test_bot import describe, eventually, generate, gpu_blocked

EDIT = "PATCH /webhooks/{app}/{token}/messages/{message}"
FOLLOWUP = "POST /webhooks/{app}/{token}"
POST = "POST /channels/{channel}/messages"
READ = "GET /webhooks/{app}/{token}/messages/{message}"
READ_CHANNEL = "GET /channels/{channel}/messages/{message}"
# What discord.py makes of one request: the first try and up to four retries.
DISCORD_PY_TRIES = 5


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """discord.py's 5xx backoff (1, 3, 5, 7, 9 s) and the bot's pause between tries of one way of posting,
    a hundred times shorter.

    Returns the delays discord.py asked for, so a test can still see the backoff it would have waited.
    """
    return shorten_retries(monkeypatch.setattr)


@pytest.fixture
def bot_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.INFO)
    yield caplog
    # Nothing the bot does on these paths may end as an exception nobody handled.
    unhandled = [
        r
        for r in caplog.get_records("call")
        if r.name.startswith(("i2p2i", "discord"))
        and (r.exc_info is not None or "Ignoring exception" in r.getMessage())
    ]
    assert unhandled == [], [f"{r.name}: {r.getMessage()}" for r in unhandled]


def uploads(server: FakeDiscord, *, since: int = 0) -> list[RecordedCall]:
    """Every call that carried a result's files: webhook edits, channel posts and DMs."""
    return [c for c in server.calls(since=since) if c.files and c.route in (EDIT, POST)]


def results_posted(server: FakeDiscord, job_id: int) -> list[RecordedCall]:
    """The uploads of job ``job_id`` that Discord accepted (a post answered for an old nonce counts once)."""
    accepted = [
        c for c in uploads(server) if c.ok and any(f.filename.startswith(f"job{job_id}-") for f in c.files)
    ]
    seen: set[str] = set()
    unique = []
    for call in accepted:
        message_id = str((call.response or {}).get("id"))
        if message_id not in seen:
            seen.add(message_id)
            unique.append(call)
    return unique


def with_token(token: str) -> Callable[[RecordedCall], bool]:
    return lambda call: call.params.get("token") == token


def progress(call: RecordedCall) -> bool:
    """A progress or queue-position edit: no files, and not the note pointing at a result posted elsewhere."""
    content = (call.json or {}).get("content") or ""
    return call.route == EDIT and not call.files and "is done" not in content


async def delivered(bot: Any, job_id: int) -> Any:
    return await eventually(lambda: bot.store.get_job(job_id), lambda job: job.delivered_at is not None, 60)


async def settled(server: FakeDiscord, presses: list[Any]) -> None:
    """Wait for each queued job's first status edit (its place in the queue), made as it was queued."""
    for press in presses:
        await server.wait_for(route=EDIT, predicate=with_token(press.token), timeout_s=30)


async def job_embed(server: FakeDiscord, job_id: int, *, user: str = "alice") -> str:
    """The /job answer's text (ephemeral), for what the owner can read about a job."""
    handle = await server.push_slash("job", {"job_id": job_id}, user=user)
    data = (await handle.wait_response()).json["data"]
    assert data["flags"] & 64
    return str(data["embeds"][0])


# -- 429 storms --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["user", "global"])
async def test_429_storm_on_progress_edits_stops_progress_not_the_result(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    scope: RateLimitScope,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """Every progress edit answered 429 while three jobs move through the queue one by one: each job's
    progress stops after one edit's retries instead of piling up, and every result still lands once."""
    async with running_i2p2i(settings_for(server, max_batch_images=1), server, engine) as bot:
        _, card = await describe(server, astronaut)
        bot.queue.pause()
        presses = [await generate(server, card) for _ in range(3)]
        await settled(server, presses)
        storm = server.rate_limit_next(
            EDIT, times=10_000, retry_after_s=0.02, scope=scope, predicate=progress
        )
        for job_id in (1, 2, 3):
            # Let each job's edit throttle open again, so the queue moving makes the bot edit every waiting
            # job's message: without the stop, job 3 would be edited (and retried) at each step of the queue.
            await asyncio.sleep(result_delivery.EDIT_INTERVAL_S)
            bot.queue.resume()
            await eventually(lambda: bot.store.get_job(job_id), lambda job: job.status != "queued", 30)  # noqa: B023
            bot.queue.pause()
            await delivered(bot, job_id)
        assert storm.hits and all(c.status == 429 for c in storm.hits)
        for press in presses:
            # One logical edit got discord.py's retries; after that the bot stopped asking.
            assert len([c for c in storm.hits if with_token(press.token)(c)]) <= DISCORD_PY_TRIES
        for job_id, press in enumerate(presses, start=1):
            (posted,) = results_posted(server, job_id)
            assert posted.route == EDIT and press.original.attachments
        assert server.calls(POST) == []


@pytest.mark.parametrize(
    ("scope", "times", "expected"),
    [
        ("user", 3, "edited"),  # discord.py's own retries absorb it
        ("global", 7, "edited"),  # one round of retries is not enough; the bot's second round is
        ("user", 40, "channel"),  # the edit never gets through: the channel has it, the job message says so
    ],
)
async def test_429_storm_on_the_result_upload(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    scope: RateLimitScope,
    times: int,
    expected: str,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """429s (route or global) on the result upload: delivered exactly once, in a bounded number of tries."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut, count=2)
        storm = server.rate_limit_next(
            EDIT,
            times=times,
            retry_after_s=0.02,
            scope=scope,
            predicate=lambda c: bool(c.files),
        )
        press = await generate(server, card)
        await delivered(bot, 1)
        edits = [c for c in uploads(server) if c.route == EDIT]
        assert len(edits) <= result_delivery.PATH_TRIES * DISCORD_PY_TRIES
        assert len(storm.hits) == min(times, len(edits))
        posted = results_posted(server, 1)
        assert len(posted) == 1
        if expected == "edited":
            assert posted[0].route == EDIT and press.original.attachments
        else:
            assert posted[0].route == POST and f"<@{server.user('alice').id}>" in posted[0].json["content"]
            # The job's own message no longer offers Cancel on a finished job; it points at the result.
            await server.wait_until(lambda: "posted below" in press.original.content or None, timeout_s=10)
            assert press.original.custom_ids() == []


async def test_429_storm_on_every_upload_path_ends_in_one_dm(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """A global 429 storm on every upload outlasts the edit and the channel; the DM gets through, once."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        per_path = result_delivery.PATH_TRIES * DISCORD_PY_TRIES
        storm = server.rate_limit_next(
            None,
            times=2 * per_path + 2,
            retry_after_s=0.02,
            scope="global",
            predicate=lambda c: bool(c.files),
        )
        await generate(server, card)
        await delivered(bot, 1)
        assert len(storm.hits) == 2 * per_path + 2
        assert len([c for c in uploads(server) if c.route == EDIT]) == per_path
        dm = server.world.dm_channels[server.user("alice").id].id
        channel_posts = [c for c in uploads(server) if c.route == POST and c.params["channel"] != str(dm)]
        assert len(channel_posts) == per_path and not any(c.ok for c in channel_posts)
        (posted,) = results_posted(server, 1)
        assert posted.params["channel"] == str(dm)
        assert len(server.dm_messages("alice")) == 1


# -- 5xx ----------------------------------------------------------------------------------------------------


async def test_5xx_on_the_result_edit_is_retried_then_succeeds(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    quick_retries: list[float],
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """Seven 500s on the upload: discord.py's five tries, the bot's pause, and the second round succeeds."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        failing = server.fail_next(EDIT, status=500, times=7, predicate=lambda c: bool(c.files))
        press = await generate(server, card)
        await delivered(bot, 1)
        assert len(failing.hits) == 7
        assert [c.status for c in uploads(server)] == [500] * 7 + [200]
        assert len(results_posted(server, 1)) == 1 and press.original.attachments
        assert {1, 3, 5, 7} <= set(quick_retries)  # discord.py's backoff was asked for, not skipped


async def test_5xx_on_the_result_edit_falls_back_to_the_channel(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """502s on every edit with files: a bounded number of tries, then one post in the channel."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        server.fail_next(EDIT, status=502, times=10_000, predicate=lambda c: bool(c.files))
        press = await generate(server, card)
        await delivered(bot, 1)
        edits = [c for c in uploads(server) if c.route == EDIT]
        assert len(edits) == result_delivery.PATH_TRIES * DISCORD_PY_TRIES
        (posted,) = results_posted(server, 1)
        assert posted.route == POST and "job #1 is done" in posted.json["content"]
        await server.wait_until(lambda: "posted below" in press.original.content or None, timeout_s=10)


async def test_5xx_everywhere_keeps_the_job_undelivered_with_a_reason(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """503 on every upload: each way is tried a bounded number of times; /job and /history say why."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        server.fail_next(None, status=503, times=10_000, predicate=lambda c: bool(c.files))
        await generate(server, card)
        await server.wait_until(lambda: bot.delivery.undeliverable(1), timeout_s=60)
        job = await bot.store.get_job(1)
        assert job is not None and job.status == "complete" and job.delivered_at is None
        assert [j.id for j in await bot.store.undelivered_jobs()] == [1]
        edits = [c for c in uploads(server) if c.route == EDIT]
        posts = [c for c in uploads(server) if c.route == POST]
        assert len(edits) == result_delivery.PATH_TRIES * DISCORD_PY_TRIES
        # discord.py does not retry a 503 on the bot's own routes: the bot's tries are all there are.
        assert len(posts) == 2 * result_delivery.PATH_TRIES  # channel, then DM
        assert results_posted(server, 1) == []
        text = await job_embed(server, 1)
        assert "Could not be posted: Discord kept failing (HTTP 503)" in text
        history = await server.push_slash("history")
        listing = (await history.wait_response()).json["data"]["embeds"][0]["description"]
        assert "Job #1** · complete · ⚠️ not posted" in listing


async def test_a_result_no_way_could_take_is_tried_again_without_a_restart(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """503 on every upload for a while: undelivered, and /job says when it is tried next; once Discord is
    well again that try posts it, once, in the channel (the token was left behind at the failed edit)."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        bot.delivery.redelivery_delays_s = (2.0,)
        _, card = await describe(server, astronaut)
        storm = server.fail_next(None, status=503, times=10_000, predicate=lambda c: bool(c.files))
        await generate(server, card)
        await server.wait_until(lambda: bot.delivery.undeliverable(1), timeout_s=60)
        storm.remaining = 0  # Discord answers again
        stored = await bot.store.get_job(1)
        assert stored is not None
        assert re.search(
            r"Discord kept failing \(HTTP 503\)\. "
            r"It will be tried again <t:\d+:R>, and when the bot restarts$",
            stored.delivery_error or "",
        ), stored.delivery_error
        assert "tried again <t:" in await job_embed(server, 1)
        failed = len(uploads(server))
        job = await delivered(bot, 1)
        assert job.delivery_error is None
        (posted,) = results_posted(server, 1)
        assert posted.route == POST and "job #1 is done" in posted.json["content"]
        assert len(uploads(server)) == failed + 1


async def test_redelivery_ends_after_its_last_scheduled_try(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """Discord failing for good: one delivery, then exactly one more per scheduled delay, then the job waits
    for the next start, and says so."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        bot.delivery.redelivery_delays_s = (0.05, 0.1)
        _, card = await describe(server, astronaut)
        server.fail_next(None, status=503, times=10_000, predicate=lambda c: bool(c.files))
        await generate(server, card)

        async def reason() -> str:
            job = await bot.store.get_job(1)
            assert job is not None
            return job.delivery_error or ""

        final = await eventually(reason, lambda text: text.endswith("tried again when the bot restarts"), 60)
        assert final == "Discord kept failing (HTTP 503). It will be tried again when the bot restarts"
        await asyncio.sleep(0.5)  # nothing more is scheduled
        posts = [c for c in uploads(server) if c.route == POST]
        assert len(posts) == 3 * 2 * result_delivery.PATH_TRIES  # three deliveries, each channel then DM
        assert (
            len([c for c in uploads(server) if c.route == EDIT])
            == result_delivery.PATH_TRIES * DISCORD_PY_TRIES
        )
        assert results_posted(server, 1) == []


# -- connections cut mid-upload ------------------------------------------------------------------------------


@pytest.mark.parametrize("moment", ["before", "after"])
async def test_connection_cut_during_the_result_edit(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    moment: str,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """The upload's connection drops (before or after Discord applied it): edited again, one result."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut, count=2)
        cut = server.cut_next(EDIT, moment=moment, predicate=lambda c: bool(c.files))  # type: ignore[arg-type]
        press = await generate(server, card)
        await delivered(bot, 1)
        assert len(cut.hits) == 1 and cut.hits[0].cut
        edits = [c for c in uploads(server) if c.route == EDIT]
        assert len(edits) == 2 and edits[-1].ok
        assert server.calls(POST) == []
        with_files = [m for m in server.messages_in("general") if m.attachments and not m.deleted]
        assert [m.id for m in with_files] == [card.id, press.original.id]  # the card, and one result


async def test_result_edit_applied_but_unanswered_twice_shows_one_result(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """Discord applies the result edit and the answer is lost, twice: the bot reads the message back, sees
    its result there, and posts no second copy in the channel."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut, count=2)
        cut = server.cut_next(EDIT, times=2, moment="after", predicate=lambda c: bool(c.files))
        press = await generate(server, card)
        job = await delivered(bot, 1)
        assert len(cut.hits) == 2 and all(c.cut for c in cut.hits)
        assert [c for c in uploads(server) if c.route == POST] == []
        (read,) = server.calls(READ, with_token(press.token))
        assert read.ok and read.params["message"] == str(press.original.id)
        with_files = [m for m in server.messages_in("general") if m.attachments and not m.deleted]
        assert [m.id for m in with_files] == [card.id, press.original.id]  # the card, and one result
        assert "job #1 is done" in press.original.content
        assert job.delivery_error is None and bot.delivery.delivery_state(job) is None
        assert server.dm_messages("alice") == []


@pytest.mark.parametrize("token", ["lives", "expired"])
async def test_result_edit_unanswered_and_unreadable_waits_rather_than_posting_blind(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    token: str,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """The edit's answer is lost twice and reading the message back fails too: nothing is posted blind;
    the job waits with a reason, and the next try leaves one result: the same message edited again while
    the token lives, or, once it expired, the message read back through the channel."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        bot.delivery.redelivery_delays_s = (0.5,)
        _, card = await describe(server, astronaut, count=2)
        server.cut_next(EDIT, times=2, moment="after", predicate=lambda c: bool(c.files))
        unreadable = server.fail_next(READ, status=503, times=10_000)
        press = await generate(server, card)
        await server.wait_until(lambda: bot.delivery.undeliverable(1), timeout_s=60)
        stored = await bot.store.get_job(1)
        assert stored is not None and stored.delivered_at is None
        assert (stored.delivery_error or "").startswith("Discord kept failing (HTTP 503). It will be tried")
        assert [c for c in uploads(server) if c.route == POST] == []
        reads = len(unreadable.hits)
        assert reads == result_delivery.PATH_TRIES * DISCORD_PY_TRIES
        if token == "expired":
            press.expire()
        unreadable.remaining = 0  # Discord answers again
        job = await delivered(bot, 1)
        assert job.delivery_error is None
        assert [c for c in uploads(server) if c.route == POST] == []
        channel_reads = server.calls(READ_CHANNEL)
        if token == "expired":
            (read,) = channel_reads
            assert read.ok and read.params["message"] == str(press.original.id)
        else:
            assert channel_reads == []
            assert uploads(server)[-1].route == EDIT and uploads(server)[-1].ok
        with_files = [m for m in server.messages_in("general") if m.attachments and not m.deleted]
        assert [m.id for m in with_files] == [card.id, press.original.id]
        assert server.dm_messages("alice") == []


async def test_connection_cut_after_a_channel_post_does_not_post_twice(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """Token gone; the channel post is made, its answer lost: the retry's nonce gets the same message back."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        cut = server.cut_next(POST, moment="after", predicate=lambda c: bool(c.files))
        with gpu_blocked(bot):
            press = await generate(server, card)
            press.expire()
        await delivered(bot, 1)
        posts = [c for c in uploads(server) if c.route == POST]
        assert len(posts) == 2 and posts[0] is cut.hits[0] and posts[0].cut
        assert posts[0].json["nonce"] == posts[1].json["nonce"] and posts[1].json["enforce_nonce"]
        assert posts[1].response["id"] == posts[0].response["id"]
        results = [m for m in server.messages_in("general") if m.content.startswith("<@")]
        assert len(results) == 1 and results[0].attachments
        assert server.dm_messages("alice") == []


@pytest.mark.parametrize("path", ["edit", "channel"])
async def test_gateway_drops_while_the_upload_is_in_flight(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    path: str,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """The gateway drops and the upload's connection is cut at the same moment: resumed, delivered once."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        route = EDIT if path == "edit" else POST
        held = server.hold_next(route, then_cut="after", predicate=lambda c: bool(c.files))
        with gpu_blocked(bot):
            press = await generate(server, card)
            if path == "channel":
                press.expire()
        await server.wait_until(lambda: held.hits or None, timeout_s=60)
        mark = server.frame_mark()
        server.drop_connection()
        await server.wait_for_frame(op=6, since=mark, timeout_s=30)  # RESUME
        held.release()
        await delivered(bot, 1)
        (posted,) = results_posted(server, 1)
        assert posted.route == route
        assert len([c for c in uploads(server) if c.route == route]) == 2  # the cut one and its retry
        assert server.dm_messages("alice") == []
        # Still answering afterwards.
        _, second = await describe(server, astronaut)
        assert second.embeds


@pytest.mark.parametrize("moment", ["before", "after"])
async def test_connection_cut_while_the_job_message_is_posted(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    moment: str,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """Generate's job message loses its answer (posted or not): the member sees one job message and no
    error, and the result replaces that message."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        cut = server.cut_next(FOLLOWUP, moment=moment, predicate=lambda c: not c.files)  # type: ignore[arg-type]
        press = await server.push_button(
            card, next(c for c in card.custom_ids() if c.startswith("i2p:card:gen:"))
        )
        await eventually(lambda: bot.store.get_job(1), lambda job: job is not None and job.delivered_at, 60)
        assert len(cut.hits) == 1 and cut.hits[0].cut
        assert len(server.calls(FOLLOWUP, with_token(press.token))) == 1  # no error note after it
        (posted,) = results_posted(server, 1)
        answered = press.original
        assert answered is not None
        assert posted.route == EDIT and posted.params["message"] == str(answered.id)
        assert "job #1 is done" in answered.content and answered.attachments
        assert server.calls(POST) == []
        jobs = [m for m in server.messages_in("general") if "job #" in m.content.lower()]
        assert [m.id for m in jobs] == [answered.id]


def test_a_401_on_the_bots_own_routes_is_not_an_expired_interaction() -> None:
    """Only the interaction's webhook can have run out of time; a 401 on a channel post or a DM is the
    bot's own token."""
    # A stand-in for aiohttp's response: HTTPException reads only its status and reason.
    response: Any = types.SimpleNamespace(status=401, reason="Unauthorized")
    refused = discord.HTTPException(response, "401: Unauthorized")
    assert result_delivery.classify("edit", refused).token_dead
    for path in ("channel", "dm"):
        failure = result_delivery.classify(path, refused)
        assert not failure.token_dead and not failure.transient
        assert failure.reason == "Discord no longer accepts my token"


# -- expired tokens -----------------------------------------------------------------------------------------


async def test_many_jobs_whose_tokens_expire_while_queued(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """Twelve queued jobs lose their tokens (401 50027, 404 10015, or simply 15 min old): all land in the
    channel with a mention, and no dead token is used more than once."""
    async with running_i2p2i(settings_for(server, max_queued_jobs_per_user=6), server, engine) as bot:
        cards = {user: (await describe(server, astronaut, user=user))[1] for user in ("alice", "bob")}
        presses = []
        with gpu_blocked(bot):
            for k in range(12):
                user = "alice" if k % 2 == 0 else "bob"
                # The last four are pressed 14 min 45 s after their interaction began: the bot's clock says
                # their tokens are over before the job even starts.
                age = {"age_s": 14 * 60 + 45} if k >= 8 else {}
                presses.append((user, await generate(server, cards[user], user=user, **age)))
            await settled(server, [press for _, press in presses[:8]])
            mark = server.mark()
            for _, press in presses[:4]:
                press.expire()  # 401 50027 Invalid Webhook Token
            unknown = {press.token for _, press in presses[4:8]}
            server.fail_next(
                None, status=404, code=10015, message="Unknown Webhook", times=10_000,
                predicate=lambda c: c.params.get("token") in unknown,
            )  # fmt: skip
            # Let the edit throttle open, so the queue moving makes the bot edit every waiting job's message.
            await asyncio.sleep(result_delivery.EDIT_INTERVAL_S)
        for job_id in range(1, 13):
            await delivered(bot, job_id)
        for k, (_, press) in enumerate(presses):
            used = server.calls(since=mark, predicate=with_token(press.token))
            assert len(used) <= (0 if k >= 8 else 1), [str(c) for c in used]
            assert all(not c.ok for c in used)
        posts = [c for c in uploads(server, since=mark) if c.route == POST and c.ok]
        assert len(posts) == 12
        for job_id, (user, _) in enumerate(presses, start=1):
            (posted,) = results_posted(server, job_id)
            assert posted.route == POST
            assert posted.json["content"].startswith(f"<@{server.user(user).id}> job #{job_id} is done")


# -- channels deleted ----------------------------------------------------------------------------------------


async def test_channel_deleted_while_several_jobs_wait(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """Three queued jobs of two members, tokens alive, channel deleted: each owner gets theirs by DM, once."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, alice_card = await describe(server, astronaut, user="alice")
        _, bob_card = await describe(server, astronaut, user="bob")
        with gpu_blocked(bot):
            presses = [
                await generate(server, alice_card, user="alice"),
                await generate(server, bob_card, user="bob"),
                await generate(server, alice_card, user="alice"),
            ]
            await settled(server, presses)
            mark = server.mark()
            await server.delete_channel("general")
            await asyncio.sleep(result_delivery.EDIT_INTERVAL_S)  # so the queue moving edits every message
        for job_id in (1, 2, 3):
            await delivered(bot, job_id)
        for press in presses:
            used = server.calls(since=mark, predicate=with_token(press.token))
            assert len(used) <= 1, [str(c) for c in used]  # the message is gone with the channel
        channel = server.channel("general").id
        assert len(server.calls(POST, lambda c: c.params["channel"] == str(channel), since=mark)) == 0
        assert len(server.calls("GET /channels/{channel}", since=mark)) == 3  # once per job, 404 each
        assert [len(server.dm_messages(u)) for u in ("alice", "bob")] == [2, 1]
        for job_id in (1, 2, 3):
            (posted,) = results_posted(server, job_id)
            assert "could not be posted in its channel" in posted.json["content"]


async def test_channel_deleted_while_a_card_is_made_or_redescribed(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """/imagine-from and Re-describe still working when the channel goes: no retry loop, no unhandled error,
    and the description is kept in the member's history."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        select_id = next(c for c in card.custom_ids() if c.startswith("i2p:card:mode:"))
        with gpu_blocked(bot):
            upload = server.add_attachment(png_bytes(astronaut.rotate(90)), "turned.png")
            fresh = await server.push_slash("imagine-from", {"image": upload})
            redo = await server.push_select(card, select_id, ["fast"])
            await fresh.wait_response()
            await redo.wait_response()
            mark = server.mark()
            await server.delete_channel("general")
        await eventually(
            lambda: bot.store.recent_interrogations(server.user("alice").id), lambda r: len(r) == 3
        )
        await server.wait_until(
            lambda: all(server.calls(since=mark, predicate=with_token(h.token)) for h in (fresh, redo)),
            timeout_s=20,
            what="both failed posts",
        )
        await asyncio.sleep(0.3)  # a retry loop would show as more calls meanwhile
        for handle in (fresh, redo):
            used = server.calls(since=mark, predicate=with_token(handle.token))
            assert 1 <= len(used) <= 3, [str(c) for c in used]  # the post, and one try to say it failed
            assert not any(c.ok for c in used)
        history = await server.push_slash("history", channel="bot-log")
        listing = (await history.wait_response()).json["data"]["embeds"][0]["description"]
        assert listing.count("**Card") == 3


async def test_channel_deleted_as_generate_is_pressed(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """The channel goes while Generate's job message is being posted: the queued job is still followed and
    reaches its owner by DM, and its token is never used to edit a message that does not exist."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        held = server.hold_next(FOLLOWUP, predicate=lambda c: not c.files)
        press = await server.push_button(
            card, next(c for c in card.custom_ids() if c.startswith("i2p:card:gen:"))
        )
        await server.wait_until(lambda: held.hits or None, timeout_s=30)
        await server.delete_channel("general")
        held.release()
        await delivered(bot, 1)
        assert held.hits[0].status == 404 and held.hits[0].response["code"] == 10003
        assert server.calls(EDIT, with_token(press.token)) == []
        assert len(server.calls(FOLLOWUP, with_token(press.token))) <= 2  # the job's message, one error note
        (posted,) = results_posted(server, 1)
        assert "could not be posted in its channel" in posted.json["content"]
        assert len(server.dm_messages("alice")) == 1


# -- missing permissions -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("denied", "code"),
    [
        (SEND_MESSAGES | ATTACH_FILES, 50013),
        (ATTACH_FILES, 50013),
        (VIEW_CHANNEL, 50001),
    ],
)
async def test_missing_permissions_after_the_token_expired_fall_back_to_a_dm(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    denied: int,
    code: int,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """403 (50013 or 50001) in the channel: one try there, then the result goes to the owner by DM."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut)
        with gpu_blocked(bot):
            press = await generate(server, card)
            press.expire()
            await server.deny_bot_permissions("general", denied)
        await delivered(bot, 1)
        channel = str(server.channel("general").id)
        refused = server.calls(POST, lambda c: c.params["channel"] == channel and bool(c.files))
        assert [(c.status, c.response["code"]) for c in refused] == [(403, code)]
        (posted,) = results_posted(server, 1)
        assert posted.params["channel"] != channel
        assert len(server.dm_messages("alice")) == 1


async def test_missing_permissions_and_closed_dms_leave_a_reason_for_the_owner(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """No right to post and DMs closed (50007): undelivered, one try each, and /job says why; a restart
    tries once more, not in a loop."""
    settings = settings_for(server)
    async with running_i2p2i(settings, server, engine) as bot:
        _, card = await describe(server, astronaut)
        with gpu_blocked(bot):
            press = await generate(server, card)
            await settled(server, [press])
            mark = server.mark()
            press.expire()
            await server.deny_bot_permissions("general", SEND_MESSAGES | ATTACH_FILES)
            server.block_dms("alice")
        results = bot.delivery
        await server.wait_until(lambda: results.undeliverable(1), timeout_s=60)
        posts = [c for c in uploads(server) if c.route == POST]
        assert [(c.status, c.response["code"]) for c in posts] == [(403, 50013), (403, 50007)]
        used = server.calls(since=mark, predicate=with_token(press.token))
        assert len(used) == 1 and used[0].status == 401  # the dead token, tried once
        text = await job_embed(server, 1)
        assert "I may not post or attach files in the channel and your DMs are closed to me" in text
        stored = await bot.store.get_job(1)
        assert stored is not None and stored.delivered_at is None
        assert "your DMs are closed to me" in (stored.delivery_error or "")
    restart = server.mark()
    async with running_i2p2i(settings, server, engine) as bot:
        # Before the retry at start, /job already knows why from the store.
        assert "your DMs are closed to me" in (bot.delivery.undeliverable(stored) or "")
        await server.wait_until(lambda: bot.delivery.undeliverable(1), timeout_s=60)
        again = [c for c in uploads(server, since=restart) if c.route == POST]
        assert [(c.status, c.response["code"]) for c in again] == [(403, 50013), (403, 50007)]
        assert server.calls(since=restart, predicate=with_token(press.token)) == []


# -- the interaction's own upload limit ----------------------------------------------------------------------


async def test_the_result_fits_the_upload_limit_discord_gave_the_interaction(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    bot_logs: pytest.LogCaptureFixture,
) -> None:
    """The result is packed for the interaction's own attachment_size_limit, not a 10 MiB default."""
    limit = 96 * 1024
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut, count=4)
        press = await generate(server, card, attachment_size_limit=limit)
        await delivered(bot, 1)
        (posted,) = results_posted(server, 1)
        sizes = [upload.size for upload in posted.files]
        # result_files keeps 64 KiB of the limit for the multipart envelope.
        assert sizes and sum(sizes) <= limit - 64 * 1024, sizes
        assert press.original.attachments
