"""The bot's side of remote GPU workers: batches out through Redis (BullMQ), results back into the queue.

Used instead of the local JobRunner when `queue.backend = "redis"`. The bot stays the fair scheduler: a
batch is formed only when a worker has room for it (live workers + 1 in flight at most), so the ring's
order is not frozen into a deep remote queue. Each try of a batch is a BullMQ job with the id
`run-batch:attempt`; BullMQ gives it a lock the worker renews, puts it back when the worker dies, and
refuses the finish of a worker that lost its lock. Results are taken in once: the batch leaves the table
of batches out (on the event loop, with no wait between the check and the removal) before the queue
records it, and the queue's own table of outstanding batches refuses a second result.

QueueEvents bring progress and results at once; a poll of each batch's state every `poll_s` catches
what events miss (an outage of Redis, a listener that restarted) and batches Redis lost (sent again as
the next attempt). Nothing here imports torch or discord.

Workers differ in what they can run (the guides they offer, the model presets and LoRA files they have):
each says so in its record, and workers alike share one BullMQ queue (worker_capabilities.py). A preset
counts only with the weights the bot's config gives it: a worker whose config gives the name other weights
gets none of its batches, and the bot warns once per worker and preset and tells /admin queue. The ring
picks a batch only among the jobs a live worker with room can run, so fairness holds among what can run
now and a job nobody live can run waits, saying why, instead of failing; the batch goes to the queue of
workers that can make it (of several, the least busy, then the one that offers least). A guided batch's
source images go into Redis with it, for workers that do not share the bot's data folder
(remote_sources.py).

A restarted bot takes back what its last run sent before it sends anything: each batch in Redis names its
(job, image) items, and the queue counts those still waiting as out again (JobQueue.adopt). A batch made
meanwhile is taken in, one on a worker or waiting for one is followed, and the images of one that failed
or is gone wait in the ring and go out again. A stopping bot leaves its batches in Redis for that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import redis.asyncio as redis
from bullmq import Job as BullJob
from bullmq import Queue, QueueEvents
from PIL import Image

from i2p2i_bot.batches import Batch, BatchFailure, BatchResult, BatchSource, FailureKind, GeneratedImage
from i2p2i_bot.config import QueueSettings
from i2p2i_bot.i18n import N_
from i2p2i_bot.presets import Presets
from i2p2i_bot.remote_sources import SourceUnavailable, carry
from i2p2i_bot.remote_wire import (
    PERMANENT,
    QUEUES_KEY,
    RESULT_TTL_S,
    WORKER_KEY_PREFIX,
    ResultRefs,
    WireError,
    attempt_of,
    batch_payload,
    cancel_key,
    job_id,
    parse_failure,
    payload_items,
    sha256,
)
from i2p2i_bot.request import GenerationParams
from i2p2i_bot.worker_capabilities import (
    BASE_QUEUE,
    Capabilities,
    Mismatch,
    preset_weights,
    waiting_reason,
)

log = logging.getLogger(__name__)

# What /queue and the health file say while Redis cannot be reached.
UNREACHABLE = N_("GPU workers unreachable")
# Errors that mean Redis is out of reach (or answered as a server that is still loading).
REDIS_DOWN = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    OSError,
    asyncio.TimeoutError,
)
_LATENCIES_KEPT = 10_000
# BullMQ states of a batch an earlier run sent, in the order they are taken back: a made batch first, so
# that its images count rather than a later try's of the same images.
_STATES_TAKEN_BACK = ("completed", "active", "waiting", "prioritized", "delayed", "paused")
# What a stop may take beyond its grace period: ending the helper tasks, then closing each connection.
CLOSE_S = 5.0
_RECANCEL_S = 0.1


class AdoptingSource(BatchSource, Protocol):
    async def next_batch(self, can_run: Callable[[GenerationParams], bool] | None = None) -> Batch | None:
        """The next batch among the jobs `can_run` accepts (JobQueue.next_batch)."""
        ...

    def reconsider(self) -> None:
        """Plan again: what `can_run` accepts has changed."""
        ...

    def set_blocker(self, blocker: Callable[[GenerationParams], str | None] | None) -> None:
        """Say why nothing can make a job's images now (JobQueue.set_blocker)."""
        ...

    async def adopt(self, items: Sequence[tuple[int, int]]) -> Batch | None:
        """Count again as out the images of a batch an earlier run sent that still wait (JobQueue.adopt)."""
        ...


@dataclass(frozen=True)
class _Group:
    """Live workers alike: what they can run, and how many there are."""

    capabilities: Capabilities
    workers: int


@dataclass
class _Sent:
    batch: Batch
    attempt: int
    made_at: float
    enqueued: bool = False
    started_at: float | None = None
    bull_id: str = field(default="")
    # The BullMQ queue it went to: that of the workers that can make it.
    queue: str = BASE_QUEUE
    # For a batch taken back after a restart: which of the images its worker makes are this batch's, in
    # order (the others were stored before the restart, or their jobs are gone). None: all of them.
    positions: tuple[int, ...] | None = None


class RemoteRunner:
    """Feeds the queue's batches to GPU workers through Redis and hands their results back to the queue."""

    def __init__(
        self,
        source: AdoptingSource,
        settings: QueueSettings,
        *,
        presets: Presets,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sources_dir: Path | None = None,
    ) -> None:
        """`presets` are the bot's: a batch needs its preset with the weights they give it. `sources_dir`
        holds the guide sources the bot keeps (Settings.sources_path); None: none."""
        self._source = source
        self._weights = preset_weights(presets)
        self._sources_dir = sources_dir
        self._url = settings.redis_url
        self._timeout_s = settings.job_timeout_s
        self._poll_s = poll_s
        self._clock = clock
        self._run = str(int(time.time() * 1000))
        self._sent: dict[str, _Sent] = {}
        self._taking: set[str] = set()
        # Jobs the bot is done with that Redis still holds because a worker had them locked, with their
        # queues; removed once the worker lets go (it stops a batch the bot gave up on at its next step).
        self._unremoved: dict[str, str] = {}
        self._room = asyncio.Event()
        self._closed = False
        # Set when run() ends: the helper loops stop at their next turn even if a cancellation is lost.
        self._ending = False
        self._grace_s: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._helpers: set[asyncio.Task[Any]] = set()
        self._client: redis.Redis | None = None
        self._text: redis.Redis | None = None
        self._queues: dict[str, Queue] = {}
        # The live workers by the queue they take batches from, as the last watch found them.
        self._groups: dict[str, _Group] = {}
        self._last_events: dict[str, str] = {}
        self.live_workers = 0
        # The presets live workers have with other weights than the bot's (they get none of their batches),
        # and the (worker, preset, weights) already warned of, so each is logged once.
        self.mismatches: tuple[Mismatch, ...] = ()
        self._warned: set[tuple[str, Mismatch]] = set()
        # Why the workers cannot be reached now, for /queue and the health file; None while they can.
        self.problem: str | None = None
        # Seconds from a batch's forming to a worker starting it, most recent last (for the benchmark).
        self.start_latencies_s: deque[float] = deque(maxlen=_LATENCIES_KEPT)
        self.batches_run = 0

    # -- the runner's interface (as JobRunner's) -------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="i2p2i-remote-runner")
            self._task.add_done_callback(_log_failure)
        return self._task

    def request_stop(self, grace_s: float | None = None) -> None:
        self._closed = True
        self._grace_s = grace_s
        self._source.close()
        self._room.set()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop sending; wait up to grace_s for the batches out, then close. With a grace period this
        returns within grace_s + 2 * CLOSE_S whatever Redis does; the batches still out stay in Redis,
        where the next start takes them back."""
        self.request_stop(grace_s)
        task = self._task
        if task is None:
            return
        limit_s = None if grace_s is None else grace_s + 2 * CLOSE_S
        done, _ = await asyncio.wait({task}, timeout=limit_s)
        if not done:
            log.error("the remote runner did not stop within %g s; leaving it behind", limit_s)
            task.cancel()

    @property
    def in_flight(self) -> int:
        return len(self._sent)

    async def run(self) -> None:
        self._client = redis.from_url(self._url, socket_connect_timeout=5, socket_timeout=15)
        self._text = redis.from_url(
            self._url, decode_responses=True, socket_connect_timeout=5, socket_timeout=15
        )
        try:
            await self._take_back()
            self._spawn(self._watch(), "i2p2i-remote-watch")
            await self._feed()
            await self._drain()
        finally:
            self._ending = True
            await self._end_helpers()
            # Their jobs stay in Redis, where the next start finds them (made or still on a worker).
            for sent in list(self._sent.values()):
                await self._hand_back(
                    sent, BatchFailure("the bot stopped", FailureKind.INTERRUPTED), forget=False
                )
            for name, bull in self._queues.items():
                await _close_within(bull.close(), f"the BullMQ queue {name}")
            await _close_within(self._client.aclose(), "the Redis client")

    async def _end_helpers(self) -> None:
        """Cancel the helper tasks and wait for them, for at most CLOSE_S.

        A cancellation alone is not enough: on Python 3.11, asyncio.wait_for (which redis-py wraps around
        every command it sends) drops a cancellation that arrives as the command completes, and the
        helper goes on. So each is cancelled again until it ends, and the loops also check `_ending`.
        """
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + CLOSE_S
        while self._helpers and loop.time() < give_up_at:
            for task in list(self._helpers):
                task.cancel()
            await asyncio.wait(list(self._helpers), timeout=_RECANCEL_S)
        if self._helpers:
            names = ", ".join(sorted(task.get_name() for task in self._helpers))
            log.error("left behind helper tasks that would not stop within %g s: %s", CLOSE_S, names)

    # -- sending ---------------------------------------------------------------------------------------

    async def _feed(self) -> None:
        """Form a batch each time a worker has room for one, among the jobs such a worker can run, and
        send it to the queue of the workers that can make it."""
        while not self._closed:
            if self.problem is not None or not any(self._room_on(name) for name in self._groups):
                self._room.clear()
                await self._room.wait()
                continue
            batch = await self._source.next_batch(self._can_send)
            if batch is None:
                return
            queue = self._queue_for(batch.params)
            if queue is None:  # its workers went away while the batch was formed: its images wait again
                gone = BatchFailure("no GPU worker can make it now", FailureKind.INTERRUPTED)
                await self._source.batch_result(batch, gone)
                continue
            sent = _Sent(batch, 1, self._clock(), queue=queue)
            sent.bull_id = job_id(self._run, batch.id, sent.attempt)
            self._sent[sent.bull_id] = sent
            await self._enqueue(sent)

    def _can_send(self, params: GenerationParams) -> bool:
        return self.problem is None and self._queue_for(params) is not None

    def _room_on(self, queue: str) -> bool:
        """Whether the workers of a queue have room: one batch each, and one more waiting for the first
        of them to be free."""
        group = self._groups.get(queue)
        if group is None:
            return False
        out = sum(1 for sent in self._sent.values() if sent.queue == queue)
        return out < group.workers + 1

    def _queue_for(self, params: GenerationParams) -> str | None:
        """The queue of live workers with room that can run these params: of those, the one with the
        fewest batches out per worker, then the one that offers least (keeping the others for what only
        they can make); None when there is none."""
        best: tuple[float, int, str] | None = None
        for name, group in self._groups.items():
            if not group.capabilities.can_run(params, self._weights) or not self._room_on(name):
                continue
            out = sum(1 for sent in self._sent.values() if sent.queue == name)
            rank = (out / group.workers, group.capabilities.size, name)
            if best is None or rank < best:
                best = rank
        return None if best is None else best[2]

    def _bull(self, name: str) -> Queue:
        """The BullMQ queue of this name, opened on first use."""
        bull = self._queues.get(name)
        if bull is None:
            assert self._text is not None
            bull = self._queues[name] = Queue(name, {"connection": self._text})
        return bull

    def _wake(self) -> None:
        """Room or workers changed: the feed looks again, and the queue plans again."""
        self._room.set()
        self._source.reconsider()

    async def _take_back(self) -> None:
        """Before sending anything, take back the batches an earlier run sent; wait while Redis is down."""
        while not self._closed:
            try:
                await self._adopt_all()
                return
            except REDIS_DOWN as exc:
                self._unreachable(exc)
            await asyncio.sleep(self._poll_s)

    async def _adopt_all(self) -> None:
        assert self._client is not None
        names = {BASE_QUEUE, *(_text(name) for name in await self._client.smembers(QUEUES_KEY))}
        found: dict[str, tuple[str, BullJob, str]] = {}
        for name in sorted(names):
            for state in (*_STATES_TAKEN_BACK, "failed"):
                for job in await self._bull(name).getJobs([state], 0, -1, True):
                    if job is not None and job.id is not None:
                        found.setdefault(str(job.id), (state, job, name))
        adopted = 0
        for bull_id, (state, job, queue) in found.items():
            if bull_id in self._sent:
                continue
            batch = None
            items: tuple[tuple[int, int], ...] = ()
            if state != "failed":  # a failed batch's images wait in the ring already
                with contextlib.suppress(WireError):
                    items = payload_items(job.data)
                    batch = await self._source.adopt(items)
            if batch is None:
                await self._discard(bull_id, queue, job.returnvalue if state == "completed" else None)
                continue
            kept = {(item.job_id, item.index) for item in batch.items}
            sent = _Sent(
                batch, attempt_of(bull_id), self._clock(), enqueued=True, bull_id=bull_id, queue=queue
            )
            sent.positions = tuple(i for i, item in enumerate(items) if item in kept)
            if state == "active":
                sent.started_at = sent.made_at
            self._sent[bull_id] = sent
            self._listen_to(queue)
            adopted += 1
            log.info("took back batch %s (%s, %d images) from the last run", bull_id, state, len(kept))
        if found:
            log.info("found %d batches of the last run in Redis; %d still wanted", len(found), adopted)

    async def _discard(self, bull_id: str, queue: str, returnvalue: Any) -> None:
        """Drop a job of an earlier run that nothing wants, and its PNGs if it made any."""
        assert self._client is not None
        await self._cancel(bull_id)
        await self._forget(bull_id, queue)
        with contextlib.suppress(WireError, ValueError):
            keys = [ref.key for ref in ResultRefs.from_json(returnvalue).images] if returnvalue else []
            if keys:
                await self._client.delete(*keys)

    async def _enqueue(self, sent: _Sent) -> None:
        """Send a batch to its queue, its guide sources first (into Redis, for workers elsewhere)."""
        assert self._client is not None
        names = [spec.guide_source for spec in sent.batch.specs if spec.guide_source is not None]
        try:
            sources = await carry(self._client, self._sources_dir, names)
            await self._client.sadd(QUEUES_KEY, sent.queue)
            payload = batch_payload(sent.batch, sources)
            self._listen_to(sent.queue)
            await self._bull(sent.queue).add("batch", payload, {"jobId": sent.bull_id, "attempts": 1})
        except SourceUnavailable as exc:
            log.warning("batch %s: %s", sent.bull_id, exc)
            await self._hand_back(sent, BatchFailure(str(exc), FailureKind.PERMANENT), forget=False)
            return
        except REDIS_DOWN as exc:
            self._unreachable(exc)
            return
        sent.enqueued = True

    async def _drain(self) -> None:
        """After a stop, wait up to the grace period for the batches that are out."""
        give_up_at = None if self._grace_s is None else self._clock() + self._grace_s
        while self._sent:
            self._room.clear()
            wait_s = None if give_up_at is None else give_up_at - self._clock()
            if wait_s is not None and wait_s <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), wait_s)

    # -- hearing back ----------------------------------------------------------------------------------

    def _listen_to(self, queue: str) -> None:
        """Follow a queue's events from now on (once per queue)."""
        if queue not in self._last_events:
            self._last_events[queue] = "$"
            self._spawn(self._listen(queue), f"i2p2i-remote-events-{queue}")

    async def _listen(self, queue: str) -> None:
        """Follow a queue's BullMQ events; a listener that loses Redis is started again where it left off."""
        while not self._ending:
            conn = redis.from_url(self._url, decode_responses=True, socket_connect_timeout=5)
            events = QueueEvents(
                queue,
                {
                    "connection": conn,
                    "autorun": False,
                    "lastEventId": self._last_events[queue],
                    "blockingTimeout": 1000,
                },
            )
            events.on("active", self._on_event(queue, self._on_active))
            events.on("progress", self._on_event(queue, self._on_progress))
            events.on("completed", self._on_event(queue, self._on_completed))
            events.on("failed", self._on_event(queue, self._on_failed))
            events.on("error", lambda error, *_: self._unreachable(error))
            try:
                await events.run()
            except REDIS_DOWN as exc:
                self._unreachable(exc)
            finally:
                with contextlib.suppress(Exception):
                    await events.close()
            await asyncio.sleep(self._poll_s)

    def _on_event(self, queue: str, handler: Callable[[dict[str, Any]], None]) -> Callable[..., None]:
        def on(args: dict[str, Any], entry_id: str, *_: Any) -> None:
            self._last_events[queue] = entry_id
            handler(args)

        return on

    def _on_active(self, args: dict[str, Any]) -> None:
        sent = self._sent.get(str(args.get("jobId")))
        if sent is not None:
            self._started(sent)

    def _on_progress(self, args: dict[str, Any]) -> None:
        sent = self._sent.get(str(args.get("jobId")))
        data = args.get("data")
        if sent is not None and isinstance(data, dict):
            self._started(sent)
            with contextlib.suppress(KeyError, TypeError, ValueError):
                self._source.batch_progress(sent.batch, int(data["step"]), int(data["total"]))

    def _on_completed(self, args: dict[str, Any]) -> None:
        bull_id = str(args.get("jobId"))
        if bull_id in self._sent:
            self._spawn(self._take(bull_id, args.get("returnvalue")), "i2p2i-remote-result")

    def _on_failed(self, args: dict[str, Any]) -> None:
        bull_id = str(args.get("jobId"))
        if bull_id in self._sent:
            self._spawn(self._failed(bull_id, str(args.get("failedReason") or "")), "i2p2i-remote-result")

    def _started(self, sent: _Sent) -> None:
        if sent.started_at is None:
            sent.started_at = self._clock()
            self.start_latencies_s.append(sent.started_at - sent.made_at)

    async def _watch(self) -> None:
        """Every poll_s: find the live workers and what they can run, send what could not be sent, check
        each batch's state."""
        assert self._client is not None
        while not self._ending:
            try:
                workers = await self._find_workers()
                for bull_id, queue in list(self._unremoved.items()):
                    await self._forget(bull_id, queue)
                for sent in list(self._sent.values()):
                    if not sent.enqueued:
                        await self._enqueue(sent)
                        continue
                    await self._check(sent)
                if self.problem is not None:
                    log.info("Redis can be reached again; %d GPU workers are live", workers)
                self.problem = None
            except REDIS_DOWN as exc:
                self._unreachable(exc)
            self._wake()
            await asyncio.sleep(self._poll_s)

    async def _find_workers(self) -> int:
        """Read the live workers' records: group them by queue, follow each queue, and tell the queue why
        the jobs that none of them can run wait. Returns how many are live."""
        assert self._text is not None
        keys = [key async for key in self._text.scan_iter(match=WORKER_KEY_PREFIX + "*", count=100)]
        groups: dict[str, _Group] = {}
        mismatches: dict[Mismatch, None] = {}
        warned: set[tuple[str, Mismatch]] = set()
        for key in keys:
            record = await self._text.hgetall(key)
            if not record:
                continue  # it expired between the scan and the read
            capabilities = Capabilities.from_record(cast(dict[str, str], record))
            # The queue the worker takes from is the one its capabilities name: a record that says another
            # (a different version's) is not trusted to run what this bot sends there.
            queue = capabilities.queue if record.get("queue", BASE_QUEUE) == capabilities.queue else None
            if queue is None:
                continue
            found = groups.get(queue)
            groups[queue] = _Group(capabilities, 1 if found is None else found.workers + 1)
            for mismatch in capabilities.mismatches(self._weights):
                mismatches[mismatch] = None
                seen = (key, mismatch)
                warned.add(seen)
                if seen not in self._warned:
                    log.warning(
                        "GPU worker %s has preset %s as %s, the bot as %s: it gets no jobs of %s",
                        key.removeprefix(WORKER_KEY_PREFIX),
                        mismatch.preset,
                        mismatch.worker,
                        mismatch.bot,
                        mismatch.preset,
                    )
        # Only live workers' warnings are kept: a worker's id is new at each start.
        self._warned = warned
        self.mismatches = tuple(mismatches)
        if groups.keys() != self._groups.keys():
            log.info(
                "live GPU workers: %s",
                "; ".join(
                    f"{g.workers} with presets {', '.join(g.capabilities.preset_names) or 'none'}, guides "
                    f"{', '.join(g.capabilities.guides) or 'none'}, "
                    f"{len(g.capabilities.loras)} LoRAs"
                    for g in groups.values()
                )
                or "none",
            )
        self._groups = groups
        for queue in groups:
            self._listen_to(queue)
        live = [group.capabilities for group in groups.values()]
        self._source.set_blocker(lambda params: waiting_reason(params, live, self._weights))
        self.live_workers = sum(group.workers for group in groups.values())
        return self.live_workers

    async def _check(self, sent: _Sent) -> None:
        bull = self._bull(sent.queue)
        bull_id = sent.bull_id
        state = await bull.getJobState(bull_id)
        if bull_id not in self._sent or bull_id in self._taking:
            return
        if state == "completed":
            job = await BullJob.fromId(bull, bull_id)
            if job is not None:
                self._spawn(self._take(bull_id, job.returnvalue), "i2p2i-remote-result")
        elif state == "failed":
            job = await BullJob.fromId(bull, bull_id)
            reason = job.failedReason if job is not None else ""
            self._spawn(
                self._failed(bull_id, reason or "the batch failed on a worker"), "i2p2i-remote-result"
            )
        elif state == "unknown":  # Redis lost it (a flush, a restart without AOF): send it again
            log.warning("batch %s is gone from Redis; sending it again", bull_id)
            del self._sent[bull_id]
            again = _Sent(sent.batch, sent.attempt + 1, sent.made_at, queue=sent.queue)
            again.bull_id = job_id(self._run, sent.batch.id, again.attempt)
            self._sent[again.bull_id] = again
            await self._enqueue(again)
        elif state == "active":
            self._started(sent)
        elif (
            state in ("waiting", "prioritized", "delayed")
            and sent.queue not in self._groups
            # Every worker that could take it is gone: its images wait in the ring again, for a worker
            # that can make them (unless one took it meanwhile, when Redis refuses to remove it).
            and await bull.remove(bull_id) == 1
            and bull_id in self._sent
        ):
            log.warning("batch %s: no live worker takes from %s; taking it back", bull_id, sent.queue)
            gone = BatchFailure("its GPU workers went away", FailureKind.INTERRUPTED)
            await self._hand_back(sent, gone, forget=False)
        if sent.started_at is not None and self._clock() - sent.started_at > self._timeout_s:
            log.error("batch %s took longer than %g s; failing its jobs", bull_id, self._timeout_s)
            reason = f"generation took longer than {self._timeout_s:g} s and was abandoned"
            # Taken out before the cancel is sent: the worker's failure that the cancel causes must not
            # be handed back in its place, with another reason.
            if self._sent.pop(bull_id, None) is None:
                return
            await self._cancel(bull_id)
            await self._hand_back(sent, BatchFailure(reason, FailureKind.PERMANENT), popped=True)

    async def _take(self, bull_id: str, returnvalue: Any) -> None:
        """Fetch a finished batch's PNGs, check them, and hand them to the queue once."""
        if bull_id not in self._sent or bull_id in self._taking:
            return
        assert self._client is not None
        self._taking.add(bull_id)
        keys: list[str] = []
        try:
            try:
                refs = ResultRefs.from_json(returnvalue)
            except (WireError, ValueError) as exc:
                log.error("batch %s came back malformed: %s", bull_id, exc)
                outcome: BatchResult | BatchFailure = BatchFailure("a GPU worker sent back a broken result")
            else:
                keys = [ref.key for ref in refs.images]
                positions = self._sent[bull_id].positions
                if positions is not None and max(positions) < len(refs.images):
                    refs = dataclasses.replace(refs, images=tuple(refs.images[i] for i in positions))
                wanted = [ref.key for ref in refs.images]
                try:
                    blobs = cast(list[bytes | None], await self._client.mget(wanted) if wanted else [])
                except REDIS_DOWN as exc:
                    self._unreachable(exc)
                    return  # the watch tries again once Redis is back
                outcome = await asyncio.to_thread(_result, self._sent[bull_id].batch, refs, blobs)
            sent = self._sent.pop(bull_id, None)
            if sent is None:
                return
        finally:
            self._taking.discard(bull_id)
        await self._hand_back(sent, outcome, popped=True)
        if keys:
            with contextlib.suppress(*REDIS_DOWN):
                await self._client.delete(*keys)

    async def _failed(self, bull_id: str, reason: str) -> None:
        sent = self._sent.pop(bull_id, None)
        if sent is None:
            return
        kind, sentence = parse_failure(reason)
        failure_kind = FailureKind.PERMANENT if kind == PERMANENT else FailureKind.TRANSIENT
        log.warning("batch %s failed on a worker: %s", bull_id, reason)
        await self._hand_back(sent, BatchFailure(sentence, failure_kind), popped=True)

    async def _hand_back(
        self,
        sent: _Sent,
        outcome: BatchResult | BatchFailure,
        *,
        popped: bool = False,
        forget: bool = True,
    ) -> None:
        if not popped and self._sent.pop(sent.bull_id, None) is None:
            return
        self._wake()
        self.batches_run += 1
        await self._source.batch_result(sent.batch, outcome)
        if forget:
            await self._forget(sent.bull_id, sent.queue)

    async def _forget(self, bull_id: str, queue: str) -> None:
        """Remove a job the bot is done with (made, failed or given up) from Redis, with its cancel key.

        BullMQ keeps finished jobs until they are removed, and refuses to remove one a worker holds: such a
        job is tried again at each watch until its worker lets go, so none pile up between restarts.
        """
        assert self._client is not None
        try:
            removed = await self._bull(queue).remove(bull_id)
            if removed == 1:
                await self._client.delete(cancel_key(bull_id))
        except (*REDIS_DOWN, redis.ResponseError):
            removed = 0
        if removed == 1:
            self._unremoved.pop(bull_id, None)
        else:
            self._unremoved[bull_id] = queue

    async def _cancel(self, bull_id: str) -> None:
        """Ask the worker that holds a batch to stop it at its next step (it fails the job)."""
        assert self._client is not None
        with contextlib.suppress(*REDIS_DOWN):
            await self._client.set(cancel_key(bull_id), b"1", ex=RESULT_TTL_S)

    # -- bookkeeping -----------------------------------------------------------------------------------

    def _unreachable(self, error: BaseException) -> None:
        if self.problem is None:
            log.warning("%s: Redis cannot be reached (%s); jobs wait in the queue", UNREACHABLE, error)
        self.problem = UNREACHABLE

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._helpers.add(task)
        task.add_done_callback(self._helper_done)

    def _helper_done(self, task: asyncio.Task[Any]) -> None:
        self._helpers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _result(batch: Batch, refs: ResultRefs, blobs: list[bytes | None]) -> BatchResult | BatchFailure:
    """The batch's images from their PNGs, each checked against the sha256 its worker reported."""
    if len(refs.images) != len(batch.items):
        return BatchFailure(f"a GPU worker sent {len(refs.images)} images for {len(batch.items)}")
    images = []
    for item, ref, blob in zip(batch.items, refs.images, blobs, strict=True):
        if blob is None or sha256(blob) != ref.sha256:
            return BatchFailure("a GPU worker's images were lost or damaged on the way")
        try:
            with Image.open(io.BytesIO(blob)) as opened:
                opened.load()
                image = opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            return BatchFailure("a GPU worker sent an image that cannot be read")
        images.append(GeneratedImage(item.spec, image, ref.nsfw, ref.fidelity))
    return BatchResult(tuple(images), dict(refs.timings_s), refs.warnings)


async def _close_within(closing: Coroutine[Any, Any, Any], what: str) -> None:
    """Close a connection, giving up after CLOSE_S (a server that stopped answering must not hold a stop)."""
    task = asyncio.ensure_future(closing)
    done, _ = await asyncio.wait({task}, timeout=CLOSE_S)
    if not done:
        task.cancel()
        log.warning("%s did not close within %g s", what, CLOSE_S)
    elif not task.cancelled() and task.exception() is not None:
        log.debug("%s closed with an error: %s", what, task.exception())


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the remote runner stopped with an error", exc_info=task.exception())
