"""Delivery: follows every job from queue to result, editing its message and posting its images.

While the interaction token lives, the job's own message is edited (a job asked for by a reply has the
bot's own reply as its message, edited through the channel at any time); after that the result goes to the
channel with a mention of the owner, then by DM; failing all three, the job stays undelivered in the store
and the owner can read why in /job.

Each way of posting is tried once, and again only when the failure may pass (Discord still rate limiting
after discord.py's own retries, a 5xx, a dropped connection): a refusal (expired token, deleted channel,
missing permission, closed DMs) moves on at once, so no dead token is ever retried in a loop. Posts carry
the job's nonce, which Discord enforces, so a retry after a lost answer gets the first message back instead
of posting the result twice. An edit's answer can be lost after Discord applied it, so before the result
goes anywhere else the job's message is read back: a result already there counts as delivered, and when
the message cannot be read the delivery waits for its next try rather than post blind. Once the result
has gone past the edit of its own message, the store forgets the interaction token before anything else
is posted: a restart after a post whose answer was lost (a crash, a kill) goes the same way again, with
the same nonce, instead of editing in a second copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import discord
from PIL import Image

from i2p2i_bot.cards import ResultFiles, result_embed, result_files, status_text
from i2p2i_bot.events import Subscription
from i2p2i_bot.flagged import FlaggedPolicy
from i2p2i_bot.i18n import LIST_AND, N_, tr
from i2p2i_bot.job_controls import DEFAULT_UPLOAD_LIMIT, flagged_policy_in, job_view, offered_image_actions
from i2p2i_bot.jobs import FROM_REPLY, Delivery, EventKind, Job, JobEvent, JobStatus
from i2p2i_bot.replies import ANSWER_ERRORS

if TYPE_CHECKING:
    from i2p2i_bot.app import I2P2IBot

log = logging.getLogger("i2p2i.results")

# Stop using an interaction token a little before it expires, so no edit races the expiry.
TOKEN_MARGIN_S = 30
# Progress edits on one message are at least this far apart.
EDIT_INTERVAL_S = 1.5
# How long the way down waits for the edits that tell members their jobs resume after the restart.
HELD_NOTICE_TIMEOUT_S = 5.0
# Tries per way of posting a result when the failure may pass; discord.py retries each try itself too.
PATH_TRIES = 2
# Pause before trying the same way again, times the number of tries so far.
RETRY_PAUSE_S = 2.0
# After a job could not be posted anywhere: wait this long before the whole delivery is tried again, one
# entry per new try (about nine hours in all); then only the next start tries again.
REDELIVERY_DELAYS_S = (60.0, 300.0, 1800.0, 7200.0, 21600.0)

# What a result posted in the channel after the token expired needs there, by the names Discord's settings
# show (docs/permissions.md).
CHANNEL_PERMISSION_NAMES = {
    "View Channels": discord.Permissions(view_channel=True),
    "Send Messages": discord.Permissions(send_messages=True),
    "Embed Links": discord.Permissions(embed_links=True),
    "Attach Files": discord.Permissions(attach_files=True),
}
CHANNEL_PERMISSIONS = discord.Permissions(sum(p.value for p in CHANNEL_PERMISSION_NAMES.values()))
# Discord's JSON error codes that mean the interaction token cannot be used any more.
TOKEN_DEAD_CODES = frozenset({10015, 10062, 50027})
# What a refusal means, for the owner.
REFUSALS = {
    10003: N_("the channel no longer exists"),
    10008: N_("its message was deleted"),
    10013: N_("Discord no longer knows your account"),
    50001: N_("I can no longer see the channel"),
    50007: N_("your DMs are closed to me"),
    50013: N_("I may not post or attach files in the channel"),
}


# The owner reads these reasons in /job (delivery_state), in their language: each is a catalogue key.
TOKEN_OVER = N_("the interaction's 15 minutes were over")


class Unusable(Exception):
    """A way of posting that cannot work now, found out before asking Discord."""


@dataclass(frozen=True)
class Failure:
    """Why one way of posting did not work."""

    path: str
    reason: str
    transient: bool = False
    token_dead: bool = False
    message_gone: bool = False

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# The ways of posting that use the interaction's token (the others use the bot's own).
TOKEN_PATHS = frozenset({"edit", "progress", "read-back"})


def classify(path: str, exc: BaseException) -> Failure:
    """Sort an error from Discord into 'may pass', 'token dead', 'message gone' or a plain refusal."""
    if isinstance(exc, discord.HTTPException):
        status, code = exc.status, exc.code
        if path in TOKEN_PATHS and (status == 401 or code in TOKEN_DEAD_CODES):
            return Failure(path, TOKEN_OVER, token_dead=True)
        if status == 401:
            return Failure(path, N_("Discord no longer accepts my token"))
        if status == 429:
            return Failure(path, N_("Discord kept rate limiting me"), transient=True)
        if status >= 500:
            return Failure(
                path, N_("Discord kept failing (HTTP {status})").format(status=status), transient=True
            )
        refused = N_("Discord refused (HTTP {status}, code {code})").format(status=status, code=code)
        return Failure(path, REFUSALS.get(code, refused), message_gone=code in (10003, 10008))
    return Failure(path, N_("the connection to Discord kept dropping"), transient=True)


@dataclass
class _Tracked:
    job: Job
    delivery: Delivery
    upload_limit: int
    step: tuple[int, int] | None = None
    images_done: int = 0
    # Why the job waits for a restart (the GPU failed under it), once the queue says so.
    held: str | None = None
    # The status text the message shows now, as far as this run knows.
    shown: str | None = None
    last_edit: float = 0.0
    dirty: bool = False
    # Set when an edit failed: progress is a courtesy, and the result must not queue behind more edits.
    progress_off: bool = False
    sending: bool = False
    editing: asyncio.Task[None] | None = field(default=None, repr=False)


class ResultDelivery:
    """Follows every job from queue to delivery; survives restarts through the store.

    A service the bot owns (bot.delivery), started once the queue exists and stopped before Discord's
    connection closes.
    """

    def __init__(self, bot: I2P2IBot) -> None:
        self.bot = bot
        self._tracked: dict[int, _Tracked] = {}
        self._early: dict[int, list[JobEvent]] = {}
        self._delivering: set[int] = set()
        # Why a finished job could not be posted anywhere (until it is, or the bot restarts and retries).
        self._undeliverable: dict[int, str] = {}
        # How many times a job's whole delivery has failed in this run, for the pause before the next try.
        self._failed_deliveries: dict[int, int] = {}
        self.redelivery_delays_s: tuple[float, ...] = REDELIVERY_DELAYS_S
        self._task: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        """Follow the queue's events, and (once connected) the jobs a restart left unfinished."""
        subscription = self._subscription = self.bot.queue.subscribe()
        self._task = self.bot.spawn(self._follow(subscription), name="i2p2i-deliverer")
        self.bot.spawn(self._recover(), name="i2p2i-recover-deliveries")

    async def stop(self) -> None:
        """Stop following, and tell members whose jobs wait for a restart that they do."""
        subscription = self._subscription
        if subscription is None:
            return
        subscription.close()
        if self._task is not None:
            self._task.cancel()
        await self._announce_held(subscription)

    async def _announce_held(self, subscription: Subscription) -> None:
        """On the way down, tell the members whose jobs the GPU failed under that they resume after the
        restart: the bot closes soon after the fault, often before the throttled edit's turn came."""
        while subscription.pending():
            event = subscription.get_nowait()
            tracked = self._tracked.get(event.job_id)
            if event.kind is EventKind.HELD and tracked is not None:
                tracked.held = event.error
        edits = []
        for tracked in self._tracked.values():
            text = status_text(tracked.job, None, held=tracked.held, locale=tracked.job.locale)
            if tracked.held is not None and not tracked.progress_off and tracked.shown != text:
                edits.append(self._edit_status(tracked, text))
        if edits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*edits, return_exceptions=True), HELD_NOTICE_TIMEOUT_S)

    def track(self, job: Job, delivery: Delivery, upload_limit: int) -> None:
        """Start following a job whose status message now exists; replay events that came first."""
        tracked = _Tracked(job, delivery, upload_limit)
        self._tracked[job.id] = tracked
        for event in self._early.pop(job.id, []):
            self._apply(event)

    def delivery_state(self, job: Job) -> str | None:
        """For /job: why a finished job's result is not posted; None when it was, or the job is not done."""
        if not job.status.finished or job.delivered_at is not None:
            return None
        if job.id in self._delivering:
            return N_("Being posted now.")
        reason = self.undeliverable(job)
        return (
            N_("Not posted yet.")
            if reason is None
            else N_("Could not be posted: {reason}.").format(reason=reason)
        )

    def undeliverable(self, job: Job | int) -> str | None:
        """Why the job's result could not be posted anywhere, when that is what happened (kept in the store
        across restarts; this run's latest failure first)."""
        job_id = job if isinstance(job, int) else job.id
        stored = None if isinstance(job, int) else job.delivery_error
        return self._undeliverable.get(job_id, stored)

    async def _recover(self) -> None:
        """After a restart: follow active jobs again and deliver finished ones that never were."""
        await self.bot.wait_until_ready()
        for job in self.bot.queue.active_jobs():
            if job.delivery.message_id is not None and job.id not in self._tracked:
                # The old interaction's upload limit is not kept; Discord's default is the floor.
                self.track(job, job.delivery, DEFAULT_UPLOAD_LIMIT)
        for job in await self.bot.store.undelivered_jobs():
            await self._deliver(job.id, DEFAULT_UPLOAD_LIMIT)

    async def _follow(self, subscription: Subscription) -> None:
        async for event in subscription:
            try:
                self._apply(event)
            except Exception:
                log.exception("could not handle %s for job %d", event.kind, event.job_id)

    def _apply(self, event: JobEvent) -> None:
        tracked = self._tracked.get(event.job_id)
        if event.kind is not EventKind.STEP:
            log.info("job %d %s (%d/%d images)", event.job_id, event.kind, event.images_done, event.count)
        if tracked is None:
            if event.kind is not EventKind.STEP:
                self._early.setdefault(event.job_id, []).append(event)
            return
        if event.kind.terminal:
            self._tracked.pop(event.job_id, None)
            editing = tracked.editing
            if editing is not None and not editing.done() and not tracked.sending:
                editing.cancel()  # only waiting for its turn: the result replaces it
            self.bot.spawn(
                self._deliver(event.job_id, tracked.upload_limit, after=editing),
                name=f"i2p2i-deliver-{event.job_id}",
            )
            return
        if event.kind is EventKind.STEP:
            tracked.step = (event.step, event.total_steps)
        elif event.kind is EventKind.IMAGE:
            tracked.images_done = event.images_done
        elif event.kind is EventKind.STARTED:
            tracked.job = _with_status(tracked.job, JobStatus.RUNNING)
        elif event.kind is EventKind.HELD:
            tracked.held = event.error
        self._schedule_edit(tracked)
        if event.kind in (EventKind.STARTED, EventKind.IMAGE):
            # The queue moved: everyone still waiting has a new position.
            for other in self._tracked.values():
                if other is not tracked and other.job.status is JobStatus.QUEUED:
                    self._schedule_edit(other)

    # -- progress ------------------------------------------------------------------------------------------

    def _schedule_edit(self, tracked: _Tracked) -> None:
        if tracked.progress_off:
            return
        tracked.dirty = True
        if tracked.editing is None or tracked.editing.done():
            tracked.editing = self.bot.spawn(
                self._edit_loop(tracked), name=f"i2p2i-progress-{tracked.job.id}"
            )

    async def _edit_loop(self, tracked: _Tracked) -> None:
        """One edit at a time per job, at most one per EDIT_INTERVAL_S; events in between are merged."""
        while tracked.dirty and not tracked.progress_off and tracked.job.id in self._tracked:
            wait = tracked.last_edit + EDIT_INTERVAL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            tracked.dirty = False
            tracked.last_edit = time.monotonic()
            text = status_text(
                tracked.job,
                self.bot.queue.position(tracked.job.id),
                locale=tracked.job.locale,
                step=tracked.step,
                images_done=tracked.images_done,
                held=tracked.held,
            )
            tracked.sending = True
            try:
                await self._edit_status(tracked, text)
            finally:
                tracked.sending = False

    async def _edit_status(self, tracked: _Tracked, text: str) -> None:
        delivery = tracked.delivery
        message_id = delivery.message_id
        if message_id is None:
            return
        try:
            if _token_alive(delivery):
                await self._webhook(delivery).edit_message(message_id, content=text)
            elif _own_post(tracked.job, delivery):
                await self._own_message(delivery, message_id).edit(content=text)
            else:
                return  # progress is a courtesy; after the token's life only the result is posted
            tracked.shown = text
        except ANSWER_ERRORS as exc:
            failure = classify("progress", exc)
            tracked.progress_off = True
            log.info(
                "progress edit for job %d failed (%s); progress stops, the result will still be posted",
                tracked.job.id,
                failure.reason,
            )
            tracked.delivery = await self._forget_dead_ends(tracked.job.id, delivery, failure)

    async def _forget_dead_ends(self, job_id: int, delivery: Delivery, failure: Failure) -> Delivery:
        """Drop a dead token or a deleted message from the job's delivery, so nothing tries them again."""
        if failure.token_dead:
            delivery = dataclasses.replace(delivery, interaction_token=None, token_expires_at=None)
        elif failure.message_gone:
            delivery = dataclasses.replace(delivery, message_id=None)
        else:
            return delivery
        await self.bot.store.set_delivery(job_id, delivery)
        return delivery

    def _own_message(self, delivery: Delivery, message_id: int) -> discord.PartialMessage:
        """A message the bot posted itself (a reply job's status message), edited through its channel."""
        assert delivery.channel_id is not None
        return self.bot.get_partial_messageable(delivery.channel_id).get_partial_message(message_id)

    def _webhook(self, delivery: Delivery) -> discord.Webhook:
        assert delivery.interaction_token is not None
        app_id = self.bot.application_id
        assert app_id is not None
        return discord.Webhook.partial(app_id, delivery.interaction_token, client=self.bot)

    # -- the result ----------------------------------------------------------------------------------------

    async def _deliver(
        self, job_id: int, upload_limit: int, *, after: asyncio.Task[None] | None = None
    ) -> None:
        """Post a finished job: edit its message while the token lives, else the channel, else a DM."""
        if job_id in self._delivering:
            return
        self._delivering.add(job_id)
        retry_in: float | None = None
        try:
            if after is not None:
                # A progress edit still in flight shares the webhook; its answer decides whether the token
                # is alive, and the result must land after it.
                await asyncio.wait({after})
            record = await self.bot.store.job_record(job_id)
            if record is None or record.job.delivered_at is not None or record.job.hidden_at is not None:
                return  # gone, posted already, or deleted by its owner before it could be
            job = record.job
            flagged = await self._flagged_policy(job)
            images = await asyncio.to_thread(self._load_images, job, record.images)
            files = await asyncio.to_thread(
                result_files, images, upload_limit, job_id=job.id, flagged=flagged
            )
            embed = result_embed(job, record.images, files)
            # A DM never shows flagged images: where the channel is gone, the result goes there without them.
            private = (embed, files)
            if flagged is not FlaggedPolicy.WITHHOLD and any(m.nsfw for m in record.images):
                withheld = await asyncio.to_thread(result_files, images, upload_limit, job_id=job.id)
                private = (result_embed(job, record.images, withheld), withheld)
            actions = offered_image_actions(self.bot, job)
            view = job_view(
                job, running=False, locale=job.locale, images=record.images, image_actions=actions
            )
            try:
                delivered, failures = await self._send_result(job, embed, files, view, private=private)
            except Exception:
                log.exception("delivering job %d failed on my side", job.id)
                delivered, failures = None, [Failure("bot", N_("an error on my side"))]
            if delivered:
                await self.bot.store.mark_delivered(job.id)
                self._undeliverable.pop(job.id, None)
                self._failed_deliveries.pop(job.id, None)
                log.info("job %d delivered (%s)", job.id, delivered)
                await self._point_to_result(job, delivered, failures)
            else:
                retry_in = self._next_retry_s(job.id)
                self._undeliverable[job.id] = _owner_reason(failures, retry_in)
                await self.bot.store.mark_undeliverable(job.id, self._undeliverable[job.id])
                log.error(
                    "job %d could not be delivered anywhere (%s); %s",
                    job.id,
                    "; ".join(str(f) for f in failures) or "there was nowhere to post it",
                    "it stays undelivered until the next start"
                    if retry_in is None
                    else f"trying again in {retry_in:g} s",
                )
        finally:
            self._delivering.discard(job_id)
        if retry_in is not None:
            self.bot.spawn(
                self._deliver_later(job_id, upload_limit, retry_in), name=f"i2p2i-redeliver-{job_id}"
            )

    def _next_retry_s(self, job_id: int) -> float | None:
        """How long until a job no way of posting took is tried again; None after the last scheduled try."""
        failed = self._failed_deliveries.get(job_id, 0)
        if failed >= len(self.redelivery_delays_s):
            return None
        self._failed_deliveries[job_id] = failed + 1
        return self.redelivery_delays_s[failed]

    async def _deliver_later(self, job_id: int, upload_limit: int, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self._deliver(job_id, upload_limit)

    async def _flagged_policy(self, job: Job) -> FlaggedPolicy:
        """What the job's flagged images get in its channel: its own policy, unless the channel or the
        server's setting has become stricter since it was asked."""
        if job.flagged_policy is FlaggedPolicy.WITHHOLD:
            return job.flagged_policy
        channel_id = job.delivery.channel_id or job.channel_id
        channel = self.bot.get_channel(channel_id) if channel_id is not None else None
        if channel is None and channel_id is not None:
            with contextlib.suppress(*ANSWER_ERRORS):
                channel = await self.bot.fetch_channel(channel_id)
        return job.flagged_policy.stricter(flagged_policy_in(self.bot, job.guild_id, channel))

    def _load_images(self, job: Job, stored: Any) -> list[tuple[Any, Image.Image]]:
        loaded = []
        for meta in stored:
            path = self.bot.store.image_path(job.id, meta.index)
            with contextlib.suppress(OSError), Image.open(path) as img:
                loaded.append((meta, img.convert("RGB")))
        return loaded

    async def _send_result(
        self,
        job: Job,
        embed: discord.Embed,
        files: ResultFiles,
        view: discord.ui.View | None,
        *,
        private: tuple[discord.Embed, ResultFiles],
    ) -> tuple[str | None, list[Failure]]:
        """Try each way of posting in turn; the way that worked (or None) and why the others did not.

        `embed` and `files` are for the job's channel, `private` for a DM to its owner.
        """
        delivery = job.delivery
        mention = f"<@{job.owner_id}>"
        done = tr(job.locale, "{member} job #{job} is done.", member=mention, job=job.id)
        content = done if job.status is JobStatus.COMPLETE else mention
        extra: dict[str, Any] = {"view": view} if view is not None else {}
        # Discord returns the message already sent with this nonce instead of posting a second one.
        nonce = f"i2p2i-job-{job.id}"
        failures: list[Failure] = []

        message_id = delivery.message_id
        by_webhook = _token_alive(delivery)
        if by_webhook and message_id is not None:
            job_message_id = message_id

            async def edit() -> None:
                if not _token_alive(delivery):  # discord.py may have slept out the token on 429s
                    raise Unusable(TOKEN_OVER)
                await self._webhook(delivery).edit_message(
                    job_message_id, content=content, embed=embed, attachments=files.files(), **extra
                )

            failure = await self._attempt("edit", job, edit)
            if failure is None:
                return "edited", failures
            failures.append(failure)
            by_webhook = not failure.token_dead
            if failure.message_gone:
                message_id = None
        elif message_id is not None and _own_post(job, delivery):
            own = self._own_message(delivery, message_id)

            async def edit_own() -> None:
                await own.edit(content=content, embed=embed, attachments=files.files(), **extra)

            failure = await self._attempt("edit", job, edit_own)
            if failure is None:
                return "edited", failures
            failures.append(failure)
            if failure.message_gone:
                message_id = None

        if message_id is not None:
            # An edit whose answer was lost may have been applied (in this try, or in one a kill or restart
            # cut short): look at the message before posting a second copy anywhere else.
            shown = await self._read_back(job, delivery, message_id, embed, by_webhook=by_webhook)
            if isinstance(shown, Failure):
                # Not knowing, posting could show the result twice: wait, and try again later (the token
                # is kept, so a try while it lives edits this same message).
                failures.append(shown)
                return None, failures
            if shown:
                return "edited", failures

        if delivery.interaction_token is not None and failures:
            # The result goes elsewhere now; if this run ends before the store hears of it, the next start
            # must not edit a second copy into this message. Pointing at the result still uses the token.
            await self.bot.store.set_delivery(
                job.id,
                dataclasses.replace(
                    delivery, interaction_token=None, token_expires_at=None, message_id=message_id
                ),
            )

        channel_id = delivery.channel_id or job.channel_id
        if channel_id is not None:

            async def post() -> None:
                channel = self.bot.get_channel(channel_id) or await self.bot.fetch_channel(channel_id)
                if not isinstance(channel, discord.abc.Messageable):
                    raise Unusable(N_("channel {channel} is not a text channel").format(channel=channel_id))
                _warn_missing_permissions(channel)
                await channel.send(content, embed=embed, files=files.files(), nonce=nonce, **extra)

            failure = await self._attempt("channel", job, post)
            if failure is None:
                return "channel", failures
            failures.append(failure)

        async def direct_message() -> None:
            user = self.bot.get_user(job.owner_id) or await self.bot.fetch_user(job.owner_id)
            note = tr(
                job.locale, "Your job #{job} could not be posted in its channel, so here it is.", job=job.id
            )
            dm_embed, dm_files = private
            await user.send(note, embed=dm_embed, files=dm_files.files(), nonce=nonce, **extra)

        failure = await self._attempt("dm", job, direct_message)
        if failure is None:
            return "dm", failures
        failures.append(failure)
        return None, failures

    async def _read_back(
        self, job: Job, delivery: Delivery, message_id: int, embed: discord.Embed, *, by_webhook: bool
    ) -> bool | Failure:
        """Whether the job's own message already shows its result; a Failure when Discord would not say.

        Read through the interaction's webhook while its token lives, else through the channel. Only the
        result puts an embed on a job's message, so its title is the mark. A refusal to read (the message or
        channel is gone, no right to read history) counts as not shown: no wait would change it, and a
        result never posted is worse than one posted twice.
        """
        found: list[discord.Message] = []
        failure: Failure | None = None
        if by_webhook:

            async def read_webhook() -> None:
                found.append(await self._webhook(delivery).fetch_message(message_id))

            failure = await self._attempt("read-back", job, read_webhook)
        channel_id = delivery.channel_id or job.channel_id
        if (failure is None and not by_webhook) or (failure is not None and failure.token_dead):
            if channel_id is None:
                return False

            async def read_channel() -> None:
                assert channel_id is not None
                messageable = self.bot.get_partial_messageable(channel_id)
                found.append(await messageable.fetch_message(message_id))

            failure = await self._attempt("channel read-back", job, read_channel)
        if failure is not None and failure.transient:
            return failure
        if failure is not None:
            log.info("could not read job %d's message back (%s); posting its result", job.id, failure.reason)
            return False
        shown = any(e.title == embed.title for e in found[0].embeds)
        if shown:
            log.info("job %d's message already shows its result: an edit's answer was lost", job.id)
        return shown

    async def _attempt(self, path: str, job: Job, send: Callable[[], Awaitable[None]]) -> Failure | None:
        """One way of posting, tried again only while its failure may pass; None when it worked."""
        failure: Failure | None = None
        for attempt in range(1, PATH_TRIES + 1):
            try:
                await send()
                return None
            except (Unusable, discord.ClientException) as exc:
                return Failure(path, str(exc))
            except ANSWER_ERRORS as exc:
                failure = classify(path, exc)
                log.info("job %d: %s failed (try %d): %s", job.id, path, attempt, exc)
            if not failure.transient or attempt == PATH_TRIES:
                break
            await asyncio.sleep(RETRY_PAUSE_S * attempt)
        return failure

    async def _point_to_result(self, job: Job, delivered: str, failures: list[Failure]) -> None:
        """The result went elsewhere while the job's own message still shows progress: say where, once."""
        delivery = job.delivery
        edit_failed = next((f for f in failures if f.path == "edit"), None)
        if delivered == "edited" or edit_failed is None or not edit_failed.transient:
            return
        if not _token_alive(delivery) or delivery.message_id is None:
            return
        if delivered == "channel":
            said = tr(
                job.locale, "Job #{job} is done: the result was posted below in this channel.", job=job.id
            )
        else:
            said = tr(job.locale, "Job #{job} is done: the result was posted to you by DM.", job=job.id)
        try:
            await self._webhook(delivery).edit_message(
                delivery.message_id,
                content=said,
                view=None,
            )
        except ANSWER_ERRORS as exc:
            log.info("could not point job %d's message at its result (%s)", job.id, exc)


def _warn_missing_permissions(channel: discord.abc.Messageable) -> None:
    """Name what an admin should grant when the bot lacks a permission a channel post needs.

    The post is still tried: the cached permissions may be stale, and Discord's answer decides.
    """
    if not isinstance(channel, discord.abc.GuildChannel):
        return
    held = channel.permissions_for(channel.guild.me)
    missing = [name for name, needed in CHANNEL_PERMISSION_NAMES.items() if not needed <= held]
    if missing:
        log.warning(
            "missing permissions in channel %s: %s (grant them to the bot's role there)",
            channel.id,
            ", ".join(missing),
        )


def _owner_reason(failures: list[Failure], retry_in_s: float | None) -> str:
    """One sentence for the owner: every way that failed, most telling first, and when it is tried next."""
    reasons = [f.reason for f in failures if f.path != "edit"] or [f.reason for f in failures]
    text = LIST_AND.join(dict.fromkeys(reasons)) or N_("there was nowhere to post it")
    if retry_in_s is None:
        return N_("{reasons}. It will be tried again when the bot restarts").format(reasons=text)
    # A Discord timestamp: every reader sees it in their own time zone, relative to now.
    when = f"<t:{int(time.time() + retry_in_s)}:R>"
    return N_("{reasons}. It will be tried again {when}, and when the bot restarts").format(
        reasons=text, when=when
    )


def _own_post(job: Job, delivery: Delivery) -> bool:
    """Whether the job's message is one the bot posted itself, which it may edit at any time: the status
    reply of a job asked for by a reply (an interaction's message goes with its token)."""
    return job.origin == FROM_REPLY and delivery.channel_id is not None and delivery.message_id is not None


def _token_alive(delivery: Delivery) -> bool:
    expires = delivery.token_expires_at
    return bool(delivery.interaction_token) and expires is not None and time.time() < expires - TOKEN_MARGIN_S


def _with_status(job: Job, status: JobStatus) -> Job:
    return dataclasses.replace(job, status=status)
