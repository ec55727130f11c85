"""The real bot, with the smoke engine, against the loopback Discord; and many members using it at once."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import functools
import io
import json
import math
import random
import re
import sqlite3
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from PIL import Image, ImageOps

from i2p2i_bot.app import I2P2IBot, create_bot
from i2p2i_bot.config import DiscordSettings, QueueSettings, Settings
from i2p2i_bot.engine import Engine
from tests.discord_fake import (
    FakeDiscord,
    InteractionHandle,
    RecordedCall,
    StoredMessage,
    World,
    running_bot,
    running_fake_discord,
)


def bot_settings(base: Settings, data_dir: Path, server: FakeDiscord, **queue: Any) -> Settings:
    """Settings for a bot that talks to `server` and keeps its data in `data_dir`."""
    return dataclasses.replace(
        base,
        data_dir=str(data_dir),
        discord=DiscordSettings(token=server.token, api_base=server.api_base, gateway_url=server.gateway_url),
        queue=dataclasses.replace(QueueSettings(), **queue),
    )


def moderated_settings(base: Settings, data_dir: Path, server: FakeDiscord) -> Settings:
    """bot_settings, with the server's Moderator role among the bot's admin roles (server settings)."""
    made = bot_settings(base, data_dir, server)
    role = server.role("Moderator").id
    return dataclasses.replace(made, discord=dataclasses.replace(made.discord, admin_role_ids=[role]))


class TestBot(I2P2IBot):
    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """No 5 s pause before a re-IDENTIFY: that is Discord's rate limit, not ours to test."""


@contextlib.asynccontextmanager
async def running_i2p2i(settings: Settings, server: FakeDiscord, engine: Any) -> AsyncIterator[I2P2IBot]:
    """Start the production bot (its setup_hook, cogs and sync) with an already loaded engine (None: the
    bot loads its own, as bot.py's does)."""
    create_bot(settings)  # applies the endpoints exactly as bot.py does
    loader = None if engine is None else (lambda _settings: engine)
    bot = TestBot(settings, engine_loader=loader, guild_ready_timeout=0.05)
    async with running_bot(bot, server, ready_timeout_s=60) as running:
        yield running


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- many members at once ----------------------------------------------------------------------------------

CALLBACK = "POST /interactions/{interaction}/{token}/callback"
FOLLOWUP = "POST /webhooks/{app}/{token}"
EDIT_MESSAGE = "PATCH /webhooks/{app}/{token}/messages/{message}"
CHANNEL_POST = "POST /channels/{channel}/messages"
MENU = "Imagine from image"
# What a member is told when the bot hit a bug; a load run must say it to nobody.
INTERNAL_ERROR = "something went wrong on my side"
INTERACTIONS_PER_MEMBER = 10
DEFERRED = 5
MODAL = 9
_JOB_TITLE = re.compile(r"Job #(\d+)(?: ·|$)")
_STATUS_BUTTON = re.compile(r"i2p:job:(?:cancel|info):(\d+)$")


def quick_engine(engine: Engine, *, steps: int = 1) -> Engine:
    """The same loaded models, generating with `steps` denoising steps, for runs that make many images."""
    generator = copy.copy(engine.generator)
    generator.settings = dataclasses.replace(generator.settings, steps=steps)
    generate = dataclasses.replace(engine.settings.generate, steps=steps)
    return engine.sharing(
        settings=dataclasses.replace(engine.settings, generate=generate), generator=generator
    )


def sample_images(count: int, side: int = 96) -> list[bytes]:
    """`count` different small PNG pictures (Mandelbrot views); different images miss the card cache."""
    pictures = []
    for k in range(count):
        extent = (-2.1 + 0.07 * k, -1.2 + 0.03 * k, 0.7 - 0.05 * k, 1.2)
        grey = Image.effect_mandelbrot((side, side), extent, 48 + 8 * k)
        dark = ((37 * k) % 200, 30, 90)
        light = (250, (220 + 41 * k) % 256, 140)
        pictures.append(png_bytes(ImageOps.colorize(grey, black=dark, white=light)))
    return pictures


def crowd_world(members: int) -> tuple[World, list[str]]:
    """The default world plus `members` guild members named member000, member001, …"""
    world = World.default()
    guild = world.guild()
    names = [world.add_user(f"member{k:03d}", guild=guild).username for k in range(members)]
    return world, names


Predicate = Callable[[RecordedCall], bool]
Push = Callable[[], Awaitable[InteractionHandle]]


class CallIndex:
    """Answered calls by interaction id and by token, with waits that cost nothing per unrelated call.

    `FakeDiscord.wait_for` re-scans the whole call log on every call; with a thousand interactions in flight
    that is quadratic, so many members wait here instead.
    """

    def __init__(self, server: FakeDiscord) -> None:
        self._calls: defaultdict[str, list[RecordedCall]] = defaultdict(list)
        self._waiters: defaultdict[str, list[tuple[Predicate, asyncio.Future[RecordedCall]]]] = defaultdict(
            list
        )
        self.close = server.observe(self._seen)

    def _seen(self, call: RecordedCall) -> None:
        for key in _keys(call):
            self._calls[key].append(call)
            waiting = self._waiters.pop(key, None)
            if not waiting:
                continue
            still = []
            for predicate, future in waiting:
                if future.done():
                    continue
                if predicate(call):
                    future.set_result(call)
                else:
                    still.append((predicate, future))
            if still:
                self._waiters[key] = still

    async def wait(self, key: str, predicate: Predicate, *, timeout_s: float) -> RecordedCall | None:
        """The first answered call under `key` (``interaction:<id>`` or ``token:<token>``) that matches."""
        for call in self._calls.get(key, ()):
            if predicate(call):
                return call
        future: asyncio.Future[RecordedCall] = asyncio.get_running_loop().create_future()
        self._waiters[key].append((predicate, future))
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return None


def _keys(call: RecordedCall) -> list[str]:
    keys = []
    if "interaction" in call.params:
        keys.append(f"interaction:{call.params['interaction']}")
    if "token" in call.params:
        keys.append(f"token:{call.params['token']}")
    return keys


def result_job(call: RecordedCall) -> int | None:
    """The job a result post is for (its embed's title is "Job #N"); None for anything else."""
    if not isinstance(call.json, dict):
        return None
    embeds = call.json.get("embeds") or []
    found = _JOB_TITLE.match(str(embeds[0].get("title", ""))) if embeds else None
    return int(found[1]) if found else None


class MemberStopped(Exception):
    """A member cannot go on; why is in the run's problems."""


@dataclasses.dataclass
class SentInteraction:
    """One interaction a member sent, and the first callback the fake received for it."""

    kind: str
    member: str
    handle: InteractionHandle
    sent_at: float
    ack: RecordedCall | None = None

    @property
    def ack_s(self) -> float | None:
        """From sending the interaction to the fake receiving its first callback."""
        return None if self.ack is None else self.ack.at - self.sent_at


@dataclasses.dataclass
class LoadRun:
    """What a Crowd did: every interaction sent, the jobs it saw accepted, and anything that went wrong."""

    sent: list[SentInteraction]
    jobs: dict[int, str]  # every job a member saw accepted -> that member
    problems: list[str]
    started_at: float
    acked_at: float  # every member done, every interaction answered
    settled_at: float  # and every job finished and delivered

    def ack_times_s(self) -> list[float]:
        return sorted(s.ack_s for s in self.sent if s.ack_s is not None)

    @property
    def interactions_per_s(self) -> float:
        return len(self.sent) / max(self.acked_at - self.started_at, 1e-9)


class Crowd:
    """Members who each send ten interactions, all members at once.

    Each member describes an image (/imagine-from; every fifth member uses the context menu on a message
    they post instead), presses Generate on the card, Info on the job, runs /queue, waits for the result and
    presses Reroll, presses Cancel on the reroll (Info if it is already done), opens Edit prompt on the card
    and submits the modal, runs /history, then /job for the edited job: three jobs each. A member waits for
    each acknowledgement, and for the message the next step needs, after a short random think time.
    """

    def __init__(
        self,
        server: FakeDiscord,
        members: Sequence[str],
        images: Sequence[bytes],
        *,
        max_count: int = 2,
        seed: int = 0,
        spread_s: float = 1.0,
        think_s: float = 0.02,
        ack_timeout_s: float = 30.0,
        timeout_s: float = 120.0,
    ) -> None:
        self.server = server
        self.members = list(members)
        self.images = list(images)
        self.max_count = max_count
        self.seed = seed
        self.spread_s = spread_s
        self.think_s = think_s
        # Discord gives up after 3 s; far more here, so only a missing answer fails, never a slow machine.
        self.ack_timeout_s = ack_timeout_s
        self.timeout_s = timeout_s
        self.sent: list[SentInteraction] = []
        self.jobs: dict[int, str] = {}
        self.problems: list[str] = []
        self._index: CallIndex | None = None

    async def run(self, bot: I2P2IBot) -> LoadRun:
        """Every member's ten interactions, then wait until every job is finished and delivered."""
        clock = self.server.clock
        self._index = CallIndex(self.server)
        try:
            started = clock.now()
            await asyncio.gather(*(self._member(k, name) for k, name in enumerate(self.members)))
            acked = clock.now()
            await self._settle(bot)
            settled = clock.now()
        finally:
            self._index.close()
        return LoadRun(self.sent, self.jobs, self.problems, started, acked, settled)

    async def _member(self, k: int, name: str) -> None:
        rng = random.Random(f"{self.seed}:{name}")
        await asyncio.sleep(rng.uniform(0, self.spread_s))
        with contextlib.suppress(MemberStopped):
            await self._script(k, name, rng)

    async def _script(self, k: int, name: str, rng: random.Random) -> None:
        server = self.server
        image = self.images[k % len(self.images)]
        count = 1 + k % self.max_count

        def slash(command: str, **options: Any) -> Push:
            return functools.partial(server.push_slash, command, options, user=name)

        def press(message: StoredMessage, custom_id: str) -> Push:
            return functools.partial(server.push_button, message.id, custom_id, user=name)

        if k % 5 == 4:
            upload = server.add_attachment(image, f"photo-{name}.png", ephemeral=False)
            text = "what do you make of this?"
            posted = await server.post_user_message("general", name, text, attachments=[upload])
            menu = functools.partial(server.push_message_command, MENU, posted, user=name)
            described = await self._send("context menu", name, rng, menu)
        else:
            upload = server.add_attachment(image, f"photo-{name}.png")
            described = await self._send(
                "/imagine-from", name, rng, slash("imagine-from", image=upload, count=count)
            )
        card = await self._message(described)

        generate = await self._send("Generate", name, rng, press(card, _button(card, "i2p:card:gen:")))
        first = await self._message(generate)
        first_job = self._job(first, generate)
        await self._send("Info", name, rng, press(first, f"i2p:job:info:{first_job}"))
        await self._send("/queue", name, rng, slash("queue"))
        result = await self._result(generate, first_job)

        reroll = await self._send("Reroll", name, rng, press(result, f"i2p:job:reroll:{first_job}"))
        second = await self._message(reroll)
        second_job = self._job(second, reroll)
        await self._think(rng)
        cancel = f"i2p:job:cancel:{second_job}"
        if cancel in server.message(second.id).custom_ids():
            await self._send("Cancel", name, None, press(second, cancel))
        else:  # the reroll was done before the member could press Cancel
            await self._send("Info", name, None, press(second, f"i2p:job:info:{second_job}"))

        edit = await self._send("Edit prompt", name, rng, press(card, _button(card, "i2p:card:edit:")))
        if edit.response_type != MODAL:
            self._stop(f"Edit prompt by {name} was answered with type {edit.response_type}, not a modal")
        values = {
            "Prompt": f"a lighthouse painted by {name}",
            f"Images (1–{self.max_count})": "1",
            "Seed (blank for random)": str(k),
        }
        submit = functools.partial(server.push_modal_submit, edit, values)
        edited = await self._send("modal submit", name, rng, submit)
        third_job = self._job(await self._message(edited), edited)
        await self._send("/history", name, rng, slash("history"))
        await self._send("/job", name, rng, slash("job", job_id=third_job))

    async def _think(self, rng: random.Random) -> None:
        await asyncio.sleep(rng.uniform(0, self.think_s))

    async def _send(self, kind: str, name: str, rng: random.Random | None, push: Push) -> InteractionHandle:
        """Think a moment (unless `rng` is None), send the interaction, and wait for its first callback."""
        if rng is not None:
            await self._think(rng)
        sent_at = self.server.clock.now()
        handle = await push()
        sent = SentInteraction(kind, name, handle, sent_at)
        self.sent.append(sent)
        sent.ack = await self._wait(
            f"interaction:{handle.id}", lambda c: c.route == CALLBACK, timeout_s=self.ack_timeout_s
        )
        if sent.ack is None:
            self._stop(f"{kind} by {name} (interaction {handle.id}) was never answered")
        if not sent.ack.ok:
            self._stop(f"{kind} by {name}: its first callback got {sent.ack.status} {sent.ack.response}")
        return handle

    async def _message(self, handle: InteractionHandle) -> StoredMessage:
        """The public message a deferred interaction's first follow-up made (a card or a job's status)."""
        what = f"interaction {handle.id}"
        if handle.response_type != DEFERRED:
            data = (handle.callbacks()[0].json or {}).get("data") or {}
            self._stop(f"{what} was answered at once, not deferred: {data.get('content')!r}")
        call = await self._wait(f"token:{handle.token}", lambda c: c.route == FOLLOWUP)
        if call is None or not call.ok:
            self._stop(f"{what}: no follow-up, or it failed ({call})")
        message = self.server.message(int(call.response["id"]))
        if message.ephemeral:
            self._stop(f"{what} was refused: {message.content!r}")
        return message

    async def _result(self, handle: InteractionHandle, job_id: int) -> StoredMessage:
        """The job's message once its result replaced the status (an edit with the result embed)."""
        call = await self._wait(
            f"token:{handle.token}", lambda c: c.route == EDIT_MESSAGE and c.ok and result_job(c) == job_id
        )
        if call is None:
            self._stop(f"job #{job_id}'s result was never posted on its message")
        return self.server.message(int(call.params["message"]))

    def _job(self, message: StoredMessage, handle: InteractionHandle) -> int:
        found = [int(m[1]) for c in message.custom_ids() if (m := _STATUS_BUTTON.match(c))]
        if not found:
            self._stop(f"interaction {handle.id}'s message has no job buttons: {message.custom_ids()}")
        self.jobs[found[0]] = handle.record.user.username
        return found[0]

    async def _wait(
        self, key: str, predicate: Predicate, *, timeout_s: float | None = None
    ) -> RecordedCall | None:
        assert self._index is not None
        return await self._index.wait(key, predicate, timeout_s=timeout_s or self.timeout_s)

    def _stop(self, problem: str) -> NoReturn:
        self.problems.append(problem)
        raise MemberStopped(problem)

    async def _settle(self, bot: I2P2IBot) -> None:
        """Wait until no job is active and every finished job has been delivered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            await asyncio.wait_for(bot.queue.join(), self.timeout_s)
        except TimeoutError:
            self.problems.append(f"jobs still active after {self.timeout_s} s: {bot.queue.active_jobs()}")
            return
        while undelivered := await bot.store.undelivered_jobs():
            if loop.time() > deadline:
                self.problems.append(f"jobs never delivered: {[job.id for job in undelivered]}")
                return
            await asyncio.sleep(0.05)


def _button(message: StoredMessage, prefix: str) -> str:
    return next(c for c in message.custom_ids() if c.startswith(prefix))


@dataclasses.dataclass(frozen=True)
class JobRow:
    """A job as the database holds it after a run, with how many of its images are stored."""

    id: int
    owner_id: int
    status: str
    count: int
    images: int
    safe_images: int
    delivered: bool

    @property
    def expected_files(self) -> int:
        """What its result must carry: the images the safety checker passed, plus a grid when several."""
        return self.safe_images + (1 if self.safe_images > 1 else 0)


@dataclasses.dataclass
class LoadAudit:
    """What the fake and the database say happened, for checking a run."""

    callbacks: dict[int, list[RecordedCall]]  # every interaction the fake sent -> its callbacks
    internal_errors: list[str]  # anything the bot posted that says it hit a bug
    jobs: dict[int, JobRow]
    deliveries: dict[int, list[RecordedCall]]  # job id -> every post of its result

    def callback_counts(self) -> Counter[int]:
        """How many interactions got 0, 1, 2… callbacks."""
        return Counter(len(calls) for calls in self.callbacks.values())

    def failures(self, run: LoadRun) -> list[str]:
        """Every broken promise: an interaction answered twice or never, a job lost or delivered twice."""
        found = list(run.problems) + [
            f"the bot reported an internal error: {e}" for e in self.internal_errors
        ]
        for interaction, calls in self.callbacks.items():
            if len(calls) != 1 or not calls[0].ok:
                found.append(f"interaction {interaction} got callbacks {[str(c) for c in calls]}")
        if set(self.jobs) != set(run.jobs):
            found.append(f"jobs stored {sorted(self.jobs)} but members saw {sorted(run.jobs)}")
        for job in self.jobs.values():
            made_all = job.images == job.count
            if not (job.status == "complete" and made_all) and not (
                job.status == "cancelled" and job.images <= job.count
            ):
                found.append(f"job {job.id} ended {job.status} with {job.images} of {job.count} images")
            posts = self.deliveries.get(job.id, [])
            if not job.delivered or len(posts) != 1:
                found.append(
                    f"job {job.id} was delivered {len(posts)} times (delivered_at set: {job.delivered})"
                )
            elif len(posts[0].files) != job.expected_files:
                found.append(
                    f"job {job.id}'s result has {len(posts[0].files)} files, not {job.expected_files}"
                )
        return found


def audit(server: FakeDiscord, database: Path) -> LoadAudit:
    """Read back every interaction's callbacks, every job row and every result post."""
    callbacks: dict[int, list[RecordedCall]] = {interaction: [] for interaction in server.interactions}
    deliveries: defaultdict[int, list[RecordedCall]] = defaultdict(list)
    internal_errors = []
    for call in server.calls():
        if call.route == CALLBACK:
            callbacks.setdefault(int(call.params["interaction"]), []).append(call)
        if call.route in (EDIT_MESSAGE, CHANNEL_POST) and call.ok and (job := result_job(call)) is not None:
            deliveries[job].append(call)
        if call.json is not None and INTERNAL_ERROR in json.dumps(call.json, ensure_ascii=False):
            internal_errors.append(str(call))
    query = """
        SELECT j.id, j.owner_id, j.status, j.count, j.delivered_at IS NOT NULL,
               COUNT(i.id), COALESCE(SUM(i.nsfw = 0), 0)
        FROM jobs AS j LEFT JOIN images AS i ON i.job_id = j.id
        GROUP BY j.id ORDER BY j.id
    """
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        rows = db.execute(query).fetchall()
    jobs = {row[0]: JobRow(row[0], row[1], row[2], row[3], row[5], row[6], bool(row[4])) for row in rows}
    return LoadAudit(callbacks, internal_errors, jobs, dict(deliveries))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (0.5: the median, 0.99: p99)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = min(len(sorted_values), max(1, math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


async def run_crowd(
    base: Settings,
    data_dir: Path,
    engine: Any,
    *,
    members: int,
    images: int = 8,
    max_count: int = 2,
    seed: int = 7,
    spread_s: float = 1.0,
    think_s: float = 0.02,
    timeout_s: float = 120.0,
) -> tuple[LoadRun, LoadAudit, FakeDiscord]:
    """Start a fake Discord with `members` more members and the bot, run a Crowd, and audit what happened."""
    world, names = crowd_world(members)
    async with running_fake_discord(world) as server:
        settings = bot_settings(base, data_dir, server)
        settings = dataclasses.replace(
            settings, generate=dataclasses.replace(settings.generate, max_count=max_count)
        )
        async with running_i2p2i(settings, server, engine) as bot:
            crowd = Crowd(
                server,
                names,
                sample_images(images),
                max_count=max_count,
                seed=seed,
                spread_s=spread_s,
                think_s=think_s,
                timeout_s=timeout_s,
            )
            run = await crowd.run(bot)
    return run, audit(server, settings.database_path), server
