"""A GPU worker on any machine: takes batches from Redis through BullMQ and makes them with the engine.

`i2p2i worker --redis URL [--device cuda:N]`, one per GPU. The worker dials out to Redis (it may sit behind
NAT), takes one batch at a time, checks it again as if a member had sent it (plan()), runs it on its GPU
thread with the same engine and fast paths as the bot's own GPU, writes the PNGs to Redis keys with a time
to live and finishes the BullMQ job with their sha256. The GPU call runs off the event loop, so BullMQ's
lock renewal never stalls; if the lock is lost anyway (the worker was paused, cut off), the batch stops at
its next step, and BullMQ refuses the finish of a worker whose lock is gone. A batch the bot gave up on
(it took longer than queue.job_timeout_s) stops at its next step too: the bot sets a cancel key, which
the worker looks for every CANCEL_POLL_S while the batch runs.

The worker says what it can run (its guides, the presets whose weights it has, by name and what identifies
those weights in its own config, its LoRA files by name and sha256) in its record, and takes batches from
the BullMQ queue of workers with the same capabilities (worker_capabilities.py), so it gets only batches
it can make. It looks again every queue.worker_rescan_s (in a thread; LoRA files are hashed once per
version): when what it can make changed, it says so in its record, where the bot reads it, and moves to
the queue of its new capabilities once the batch it holds is done, without losing or repeating a batch and
without loading its models again. A guided batch's source image that this machine lacks is fetched from
Redis and kept under its own data folder (remote_sources.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis.asyncio as redis
from bullmq import Worker
from bullmq.custom_errors import UnrecoverableError

from i2p2i_bot.batches import BatchResult
from i2p2i_bot.config import Settings
from i2p2i_bot.gpu import GpuFault, GpuOutOfMemory, GpuWorker, Priority
from i2p2i_bot.image_engine import ImageEngine
from i2p2i_bot.loras import LoraLibrary
from i2p2i_bot.remote_sources import NOT_FETCHED, SourceUnavailable, fetch
from i2p2i_bot.remote_wire import (
    PERMANENT,
    RESULT_TTL_S,
    TRANSIENT,
    WORKER_KEY_PREFIX,
    ImageRef,
    ResultRefs,
    WireError,
    as_request,
    batch_from_payload,
    cancel_key,
    failure_reason,
    payload_sources,
    result_key,
    sha256,
)
from i2p2i_bot.request import GenerationError
from i2p2i_bot.worker_capabilities import Capabilities, preset_ids

log = logging.getLogger("i2p2i.worker")

EngineLoader = Callable[[Settings], ImageEngine]
# Names a `module:function` that loads the engine instead of the real models; only the tests set it.
TEST_ENGINE_ENV = "I2P2I_TEST_ENGINE"
# Step progress goes to the bot at most this often per batch.
PROGRESS_INTERVAL_S = 1.0
# How often the worker asks Redis whether the bot gave up on the batch it makes.
CANCEL_POLL_S = 0.5
EXIT_GPU_LOST = 3
# Event-loop turns given BullMQ's worker to hand a batch it took to its processor before it counts as idle.
_TURNS = 3


class LockLost(Exception):
    """The worker no longer holds the batch: another worker makes it, so this one stops."""


class Cancelled(Exception):
    """The bot gave up on the batch, so the worker stops making it."""


def engine_loader(prepare: Callable[[], None] | None = None) -> EngineLoader:
    """What loads the worker's engine: the models (after `prepare`, which sets up the model libraries),
    or the tests' stand-in, which never imports them."""
    spec = os.environ.get(TEST_ENGINE_ENV)
    if spec:
        module, _, name = spec.partition(":")
        loader: EngineLoader = getattr(importlib.import_module(module), name)
        return loader

    def load(settings: Settings) -> ImageEngine:
        if prepare is not None:
            prepare()
        from i2p2i_bot.engine import Engine

        return Engine.load(settings)

    return load


class RemoteWorker:
    """One GPU's worker: the engine on its GPU thread, a BullMQ worker, and a record of itself in Redis."""

    def __init__(self, settings: Settings, redis_url: str, loader: EngineLoader) -> None:
        self._settings = settings
        self._url = redis_url
        self._loader = loader
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._lock_ms = int(settings.queue.worker_lock_s * 1000)
        self._gpu = GpuWorker()
        self._engine: ImageEngine | None = None
        self._client: redis.Redis | None = None
        self._lost: dict[str, threading.Event] = {}
        self._stop = asyncio.Event()
        self.exit_code = 0
        self.capabilities = Capabilities()
        self._loras = LoraLibrary(settings.models.lora_dir)
        # BullMQ's worker on the queue of this worker's capabilities (another one after they change).
        self._worker: Worker | None = None
        self._started_at = ""
        # The heartbeat and a move both write the record: one at a time, so the last written is the newest.
        self._announcing = asyncio.Lock()
        self._record_ttl_s = max(3, round(settings.queue.worker_lock_s))

    def stop(self) -> None:
        """Take no more batches; the running one finishes. Safe in a signal handler."""
        self._stop.set()

    async def run(self) -> int:
        self._engine = await self._gpu.run(self._loader, self._settings, priority=Priority.URGENT)
        self.capabilities = await asyncio.to_thread(self._read_capabilities)
        self._started_at = str(time.time())
        client = self._client = redis.from_url(self._url)
        heartbeat = asyncio.create_task(self._heartbeat(client), name="i2p2i-worker-heartbeat")
        serving = asyncio.create_task(self._serve(client), name="i2p2i-worker")
        log.info(
            "worker %s ready: %s, presets %s, guides %s, LoRAs %s, queue %s",
            self.id,
            self._engine.models,
            ", ".join(f"{name} ({weights})" for name, weights in self.capabilities.presets) or "none",
            ", ".join(self.capabilities.guides) or "none",
            ", ".join(name for name, _ in self.capabilities.loras) or "none",
            self.capabilities.queue,
        )
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({serving, stopping}, return_when="FIRST_COMPLETED")
        finally:
            stopping.cancel()
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await serving
            if self._worker is not None and not self._worker.closed:
                await self._worker.close()  # the batch it holds finishes first
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await heartbeat
            with contextlib.suppress(Exception):
                await client.delete(WORKER_KEY_PREFIX + self.id)
            await client.aclose()
            await asyncio.to_thread(self._gpu.close, True, self._settings.queue.stop_grace_s)
        log.info("worker %s stopped", self.id)
        return self.exit_code

    def _read_capabilities(self) -> Capabilities:
        """What this worker can make now (reads the LoRA folder and looks for presets' weights: a thread)."""
        assert self._engine is not None
        engine = self._engine
        presets = engine.available_presets()
        # The guides of any preset it has: a job keeping some names a preset they fit.
        guides = [name for preset in presets for name in engine.guides_for(preset)]
        return Capabilities.of(guides, preset_ids(engine.presets, presets), self._loras.files())

    async def _serve(self, client: redis.Redis) -> None:
        """Take batches from the queue of this worker's capabilities, and move to the queue of its new ones
        when they change; returns only if BullMQ's worker ends by itself."""
        while True:
            worker = self._worker = self._bull_worker(self.capabilities.queue)
            running = asyncio.create_task(worker.run(), name="i2p2i-worker-queue")
            changed = asyncio.create_task(self._changed(), name="i2p2i-worker-rescan")
            try:
                await asyncio.wait({running, changed}, return_when="FIRST_COMPLETED")
            finally:
                changed.cancel()
            if running.done():
                return
            now = changed.result()
            log.info(
                "worker %s now has presets %s, guides %s, LoRAs %s; moving to queue %s after its batch",
                self.id,
                ", ".join(now.preset_names) or "none",
                ", ".join(now.guides) or "none",
                ", ".join(name for name, _ in now.loras) or "none",
                now.queue,
            )
            # Said first: the bot stops sending batches this worker can no longer make, and takes back those
            # that wait on the old queue once no live worker takes from it.
            self.capabilities = now
            try:
                await self._announce(client)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("cannot reach Redis to say what this worker can make now (%s)", exc)
            await self._leave(worker, running)
            self._worker = None

    async def _changed(self) -> Capabilities:
        """This worker's capabilities once they differ from those it announced; looked at every
        queue.worker_rescan_s (never when 0)."""
        period_s = self._settings.queue.worker_rescan_s
        if period_s <= 0:
            await asyncio.Event().wait()
        while True:
            await asyncio.sleep(period_s)
            try:
                now = await asyncio.to_thread(self._read_capabilities)
            except OSError as exc:  # a file went while it was read: look again next time
                log.warning("could not look again at what this worker can make (%s)", exc)
                continue
            except Exception:  # a bug; the worker goes on with what it announced
                log.exception("could not look again at what this worker can make")
                continue
            if now != self.capabilities:
                return now

    async def _leave(self, worker: Worker, running: asyncio.Task[None]) -> None:
        """Stop taking batches from a queue without dropping the one held: BullMQ's worker takes no new
        batch once paused, and one it took as it was paused is made (its hold still renewed) before it
        closes."""
        await worker.pause()
        while True:
            # A batch taken just as the worker paused becomes a task of BullMQ's loop a few turns later.
            for _ in range(_TURNS):
                await asyncio.sleep(0)
            busy = [task for task in worker.processing if not task.done()]
            if not busy:
                break
            await asyncio.wait(busy)
        await worker.close()
        await asyncio.wait({running})  # it ends once closed
        if not running.cancelled() and running.exception() is not None:
            log.warning("the queue %s ended with an error: %s", worker.name, running.exception())

    def _bull_worker(self, queue: str) -> Worker:
        worker = Worker(
            queue,
            self._process,
            {
                "connection": self._url,
                "concurrency": 1,
                "lockDuration": self._lock_ms,
                "stalledInterval": self._lock_ms,
                "maxStalledCount": 1,
                "autorun": False,
                "name": self.id,
            },
        )
        worker.on("lockRenewalFailed", self._on_lock_lost)
        worker.on("error", lambda *args: log.warning("queue error: %s", args[0] if args else "?"))
        return worker

    def _record(self) -> dict[Any, Any]:
        assert self._engine is not None
        return {
            "models": json.dumps(self._engine.models),
            "device": self._settings.models.device,
            "started_at": self._started_at,
            "queue": self.capabilities.queue,
            **self.capabilities.record(),
        }

    async def _announce(self, client: redis.Redis) -> None:
        """Write this worker's record, with the capabilities it has now, and keep it a while."""
        key = WORKER_KEY_PREFIX + self.id
        async with self._announcing, client.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=self._record())
            pipe.expire(key, self._record_ttl_s)
            await pipe.execute()

    async def _heartbeat(self, client: redis.Redis) -> None:
        """Keep this worker's record alive; the bot counts live records to size what it sends."""
        while True:
            try:
                await self._announce(client)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                log.warning("cannot reach Redis to say this worker is alive (%s)", exc)
            await asyncio.sleep(self._record_ttl_s / 3)

    def _on_lock_lost(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            log.warning("lost the hold on batch %s; stopping it", job_id)
            lost = self._lost.get(job_id)
            if lost is not None:
                lost.set()

    async def _process(self, job: Any, token: str) -> dict[str, Any]:
        assert self._engine is not None
        engine = self._engine
        try:
            params, specs = batch_from_payload(job.data)
            for spec in specs:
                engine.plan(as_request(params, spec))
            sources = payload_sources(job.data)
        except (WireError, GenerationError) as exc:
            raise UnrecoverableError(failure_reason(PERMANENT, str(exc))) from None
        assert self._client is not None
        try:
            await fetch(self._client, self._settings.sources_path, sources)
        except SourceUnavailable as exc:
            log.warning("batch %s: %s", job.id, exc)
            raise UnrecoverableError(failure_reason(PERMANENT, str(exc))) from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            log.warning("batch %s: could not fetch its source images (%s)", job.id, exc)
            raise UnrecoverableError(failure_reason(TRANSIENT, NOT_FETCHED)) from None
        lost = self._lost[job.id] = threading.Event()
        cancelled = threading.Event()
        loop = asyncio.get_running_loop()
        sent_at = [0.0]

        def report(step: int, total: int) -> None:
            now = time.monotonic()
            if now - sent_at[0] >= PROGRESS_INTERVAL_S or step == total:
                sent_at[0] = now
                update = job.updateProgress({"step": step, "total": total})
                asyncio.ensure_future(update).add_done_callback(_ignore_failure)

        def on_step(step: int, total: int) -> None:
            if lost.is_set():
                raise LockLost
            if cancelled.is_set():
                raise Cancelled
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(report, step, total)

        log.info("batch %s: %d images", job.id, len(specs))
        watch = asyncio.create_task(self._watch_cancel(job.id, cancelled), name="i2p2i-worker-cancel")
        try:
            future = self._gpu.submit(
                engine.generate_batch, params, specs, on_step, priority=Priority.GENERATE
            )
            result: BatchResult = await asyncio.wrap_future(future)
            if lost.is_set():
                raise LockLost
            if cancelled.is_set():
                raise Cancelled
            refs = await self._store_result(job.id, token, result)
        except LockLost:
            raise UnrecoverableError(
                failure_reason(TRANSIENT, "the worker lost its hold on the batch")
            ) from None
        except Cancelled:
            log.warning("batch %s: the bot gave up on it; stopped", job.id)
            raise UnrecoverableError(failure_reason(PERMANENT, "the bot gave up on the batch")) from None
        except (GenerationError, GpuOutOfMemory) as exc:
            raise UnrecoverableError(failure_reason(PERMANENT, str(exc))) from None
        except GpuFault:
            log.critical("the GPU is unusable; this worker stops so that a restart gets it back")
            self.exit_code = EXIT_GPU_LOST
            self.stop()
            raise UnrecoverableError(failure_reason(TRANSIENT, "the worker's GPU failed")) from None
        except Exception as exc:
            log.exception("batch %s failed", job.id)
            raise UnrecoverableError(
                failure_reason(TRANSIENT, f"generation failed with an internal error ({type(exc).__name__})")
            ) from None
        finally:
            watch.cancel()
            self._lost.pop(job.id, None)
        return refs.to_json()

    async def _watch_cancel(self, job_id: str, cancelled: threading.Event) -> None:
        assert self._client is not None
        key = cancel_key(job_id)
        while not cancelled.is_set():
            await asyncio.sleep(CANCEL_POLL_S)
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, OSError):
                if await self._client.exists(key):
                    cancelled.set()

    async def _store_result(self, job_id: str, token: str, result: BatchResult) -> ResultRefs:
        """Write each PNG to its own key with a time to live; the keys carry this take's lock token."""
        pngs = await asyncio.to_thread(_encode, result)
        refs = tuple(
            ImageRef(result_key(f"{job_id}:{token}", i), sha256(png), made.nsfw, made.fidelity)
            for i, (png, made) in enumerate(zip(pngs, result.images, strict=True))
        )
        assert self._client is not None
        async with self._client.pipeline(transaction=True) as pipe:
            for ref, png in zip(refs, pngs, strict=True):
                pipe.set(ref.key, png, ex=RESULT_TTL_S)
            await pipe.execute()
        return ResultRefs(refs, tuple(result.warnings), dict(result.timings_s))


def _encode(result: BatchResult) -> list[bytes]:
    out = []
    for made in result.images:
        buffer = io.BytesIO()
        made.image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _ignore_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("a progress update was lost: %s", future.exception())


def run_worker(settings: Settings, redis_url: str, prepare: Callable[[], None] | None = None) -> int:
    """The worker's process: run until SIGTERM/SIGINT, then finish the running batch; return the exit code.

    `prepare` runs before the models load (torch and the model libraries are imported only then)."""
    logging.getLogger().setLevel(logging.INFO)
    loader = engine_loader(prepare)

    async def main() -> int:
        worker = RemoteWorker(settings, redis_url, loader)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        return await worker.run()

    return asyncio.run(main())
