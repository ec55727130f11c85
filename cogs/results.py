"""Delivery: follows every job from queue to result, editing its message and posting its images.

While the interaction token lives, the job's own message is edited; after that the result goes to the
channel with a mention of the owner, then by DM; failing all three, the job stays undelivered in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import discord
from discord.ext import commands
from PIL import Image

from cogs.cards import result_embed, result_files, status_text
from cogs.generation import DEFAULT_UPLOAD_LIMIT, JobButton, job_view
from i2p2i_bot.jobs import Delivery, EventKind, Job, JobEvent, JobStatus

if TYPE_CHECKING:
    from i2p2i_bot.app import I2P2IBot

log = logging.getLogger("i2p2i.results")

# Stop using an interaction token a little before it expires, so no edit races the expiry.
TOKEN_MARGIN_S = 30
# Progress edits on one message are at least this far apart.
EDIT_INTERVAL_S = 1.5


@dataclass
class _Tracked:
    job: Job
    delivery: Delivery
    upload_limit: int
    step: tuple[int, int] | None = None
    images_done: int = 0
    last_edit: float = 0.0
    dirty: bool = False
    editing: asyncio.Task[None] | None = field(default=None, repr=False)


class Results(commands.Cog):
    """Follows every job from queue to delivery; survives restarts through the store."""

    def __init__(self, bot: I2P2IBot) -> None:
        self.bot = bot
        self._tracked: dict[int, _Tracked] = {}
        self._early: dict[int, list[JobEvent]] = {}
        self._delivering: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    async def cog_load(self) -> None:
        self._subscription = self.bot.queue.subscribe()
        self._task = self.bot.spawn(self._follow(), name="i2p2i-deliverer")
        self.bot.spawn(self._recover(), name="i2p2i-recover-deliveries")

    async def cog_unload(self) -> None:
        self._subscription.close()
        if self._task is not None:
            self._task.cancel()

    def track(self, job: Job, delivery: Delivery, upload_limit: int) -> None:
        """Start following a job whose status message now exists; replay events that came first."""
        tracked = _Tracked(job, delivery, upload_limit)
        self._tracked[job.id] = tracked
        for event in self._early.pop(job.id, []):
            self._apply(event)

    async def _recover(self) -> None:
        """After a restart: follow active jobs again and deliver finished ones that never were."""
        await self.bot.wait_until_ready()
        for job in self.bot.queue.active_jobs():
            if job.delivery.message_id is not None and job.id not in self._tracked:
                # The old interaction's upload limit is not kept; Discord's default is the floor.
                self.track(job, job.delivery, DEFAULT_UPLOAD_LIMIT)
        for job in await self.bot.store.undelivered_jobs():
            await self._deliver(job.id, DEFAULT_UPLOAD_LIMIT)

    async def _follow(self) -> None:
        async for event in self._subscription:
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
            limit = tracked.upload_limit
            self.bot.spawn(self._deliver(event.job_id, limit), name=f"i2p2i-deliver-{event.job_id}")
            return
        if event.kind is EventKind.STEP:
            tracked.step = (event.step, event.total_steps)
        elif event.kind is EventKind.IMAGE:
            tracked.images_done = event.images_done
        elif event.kind is EventKind.STARTED:
            tracked.job = _with_status(tracked.job, JobStatus.RUNNING)
        self._schedule_edit(tracked)
        if event.kind in (EventKind.STARTED, EventKind.IMAGE):
            # The queue moved: everyone still waiting has a new position.
            for other in self._tracked.values():
                if other is not tracked and other.job.status is JobStatus.QUEUED:
                    self._schedule_edit(other)

    def _schedule_edit(self, tracked: _Tracked) -> None:
        tracked.dirty = True
        if tracked.editing is None or tracked.editing.done():
            tracked.editing = self.bot.spawn(
                self._edit_loop(tracked), name=f"i2p2i-progress-{tracked.job.id}"
            )

    async def _edit_loop(self, tracked: _Tracked) -> None:
        while tracked.dirty and tracked.job.id in self._tracked:
            wait = tracked.last_edit + EDIT_INTERVAL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            tracked.dirty = False
            tracked.last_edit = time.monotonic()
            text = status_text(
                tracked.job,
                self.bot.queue.position(tracked.job.id),
                step=tracked.step,
                images_done=tracked.images_done,
            )
            await self._edit_status(tracked, text)

    async def _edit_status(self, tracked: _Tracked, text: str) -> None:
        delivery = tracked.delivery
        if not _token_alive(delivery) or delivery.message_id is None:
            return  # progress is a courtesy; after the token's life only the result is posted
        try:
            await self._webhook(delivery).edit_message(delivery.message_id, content=text)
        except discord.HTTPException as exc:
            log.info(
                "progress edit for job %d failed (%s); the result will still be delivered",
                tracked.job.id,
                exc,
            )

    def _webhook(self, delivery: Delivery) -> discord.Webhook:
        assert delivery.interaction_token is not None
        app_id = self.bot.application_id
        assert app_id is not None
        return discord.Webhook.partial(app_id, delivery.interaction_token, client=self.bot)

    async def _deliver(self, job_id: int, upload_limit: int) -> None:
        """Post a finished job: edit its message while the token lives, else the channel, else a DM."""
        if job_id in self._delivering:
            return
        self._delivering.add(job_id)
        try:
            record = await self.bot.store.job_record(job_id)
            if record is None or record.job.delivered_at is not None:
                return
            job = record.job
            images = await asyncio.to_thread(self._load_images, job, record.images)
            files = await asyncio.to_thread(result_files, images, upload_limit, job_id=job.id)
            embed = result_embed(job, record.images, files)
            view = job_view(job, running=False) if job.status is JobStatus.COMPLETE else None
            delivered = await self._send_result(job, embed, files, view)
            if delivered:
                await self.bot.store.mark_delivered(job.id)
                log.info("job %d delivered (%s)", job.id, delivered)
            else:
                log.error("job %d could not be delivered anywhere; it stays undelivered", job.id)
        finally:
            self._delivering.discard(job_id)

    def _load_images(self, job: Job, stored: Any) -> list[tuple[Any, Image.Image]]:
        loaded = []
        for meta in stored:
            path = self.bot.store.image_path(job.id, meta.index)
            with contextlib.suppress(OSError), Image.open(path) as img:
                loaded.append((meta, img.convert("RGB")))
        return loaded

    async def _send_result(
        self, job: Job, embed: discord.Embed, files: Any, view: discord.ui.View | None
    ) -> str | None:
        delivery = job.delivery
        mention = f"<@{job.owner_id}>"
        content = f"{mention} job #{job.id} is done." if job.status is JobStatus.COMPLETE else f"{mention}"
        extra: dict[str, Any] = {"view": view} if view is not None else {}
        if _token_alive(delivery) and delivery.message_id is not None:
            try:
                await self._webhook(delivery).edit_message(
                    delivery.message_id, content=content, embed=embed, attachments=files.files(), **extra
                )
                return "edited"
            except discord.HTTPException as exc:
                log.info("editing job %d's message failed (%s); posting in the channel", job.id, exc)
        channel_id = delivery.channel_id or job.channel_id
        if channel_id is not None:
            try:
                channel = self.bot.get_channel(channel_id) or await self.bot.fetch_channel(channel_id)
                if isinstance(channel, discord.abc.Messageable):
                    await channel.send(content, embed=embed, files=files.files(), **extra)
                    return "channel"
            except discord.HTTPException as exc:
                log.info("channel %s unavailable for job %d (%s); trying a DM", channel_id, job.id, exc)
        try:
            user = self.bot.get_user(job.owner_id) or await self.bot.fetch_user(job.owner_id)
            note = f"Your job #{job.id} could not be posted in its channel, so here it is."
            await user.send(note, embed=embed, files=files.files(), **extra)
            return "dm"
        except discord.HTTPException as exc:
            log.info("DM to user %d failed for job %d (%s)", job.owner_id, job.id, exc)
        return None


def _token_alive(delivery: Delivery) -> bool:
    expires = delivery.token_expires_at
    return bool(delivery.interaction_token) and expires is not None and time.time() < expires - TOKEN_MARGIN_S


def _with_status(job: Job, status: JobStatus) -> Job:
    return dataclasses.replace(job, status=status)


async def setup(bot: I2P2IBot) -> None:
    bot.add_dynamic_items(JobButton)
    await bot.add_cog(Results(bot))
