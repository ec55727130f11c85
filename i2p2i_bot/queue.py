"""The job queue: intake, durability and recovery of jobs, and the batch seam GPU workers pull from.

Which member goes next and what goes in each batch is the fair ring's (i2p2i_bot.ring); the queue feeds it
the jobs it stores and hands out the batches it picks. Every state change is committed to the store before
it is announced to subscribers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import sqlite3
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from i2p2i_bot.batches import (
    Batch,
    BatchFailure,
    BatchItem,
    BatchResult,
    FailureKind,
    GeneratedImage,
)
from i2p2i_bot.config import QueueSettings
from i2p2i_bot.events import EventHub, Subscription
from i2p2i_bot.i18n import N_
from i2p2i_bot.jobs import (
    EventKind,
    Job,
    JobEvent,
    JobRefused,
    JobRequest,
    JobStatus,
    Position,
)
from i2p2i_bot.request import GenerationParams
from i2p2i_bot.ring import FairRing, Pick
from i2p2i_bot.store import ForgetResult, JobChange, Store, StoredImage

log = logging.getLogger(__name__)

# Weight of the newest batch in the measured throughput.
_RATE_SMOOTHING = 0.3
# Pauses between tries when the database refuses to record batch results.
_RECORD_RETRY_FIRST_S = 0.5
_RECORD_RETRY_MAX_S = 30.0
_EMBEDDING_CACHE_SIZE = 128
CARD_GONE = N_("The prompt card this came from no longer exists; describe the image again.")


@dataclass(frozen=True)
class _Finished:
    """A batch result waiting to be recorded."""

    batch: Batch
    outcome: BatchResult | BatchFailure
    written: list[tuple[BatchItem, GeneratedImage]]
    hashes: list[str]
    future: asyncio.Future[None]


@dataclass(frozen=True)
class _Submission:
    request: JobRequest
    embedding: tuple[float, ...] | None
    future: asyncio.Future[Job]


class _Active:
    """A queued or running job as the queue sees it, with its changing state. Lives on the event loop."""

    __slots__ = (
        "attempts",
        "blocked",
        "count",
        "done",
        "embedding",
        "error",
        "id",
        "in_flight",
        "job",
        "loading",
        "owner",
        "started_at",
        "status",
    )

    def __init__(
        self,
        job: Job,
        embedding: tuple[float, ...] | None,
        *,
        done: int = 0,
    ) -> None:
        self.job = job  # as submitted or recovered; `snapshot()` adds the current state
        self.id = job.id
        self.owner = job.owner_id
        self.count = job.request.count
        self.status = job.status
        self.attempts = job.attempts
        self.error = job.error
        self.started_at = job.started_at
        self.embedding = embedding
        self.in_flight: set[int] = set()
        self.done = done
        # Why nothing can make its waiting images now, as last announced (JobQueue.set_blocker).
        self.blocked: str | None = None
        # The model preset the GPU is loading for a batch of this job's images; None when it is not.
        self.loading: str | None = None

    def snapshot(self, finished_at: float | None = None) -> Job:
        return dataclasses.replace(
            self.job,
            status=self.status,
            attempts=self.attempts,
            error=self.error,
            started_at=self.started_at,
            finished_at=finished_at,
        )


class JobQueue:
    """Job lifecycle around the fair ring. Create with `JobQueue.open`, which brings back unfinished jobs."""

    def __init__(
        self,
        store: Store,
        settings: QueueSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock
        self.events = EventHub(settings.subscriber_buffer)
        self._active: dict[int, _Active] = {}
        self._ring = FairRing(settings.max_batch_images)
        self._owner_jobs: Counter[int] = Counter()
        # Submissions waiting for their group commit, with the places they hold under the caps.
        self._intake: list[_Submission] = []
        self._reserved: Counter[int] = Counter()
        self._reserved_total = 0
        self._keyed: dict[str, asyncio.Future[Job]] = {}
        self._flusher: asyncio.Task[None] | None = None
        # Batch results whose files are written, waiting to be recorded together.
        self._finished: list[_Finished] = []
        self._recorder: asyncio.Task[None] | None = None
        self._in_flight_images = 0
        self._outstanding: dict[int, tuple[Batch, float]] = {}
        self._batch_ids = itertools.count(1)
        self._embeddings: OrderedDict[int, tuple[float, ...] | None] = OrderedDict()
        self._images_per_s: float | None = None
        self._lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._paused = False
        self._blocker: Callable[[GenerationParams], str | None] | None = None

    @classmethod
    async def open(
        cls,
        store: Store,
        settings: QueueSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> JobQueue:
        queue = cls(store, settings, clock=clock)
        await queue._recover()
        return queue

    # -- observation ----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def images_per_s(self) -> float | None:
        """Measured throughput, smoothed over recent batches; None before the first batch."""
        return self._images_per_s

    def active_jobs(self, owner_id: int | None = None) -> list[Job]:
        """Queued and running jobs in submission order, optionally for one member."""
        return [a.snapshot() for a in self._active.values() if owner_id is None or a.owner == owner_id]

    def subscribe(
        self, *, job_id: int | None = None, owner_id: int | None = None, maxsize: int | None = None
    ) -> Subscription:
        """Events for one job, one member or all; a subscription to a job no longer active is empty."""
        subscription = self.events.subscribe(job_id=job_id, owner_id=owner_id, maxsize=maxsize)
        if job_id is not None and job_id not in self._active:
            subscription.close()
        return subscription

    def position(self, job_id: int) -> Position | None:
        """Images ahead of a queued or running job and when it should be done; None if it is not active.

        The ring's estimate of the images it hands out first, after the images already on the GPU.
        """
        active = self._active.get(job_id)
        if active is None:
            return None
        place = self._ring.place(job_id)
        images_left = place.pending + len(active.in_flight)
        if not place.pending:
            eta = self._eta(self._in_flight_images)
            return Position(job_id, active.status, 0, images_left, eta, loading=active.loading)
        images_ahead = self._in_flight_images + place.ahead
        until_done = self._in_flight_images + place.through
        blocked = self._blocked(active)
        return Position(
            job_id,
            active.status,
            images_ahead,
            images_left,
            self._eta(until_done),
            blocked=blocked,
            loading=active.loading,
        )

    def _eta(self, images: int) -> float | None:
        return images / self._images_per_s if self._images_per_s else None

    async def join(self) -> None:
        """Wait until no job is queued, running or being submitted."""
        await self._idle.wait()

    # -- requests from members ------------------------------------------------------------------------

    async def submit(self, request: JobRequest) -> Job:
        """Validate against the caps, store the job, queue it and announce it; return the stored job.

        Submissions that arrive together are stored with one commit (group commit); each caller still gets its
        job only after that commit. A caller cancelled while waiting does not withdraw its job.
        """
        self._check(request)
        key = request.request_key
        if key is not None:
            existing = await self._job_with_key(key)
            if existing is not None:
                return existing
        embedding = None
        if request.interrogation_id is not None:
            embedding = await self._embedding(request.interrogation_id)
            if embedding is None:
                raise JobRefused(CARD_GONE)
        if key is not None and key in self._keyed:  # the same key arrived while we looked things up
            return await asyncio.shield(self._keyed[key])
        self._reserve(request.owner_id)
        submission = _Submission(request, embedding, asyncio.get_running_loop().create_future())
        self._intake.append(submission)
        if key is not None:
            self._keyed[key] = submission.future
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_intake(), name="i2p2i-job-intake")
        return await asyncio.shield(submission.future)

    async def check(self, request: JobRequest) -> None:
        """Refuse now what submit would refuse (shutting down, a cap reached, its card gone), so a member can
        be told before anything public is said. Nothing is held: a submission made meanwhile may still take
        the last place, and submit checks again."""
        self._check_room(request.owner_id)
        if request.interrogation_id is not None and await self._embedding(request.interrogation_id) is None:
            raise JobRefused(CARD_GONE)

    async def _job_with_key(self, key: str) -> Job | None:
        if key in self._keyed:
            return await asyncio.shield(self._keyed[key])
        return await self._store.job_by_request_key(key)

    def _reserve(self, owner: int) -> None:
        """Check the caps and hold a place under them; no await may come between the check and the hold."""
        self._check_room(owner)
        self._reserved[owner] += 1
        self._reserved_total += 1
        self._idle.clear()

    def _check_room(self, owner: int) -> None:
        if self._closed:
            raise JobRefused("The bot is shutting down and takes no new jobs; try again in a minute.")
        cap = self._settings.max_queued_jobs_per_user
        if self._owner_jobs[owner] + self._reserved[owner] >= cap:
            # Whole sentences for one and for many, so each language says the number its own way.
            if cap == 1:
                raise JobRefused(
                    "You already have 1 job queued, the most allowed; wait for one to finish or cancel one."
                )
            raise JobRefused(
                f"You already have {cap} jobs queued, the most allowed; wait for one to finish or cancel one."
            )
        total = self._settings.max_queued_jobs
        if len(self._active) + self._reserved_total >= total:
            if total == 1:
                raise JobRefused("The queue is full (1 job); try again in a few minutes.")
            raise JobRefused(f"The queue is full ({total} jobs); try again in a few minutes.")

    async def _flush_intake(self) -> None:
        """Store waiting submissions in groups, one commit per group, then queue and announce them."""
        try:
            while self._intake:
                async with self._lock:
                    group, self._intake = self._intake, []
                    await self._store_group(group)
        finally:
            self._flusher = None
            left, self._intake = self._intake, []
            for submission in left:  # only when this task was cancelled
                self._settle(submission)
                submission.future.set_exception(
                    JobRefused("The bot is shutting down; try again in a minute.")
                )
            self._note_if_idle()

    async def _store_group(self, group: list[_Submission]) -> None:
        now = self._clock()
        try:
            jobs = await self._store.insert_jobs([s.request for s in group], now)
        except BaseException as exc:
            for submission in group:
                self._settle(submission)
                if not submission.future.done():
                    submission.future.set_exception(exc)
            self._note_if_idle()
            if not isinstance(exc, Exception):
                raise
            return
        for submission, job in zip(group, jobs, strict=True):
            self._settle(submission)
            active = _Active(job, submission.embedding)
            self._add(active, range(job.request.count))
            self._publish(EventKind.QUEUED, active)
            if not submission.future.done():
                submission.future.set_result(job)

    def _settle(self, submission: _Submission) -> None:
        owner = submission.request.owner_id
        self._reserved[owner] -= 1
        self._reserved_total -= 1
        if not self._reserved[owner]:
            del self._reserved[owner]
        if submission.request.request_key is not None:
            self._keyed.pop(submission.request.request_key, None)

    def _check(self, submitted: JobRequest) -> None:
        """The request itself was checked when it was planned (request.plan); here only that it was."""
        if not submitted.request.planned:
            raise ValueError("a job's request must be planned (every setting and the seed fixed)")

    async def cancel(self, job_id: int, user_id: int, *, admin: bool = False) -> Job:
        """Cancel a queued job, or the images a running one has not made yet; only its owner or an admin may.

        Images already stored are kept; images on the GPU right now are discarded when they arrive.
        """
        async with self._lock:
            active = self._active.get(job_id)
            job = active.snapshot() if active is not None else await self._store.get_job(job_id)
            if job is None:
                raise JobRefused(f"There is no job #{job_id}.")
            if job.owner_id != user_id and not admin:
                raise JobRefused(f"Only the member who queued job #{job_id} can cancel it.")
            if active is None:
                raise JobRefused(f"Job #{job_id} is already {job.status}; there is nothing left to cancel.")
            now = self._clock()
            await self._store.save_changes(
                [JobChange(job_id=job_id, status=JobStatus.CANCELLED, attempts=job.attempts, finished_at=now)]
            )
            self._remove(active)
            active.status = JobStatus.CANCELLED
            active.error = None
            self._publish(EventKind.CANCELLED, active)
            return active.snapshot(finished_at=now)

    async def forget(self, user_id: int) -> ForgetResult:
        """Delete a member's whole history; their queued and running jobs are cancelled first."""
        async with self._lock:
            result = await self._store.forget_user(user_id)
            for active in [a for a in self._active.values() if a.owner == user_id]:
                self._remove(active)
                active.status = JobStatus.CANCELLED
                self._publish(EventKind.CANCELLED, active, error="history deleted")
            return result

    # -- the batch seam -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop handing out batches and taking jobs; results of batches already out are still stored."""
        self._closed = True
        self._wakeup.set()

    def pause(self) -> None:
        """Hand out no new batches (jobs are still taken); the batch on the GPU finishes."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wakeup.set()

    async def next_batch(self, can_run: Callable[[GenerationParams], bool] | None = None) -> Batch | None:
        """Wait for the next batch the ring picks; None once the queue is closed.

        `can_run` limits the pick to params something can run now (remote GPU workers with room that
        offer what the params need); a caller whose answer changes calls reconsider() to be asked again.
        """
        while True:
            async with self._lock:
                if self._closed:
                    return None
                pick = None if self._paused else self._ring.plan(can_run)
                if pick is not None:
                    return await self._dispatch(pick)
                self._wakeup.clear()
            await self._wakeup.wait()

    def models_resident(self, presets: Iterable[str]) -> None:
        """The model presets the GPU holds now: the ring prefers batches for them (ring.py says how far)."""
        self._ring.resident = frozenset(presets)

    def batch_loading(self, batch: Batch, preset: str) -> None:
        """The GPU loads `preset` before it can start the batch: its jobs say so until the first step."""
        if batch.id not in self._outstanding:
            return
        for job_id in batch.job_ids:
            active = self._active.get(job_id)
            if active is not None and active.loading != preset:
                active.loading = preset
                self._publish(EventKind.LOADING, active, model=preset)

    def _loaded(self, batch: Batch) -> None:
        for job_id in batch.job_ids:
            active = self._active.get(job_id)
            if active is not None:
                active.loading = None

    def reconsider(self) -> None:
        """Plan again: what next_batch's `can_run` accepts has changed."""
        self._wakeup.set()

    def set_blocker(self, blocker: Callable[[GenerationParams], str | None] | None) -> None:
        """Say, for each job, why nothing can make its waiting images now (blocker(params), a sentence for
        its member, such as "waiting for a GPU worker that can keep edges"); None when something can.

        Positions carry the reason, and each job whose reason changes gets a WAITING event, so its message
        and /queue say it while it waits (it never fails for it)."""
        self._blocker = blocker
        for active in list(self._active.values()):
            reason = self._blocked(active)
            if reason != active.blocked:
                active.blocked = reason
                self._publish(EventKind.WAITING, active, error=reason)

    def _blocked(self, active: _Active) -> str | None:
        if self._blocker is None or active.in_flight or not self._ring.pending(active.id):
            return None
        return self._blocker(active.job.request.params)

    async def adopt(self, items: Sequence[tuple[int, int]]) -> Batch | None:
        """Count as out again a batch that an earlier run of the bot handed out and that is still out (on a
        GPU worker, or made there and not yet taken in), given as its (job id, image index) in order.

        Its images that still wait leave the ring, so they are not made twice, and the batch's result is
        taken like any other's; the batch holds only those images, in the same order. None when none of
        them waits any more (stored before the restart, or the job is gone).
        """
        async with self._lock:
            taken = [
                (job_id, index)
                for job_id, index in dict.fromkeys(items)
                if job_id in self._active and index in self._ring.waiting(job_id)
            ]
            if not taken:
                return None
            jobs = [self._active[job_id] for job_id in dict.fromkeys(job_id for job_id, _ in taken)]
            params = jobs[0].job.request.params
            if any(a.job.request.params != params for a in jobs):
                raise ValueError("the images of one batch must share their params")
            await self._store.mark_running([a.id for a in jobs], self._clock())
            batch_items = []
            for job_id, index in taken:
                active = self._active[job_id]
                self._ring.withdraw(job_id, [index])
                active.in_flight.add(index)
                batch_items.append(BatchItem(job_id, index, active.job.request.spec(index, active.embedding)))
            batch = Batch(next(self._batch_ids), params, tuple(batch_items))
            self._outstanding[batch.id] = (batch, self._clock())
            self._in_flight_images += len(batch_items)
            now = self._clock()
            for active in jobs:
                if active.status is JobStatus.QUEUED:
                    active.status = JobStatus.RUNNING
                    active.started_at = now
                    self._publish(EventKind.STARTED, active)
            return batch

    def batch_progress(self, batch: Batch, step: int, total_steps: int) -> None:
        if batch.id not in self._outstanding:
            return
        self._loaded(batch)
        for job_id in batch.job_ids:
            active = self._active.get(job_id)
            if active is not None:
                self._publish(EventKind.STEP, active, step=step, total_steps=total_steps)

    async def batch_result(self, batch: Batch, outcome: BatchResult | BatchFailure) -> None:
        handed_out = self._outstanding.pop(batch.id, None)
        if handed_out is None:
            log.warning(
                "ignoring a result for batch %d, which is not out (a duplicate or a stale worker)", batch.id
            )
            return
        self._loaded(batch)
        self._in_flight_images -= len(batch.items)
        hashes: list[str] = []
        written: list[tuple[BatchItem, GeneratedImage]] = []
        if isinstance(outcome, BatchResult):
            if len(outcome.images) != len(batch.items):
                log.error(
                    "batch %d: %d images came back for %d", batch.id, len(outcome.images), len(batch.items)
                )
                outcome = BatchFailure(
                    f"the engine returned {len(outcome.images)} images for {len(batch.items)}"
                )
            else:
                self._measure(len(batch.items), self._clock() - handed_out[1])
                # Files are written outside the lock (they are the slow part); rows are added under it.
                written = [
                    (item, image)
                    for item, image in zip(batch.items, outcome.images, strict=True)
                    if item.job_id in self._active
                ]
                try:
                    hashes = await asyncio.to_thread(
                        self._store.write_image_files, [(i.job_id, i.index, g.image) for i, g in written]
                    )
                except OSError as exc:
                    log.exception("batch %d: could not write its images", batch.id)
                    outcome = BatchFailure(f"the images could not be saved ({exc.strerror or exc})")
        finished = _Finished(batch, outcome, written, hashes, asyncio.get_running_loop().create_future())
        self._finished.append(finished)
        if self._recorder is None:
            self._recorder = asyncio.create_task(self._record_finished(), name="i2p2i-batch-results")
        await asyncio.shield(finished.future)

    def _measure(self, images: int, elapsed_s: float) -> None:
        if elapsed_s > 0:
            rate = images / elapsed_s
            previous = self._images_per_s
            self._images_per_s = rate if previous is None else previous + _RATE_SMOOTHING * (rate - previous)

    async def _record_finished(self) -> None:
        """Record batch results as they come, all results waiting at one moment in one transaction.

        A database that refuses the write for a while (locked past the busy timeout, disk full, I/O
        error) is waited for, with growing pauses, and the results not yet recorded are tried again:
        nothing in memory changes until a transaction commits, so a retry cannot apply anything twice.
        Generation stops meanwhile, because the runner waits for its results to be stored.
        """
        pause_s = _RECORD_RETRY_FIRST_S
        try:
            while self._finished:
                recorded: list[_Finished] = []
                discarded: list[tuple[int, int]] = []
                refused: sqlite3.OperationalError | None = None
                async with self._lock:
                    group, self._finished = self._finished, []
                    try:
                        for finished in group:
                            if isinstance(finished.outcome, BatchFailure):
                                await self._record_failure(finished.batch, finished.outcome)
                                recorded.append(finished)
                        results = [f for f in group if isinstance(f.outcome, BatchResult)]
                        if results:
                            discarded = await self._record_images(results)
                        recorded.extend(results)
                    except sqlite3.OperationalError as exc:
                        refused = exc
                        self._finished[:0] = [f for f in group if f not in recorded]
                    except BaseException as exc:
                        for finished in group:
                            if finished not in recorded and not finished.future.done():
                                finished.future.set_exception(exc)
                        if not isinstance(exc, Exception):
                            raise
                if discarded:
                    await asyncio.to_thread(self._store.remove_image_files, discarded)
                for finished in recorded:
                    if not finished.future.done():
                        finished.future.set_result(None)
                if refused is not None:
                    log.error(
                        "the database refused %d batch result(s) (%s); trying again in %g s",
                        len(self._finished),
                        refused,
                        pause_s,
                    )
                    await asyncio.sleep(pause_s)
                    pause_s = min(pause_s * 2, _RECORD_RETRY_MAX_S)
                else:
                    pause_s = _RECORD_RETRY_FIRST_S
        finally:
            self._recorder = None
            left, self._finished = self._finished, []
            for finished in left:  # only when this task was cancelled
                finished.future.cancel()

    # -- handing out -----------------------------------------------------------------------------------

    async def _dispatch(self, pick: Pick) -> Batch:
        now = self._clock()
        jobs = [self._active[job_id] for job_id in dict.fromkeys(job_id for job_id, _ in pick.items)]
        await self._store.mark_running([a.id for a in jobs], now)
        self._ring.take(pick)
        items = []
        for job_id, index in pick.items:
            active = self._active[job_id]
            active.in_flight.add(index)
            keep_flagged = active.job.flagged_policy.keeps_pixels
            spec = active.job.request.spec(index, active.embedding, keep_flagged=keep_flagged)
            items.append(BatchItem(job_id, index, spec))
        batch = Batch(next(self._batch_ids), pick.params, tuple(items))
        self._outstanding[batch.id] = (batch, self._clock())
        self._in_flight_images += len(items)
        for active in jobs:
            if active.status is JobStatus.QUEUED:
                active.status = JobStatus.RUNNING
                active.started_at = now
                self._publish(EventKind.STARTED, active)
        return batch

    async def _record_images(self, results: list[_Finished]) -> list[tuple[int, int]]:
        """Store batches' images and the jobs they finish; return (job, index) of files nobody wants now."""
        now = self._clock()
        rows: list[StoredImage] = []
        discarded: list[tuple[int, int]] = []
        made: dict[int, list[int]] = {}
        sent: dict[int, list[int]] = {}
        for finished in results:
            for item in finished.batch.items:
                sent.setdefault(item.job_id, []).append(item.index)
            for (item, generated), sha256 in zip(finished.written, finished.hashes, strict=True):
                if item.job_id not in self._active:  # cancelled or forgotten while the files were written
                    discarded.append((item.job_id, item.index))
                    continue
                rows.append(
                    StoredImage(
                        job_id=item.job_id,
                        index=item.index,
                        seed=item.spec.seed,
                        nsfw=generated.nsfw,
                        fidelity=generated.fidelity,
                        sha256=sha256,
                        created_at=now,
                    )
                )
                made.setdefault(item.job_id, []).append(item.index)
        changes = []
        for job_id, indices in sent.items():
            active = self._active.get(job_id)
            if active is None:
                continue
            if active.done + len(made.get(job_id, ())) == active.count:
                changes.append(
                    JobChange(
                        job_id=job_id, status=JobStatus.COMPLETE, attempts=active.attempts, finished_at=now
                    )
                )
            else:
                in_flight = len(active.in_flight) > len(indices)
                changes.append(
                    JobChange(
                        job_id=job_id,
                        status=JobStatus.RUNNING,
                        attempts=active.attempts,
                        in_flight=in_flight,
                        error=active.error,
                    )
                )
        await self._store.save_changes(changes, rows)
        for change in changes:
            active = self._active[change.job_id]
            active.in_flight.difference_update(sent[change.job_id])
            for index in made.get(change.job_id, ()):
                active.done += 1
                path = self._store.image_file(change.job_id, index)
                self._publish(EventKind.IMAGE, active, image_index=index, image_path=path)
            if change.status is JobStatus.COMPLETE:
                self._remove(active)
                active.status = JobStatus.COMPLETE
                self._publish(EventKind.FINISHED, active)
        return discarded

    async def _record_failure(self, batch: Batch, failure: BatchFailure) -> None:
        now = self._clock()
        sent = _indices_by_job(batch)
        if failure.kind is FailureKind.FAULTED:
            await self._hold(batch, sent, failure.reason)
            return
        blamed = len(sent) == 1
        changes: dict[int, JobChange] = {}
        for job_id in sent:
            active = self._active.get(job_id)
            if active is None:
                continue
            attempts = active.attempts + int(failure.kind is FailureKind.TRANSIENT and blamed)
            if failure.kind is FailureKind.PERMANENT or attempts >= self._settings.max_attempts:
                reason = failure.reason
                if failure.kind is not FailureKind.PERMANENT:
                    reason = _gave_up(reason, attempts)
                changes[job_id] = JobChange(
                    job_id=job_id, status=JobStatus.FAILED, attempts=attempts, error=reason, finished_at=now
                )
            else:
                error = failure.reason if failure.kind is FailureKind.TRANSIENT else active.error
                changes[job_id] = JobChange(
                    job_id=job_id, status=JobStatus.RUNNING, attempts=attempts, error=error
                )
        await self._store.save_changes(list(changes.values()))
        log.warning(
            "batch %d (%d images) failed (%s): %s", batch.id, len(batch.items), failure.kind, failure.reason
        )
        for job_id, change in changes.items():
            active = self._active[job_id]
            active.attempts = change.attempts
            active.error = change.error
            if change.status is JobStatus.FAILED:
                self._remove(active)
                active.status = JobStatus.FAILED
                self._publish(EventKind.FAILED, active, error=change.error)
        # Reversed, so that after each member moves to the front of the ring they keep their order.
        for job_id, change in reversed(changes.items()):
            if change.status is JobStatus.FAILED:
                continue
            active = self._active[job_id]
            back = sent[job_id]
            active.in_flight.difference_update(back)
            self._ring.requeue(job_id, back, solo=failure.kind is FailureKind.TRANSIENT and not blamed)
            self._wakeup.set()

    async def _hold(self, batch: Batch, sent: dict[int, list[int]], reason: str) -> None:
        """Leave a faulted batch's jobs running and in flight, with the reason, for the next start."""
        held = [self._active[job_id] for job_id in sent if job_id in self._active]
        await self._store.save_changes(
            [
                JobChange(
                    job_id=a.id, status=JobStatus.RUNNING, attempts=a.attempts, in_flight=True, error=reason
                )
                for a in held
            ]
        )
        log.warning(
            "batch %d (%d images) broke the GPU; its jobs wait for a restart", batch.id, len(batch.items)
        )
        for active in held:
            active.error = reason
            self._publish(EventKind.HELD, active, error=reason)

    # -- bookkeeping ----------------------------------------------------------------------------------

    def _add(self, active: _Active, pending: Iterable[int], *, solo: bool = False) -> None:
        self._active[active.id] = active
        self._owner_jobs[active.owner] += 1
        self._ring.add(active.id, active.owner, active.job.request.params, pending, solo=solo)
        self._idle.clear()
        self._wakeup.set()

    def _remove(self, active: _Active) -> None:
        owner = active.owner
        del self._active[active.id]
        self._ring.remove(active.id)
        self._owner_jobs[owner] -= 1
        if not self._owner_jobs[owner]:
            del self._owner_jobs[owner]
        self._note_if_idle()

    def _note_if_idle(self) -> None:
        if not self._active and not self._reserved_total:
            self._idle.set()

    def _publish(
        self,
        kind: EventKind,
        active: _Active,
        *,
        step: int = 0,
        total_steps: int = 0,
        image_index: int | None = None,
        image_path: str | None = None,
        error: str | None = None,
        model: str | None = None,
    ) -> None:
        event = JobEvent(
            kind,
            active.id,
            active.owner,
            active.done,
            active.count,
            step,
            total_steps,
            image_index,
            image_path,
            error,
            model,
        )
        self.events.publish(event)

    async def _embedding(self, interrogation_id: int) -> tuple[float, ...] | None:
        """Source embeddings, shared between the jobs made from one interrogation."""
        if interrogation_id in self._embeddings:
            self._embeddings.move_to_end(interrogation_id)
            return self._embeddings[interrogation_id]
        embedding = await self._store.interrogation_embedding(interrogation_id)
        self._embeddings[interrogation_id] = embedding
        if len(self._embeddings) > _EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return embedding

    async def _recover(self) -> None:
        """Bring back unfinished jobs: queued ones in order, running ones with only their missing images."""
        async with self._lock:
            rows = await self._store.active_jobs()
            running = [job.id for job, _ in rows if job.status is JobStatus.RUNNING]
            stored = await self._store.stored_indices(running)
            await asyncio.to_thread(self._store.remove_temp_files, running)
            now = self._clock()
            changes: list[JobChange] = []
            revived: list[tuple[Job, set[int], bool]] = []
            for job, in_flight in rows:
                done = stored.get(job.id, set())
                attempts = job.attempts + int(in_flight)
                if len(done) >= job.request.count:
                    changes.append(
                        JobChange(
                            job_id=job.id, status=JobStatus.COMPLETE, attempts=attempts, finished_at=now
                        )
                    )
                elif attempts >= self._settings.max_attempts:
                    if job.error:
                        reason = _gave_up(job.error, attempts)
                    elif attempts == 1:
                        reason = N_("generation was interrupted or failed 1 time; giving up")
                    else:
                        reason = N_("generation was interrupted or failed {count} times; giving up").format(
                            count=attempts
                        )
                    changes.append(
                        JobChange(
                            job_id=job.id,
                            status=JobStatus.FAILED,
                            attempts=attempts,
                            error=reason,
                            finished_at=now,
                        )
                    )
                else:
                    if in_flight:
                        changes.append(
                            JobChange(job_id=job.id, status=job.status, attempts=attempts, error=job.error)
                        )
                    revived.append((dataclasses.replace(job, attempts=attempts), done, in_flight))
            await self._store.save_changes(changes)
            for job, done, interrupted in revived:
                embedding = None
                if job.interrogation_id is not None:
                    embedding = await self._embedding(job.interrogation_id)
                pending = [i for i in range(job.request.count) if i not in done]
                self._add(_Active(job, embedding, done=len(done)), pending, solo=interrupted)
        if rows:
            log.info(
                "recovered %d unfinished jobs (%d running, %d given up or already complete)",
                len(rows),
                len(running),
                len(changes) - sum(1 for c in changes if c.status is JobStatus.RUNNING),
            )


def _indices_by_job(batch: Batch) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    for item in batch.items:
        found.setdefault(item.job_id, []).append(item.index)
    return found


def _gave_up(reason: str, attempts: int) -> str:
    """Why a job failed for good, in words the catalogue translates (a member reads it in /job)."""
    if attempts == 1:
        return N_("{reason} (gave up after 1 try)").format(reason=reason)
    return N_("{reason} (gave up after {count} tries)").format(reason=reason, count=attempts)
