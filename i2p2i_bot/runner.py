"""The local GPU worker: pulls batches from a BatchSource, runs them on the GPU thread, hands results back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from i2p2i_bot.batches import (
    Batch,
    BatchFailure,
    BatchMaker,
    BatchResult,
    BatchSource,
    FailureKind,
    ModelKeeper,
)
from i2p2i_bot.gpu import GpuClosed, GpuFault, GpuOutOfMemory, GpuWorker, Priority
from i2p2i_bot.i18n import N_
from i2p2i_bot.request import GenerationError

log = logging.getLogger(__name__)

# Results of finished batches that may wait to be stored while the GPU goes on (their images stay in memory).
_MAX_UNSTORED_BATCHES = 2

# Why a job waits for a restart, and, after max_attempts of them, why it failed.
GPU_FAULT_REASON = N_("the GPU failed while making these images")


class JobRunner:
    """Runs one batch at a time on the GPU thread until its source closes.

    A batch that runs past `timeout_s` fails its jobs and the runner moves on (the GPU thread cannot be
    interrupted, so later batches wait behind it). On stop, the running batch may finish within the grace
    period; otherwise it is handed back as interrupted, so the next start makes its images again.

    A CUDA error that leaves the GPU unusable (GpuWorker.device_fault) holds the batch that hit it for the
    next start (FailureKind.FAULTED), and the runner stops: every job waits for the restart instead of
    failing on a GPU that can do no more.
    """

    def __init__(self, source: BatchSource, engine: BatchMaker, gpu: GpuWorker, *, timeout_s: float) -> None:
        self._source = source
        self._engine = engine
        self._gpu = gpu
        self._timeout_s = timeout_s
        self._abandon: asyncio.Future[None] | None = None
        self._abandon_timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches_run = 0

    async def run(self) -> None:
        """Pull, run and report batches until the source says it is closed.

        A batch's result is stored while the next batch runs, so the GPU does not wait for PNG encoding and
        commits; results that pile up are recorded together, and at most a few wait at once.
        """
        storing: deque[asyncio.Task[None]] = deque()
        try:
            while True:
                if self._gpu.device_fault is not None:
                    log.critical("the GPU is unusable, so no more batches run; restart the bot to go on")
                    return
                self._share_resident()
                batch = await self._source.next_batch()
                if batch is None:
                    return
                engine = self._engine
                if isinstance(engine, ModelKeeper) and batch.params.preset not in engine.resident_presets:
                    self._source.batch_loading(batch, batch.params.preset)
                outcome = await self._run_batch(batch)
                storing.append(asyncio.create_task(self._source.batch_result(batch, outcome)))
                self.batches_run += 1
                while storing and (len(storing) > _MAX_UNSTORED_BATCHES or storing[0].done()):
                    await storing.popleft()
        finally:
            while storing:
                await storing.popleft()

    def _share_resident(self) -> None:
        """Tell the scheduler which presets the GPU holds, so it prefers batches that need no swap."""
        if isinstance(self._engine, ModelKeeper):
            self._source.models_resident(self._engine.resident_presets)

    @property
    def running(self) -> bool:
        """True from start() until the runner has stopped (or died)."""
        return self._task is not None and not self._task.done()

    def start(self) -> asyncio.Task[None]:
        """Run in a background task; its failure is logged with the traceback."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="i2p2i-job-runner")
            self._task.add_done_callback(_log_failure)
        return self._task

    def request_stop(self, grace_s: float | None = None) -> None:
        """Take no new batches; after grace_s stop waiting for the running one. Safe in a signal handler."""
        self._source.close()
        if grace_s is not None and self._abandon_timer is None:
            self._abandon_timer = asyncio.get_running_loop().call_later(
                grace_s, _resolve, self._abandon_future()
            )

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop and wait until the running batch is finished (or handed back) and stored."""
        self.request_stop(grace_s)
        if self._task is not None:
            with contextlib.suppress(Exception):  # already logged by _log_failure
                await asyncio.shield(self._task)

    def _abandon_future(self) -> asyncio.Future[None]:
        if self._abandon is None:
            self._abandon = asyncio.get_running_loop().create_future()
        return self._abandon

    def stop_on_signals(
        self, grace_s: float, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Make SIGTERM and SIGINT stop the runner gracefully; await `stop()` or the task to know when."""
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop, grace_s)

    async def _run_batch(self, batch: Batch) -> BatchResult | BatchFailure:
        progress = _Progress(asyncio.get_running_loop(), self._source, batch)
        started_at: list[float] = []  # appended by the GPU thread when it picks the batch up

        def work() -> BatchResult:
            started_at.append(time.monotonic())
            return self._engine.generate_batch(batch.params, batch.specs, progress.report)

        try:
            running: asyncio.Future[BatchResult] = asyncio.wrap_future(
                self._gpu.submit(work, priority=Priority.GENERATE)
            )
        except GpuClosed:
            return BatchFailure("the GPU worker stopped", FailureKind.INTERRUPTED)
        abandon = self._abandon_future()
        waiting: set[asyncio.Future[Any]] = {running, abandon}
        # The timeout counts from the moment the GPU thread picks the batch up, not from the queue; until
        # then the wait is checked every second.
        wait_s = min(self._timeout_s, 1.0)
        while True:
            await asyncio.wait(waiting, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            if running.done() or abandon.done():
                break
            if started_at:
                wait_s = started_at[0] + self._timeout_s - time.monotonic()
                if wait_s <= 0:
                    break
        if not running.done():
            # Takes a batch that has not started off the GPU thread's queue; a running one cannot be stopped.
            running.cancel()
            if abandon.done():
                log.warning(
                    "batch %d was still running at shutdown; its images will be made on the next start",
                    batch.id,
                )
                return BatchFailure(
                    "the bot stopped while these images were being made", FailureKind.INTERRUPTED
                )
            log.error("batch %d took longer than %g s; failing its jobs", batch.id, self._timeout_s)
            return BatchFailure(
                f"generation took longer than {self._timeout_s:g} s and was abandoned", FailureKind.PERMANENT
            )
        try:
            return running.result()
        except (GenerationError, GpuOutOfMemory) as exc:
            return BatchFailure(str(exc), FailureKind.PERMANENT)
        except GpuClosed:
            return BatchFailure("the GPU worker stopped", FailureKind.INTERRUPTED)
        except GpuFault as exc:
            if exc.ran:
                log.exception("batch %d failed and left the GPU unusable", batch.id)
                return BatchFailure(GPU_FAULT_REASON, FailureKind.FAULTED)
            # Another task broke the GPU before this batch ran: it is not to blame and runs after a restart.
            return BatchFailure("the GPU is unusable until the bot restarts", FailureKind.INTERRUPTED)
        except Exception as exc:
            log.exception("batch %d failed", batch.id)
            return BatchFailure(f"generation failed with an internal error ({type(exc).__name__})")


class _Progress:
    """Carries on_step calls from the GPU thread to the loop with at most one hop waiting.

    The GPU thread never waits: if the loop has not yet taken the last step, a newer one replaces it, so a
    busy loop sees fewer steps but always the latest.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, source: BatchSource, batch: Batch) -> None:
        self._loop = loop
        self._source = source
        self._batch = batch
        self._lock = threading.Lock()
        self._latest: tuple[int, int] | None = None

    def report(self, step: int, total_steps: int) -> None:
        with self._lock:
            waiting = self._latest is not None
            self._latest = (step, total_steps)
        if not waiting:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
                self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            latest, self._latest = self._latest, None
        if latest is not None:
            self._source.batch_progress(self._batch, *latest)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the job runner stopped with an error", exc_info=task.exception())
