"""GPU workers through a real Redis (BullMQ): same results and order as in-process, and faults survived.

Each test runs real `i2p2i worker` processes with the stub engine (a sleep per step) against a
redis-server on a free loopback port, and the bot's queue in this process. Skipped where redis-server is
not installed, except in CI, where its absence fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from PIL import Image

from i2p2i_bot import remote
from i2p2i_bot.cards import status_text
from i2p2i_bot.config import GuideSettings, QueueSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.events import Subscription
from i2p2i_bot.gpu import GpuWorker
from i2p2i_bot.guides import Guide
from i2p2i_bot.jobs import EventKind, JobEvent, JobStatus
from i2p2i_bot.loras import Lora
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.remote import CLOSE_S, UNREACHABLE, RemoteRunner
from i2p2i_bot.remote_sources import DAMAGED, NOT_CARRIED, carry, source_key
from i2p2i_bot.remote_wire import CANCEL_KEY_PREFIX, RESULT_KEY_PREFIX, WORKER_KEY_PREFIX, sha256
from i2p2i_bot.request import GenerationParams
from i2p2i_bot.runner import JobRunner
from i2p2i_bot.source_images import GONE, SourceImages
from i2p2i_bot.store import Store
from i2p2i_bot.worker_capabilities import Capabilities, preset_ids
from tests.bot_harness import bot_settings, running_i2p2i
from tests.discord_fake import FakeDiscord, StoredMessage, running_fake_discord
from tests.fake_engine import FakeEngine
from tests.redis_server import ROOT, RedisServer, Workers, redis_server_path
from tests.requests import job_request
from tests.test_bot import button, describe, ephemeral_answer
from tests.test_jobs_engine import GENERATOR_MODULES, modules_built

if redis_server_path() is None:
    if os.environ.get("CI"):
        pytest.fail("redis-server is missing; .ci/run installs it", pytrace=False)
    pytest.skip("redis-server is not installed (apt-get install redis-server)", allow_module_level=True)

PARAMS = GenerationParams("fake", 4, 7.5, 64, 64, "dpm")
# The queue of the stub's workers by default: every preset, no guide, no LoRA.
PRESETS = FakeEngine().presets
PLAIN_QUEUE = Capabilities.of(presets=preset_ids(PRESETS)).queue
# Every wait in these tests is bounded by this; a run that needs longer is a failure, not a slow pass.
LIMIT_S = 40.0
LOCK_S = 2.0
T = TypeVar("T")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def workers(server: RedisServer, tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(server, tmp_path / "workers", step_s=0.05, lock_s=LOCK_S)
    yield pool
    pool.stop()


def remote_settings(server: RedisServer, **more: Any) -> QueueSettings:
    return QueueSettings(
        max_batch_images=4, backend="redis", redis_url=server.url, worker_lock_s=LOCK_S, **more
    )


async def bounded(awaitable: Awaitable[T], what: str, limit_s: float = LIMIT_S) -> T:
    """Await within limit_s; on a hang, fail with what hung and where every task of the loop waits."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=limit_s)
    if task in done:
        return task.result()
    stacks = "\n".join(_where(t) for t in asyncio.all_tasks() if t is not asyncio.current_task())
    task.cancel()  # not awaited: a task that ignores cancellation must not hang the test
    raise AssertionError(f"{what} did not finish within {limit_s:g} s; the loop's tasks:\n{stacks}")


def _where(task: asyncio.Task[Any]) -> str:
    out = io.StringIO()
    task.print_stack(limit=8, file=out)
    return out.getvalue()


async def until(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + LIMIT_S
    while loop.time() < give_up_at:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {LIMIT_S:g} s")


async def live_workers(server: RedisServer, n: int) -> None:
    client = server.client()

    def ready() -> bool:
        return len(list(client.scan_iter(match=WORKER_KEY_PREFIX + "*"))) >= n

    await until(ready, f"{n} workers reporting ready")


def bull_jobs(server: RedisServer) -> list[str]:
    """The BullMQ jobs Redis still holds, in any state."""
    client = server.client()
    keys = cast(list[bytes], client.keys(f"bull:{PLAIN_QUEUE}:*"))
    return [key.decode() for key in keys if key.decode().rpartition(":")[2].isdigit()]


def started_batches(pool: Workers) -> list[dict[str, object]]:
    if not pool.log.exists():
        return []
    return [json.loads(line) for line in pool.log.read_text().splitlines() if line.strip()]


async def image_rows(store: Store, job_id: int) -> list[tuple[int, str]]:
    rows = await store._fetchall(
        "SELECT image_index, sha256 FROM images WHERE job_id = ? ORDER BY image_index", (job_id,)
    )
    return [(row["image_index"], row["sha256"]) for row in rows]


def script() -> list[tuple[int, int, int]]:
    """(member, images, seed) of a workload where the ring's choices show: a heavy member and two light."""
    return [(1, 4, 100), (1, 4, 200), (1, 3, 300), (2, 1, 400), (3, 2, 500), (2, 2, 600), (3, 1, 700)]


async def run_script(queue: JobQueue, start: Callable[[], Awaitable[None]]) -> None:
    """Submit the script, then start whatever makes images, and wait until every job is finished."""
    for member, count, seed in script():
        await queue.submit(job_request(member, f"m{member}", PARAMS, count=count, seed=seed))
    await start()
    await bounded(queue.join(), "the queue emptying")


async def test_remote_workers_store_the_same_images_in_the_same_order_as_the_local_gpu(
    tmp_path: Path, server: RedisServer, workers: Workers
) -> None:
    """A scripted workload through one worker: the same batches in the same order, the same PNG bytes."""
    local_store = await Store.open(tmp_path / "local.sqlite3", images_dir=tmp_path / "local-images")
    local_queue = await JobQueue.open(local_store, QueueSettings(max_batch_images=4))
    gpu = GpuWorker()
    engine = FakeEngine()
    runner = JobRunner(local_queue, engine, gpu, timeout_s=30)

    async def start_local() -> None:
        runner.start()

    await run_script(local_queue, start_local)
    await runner.stop()
    gpu.close(timeout_s=5)

    workers.spawn(1)
    remote_store = await Store.open(tmp_path / "remote.sqlite3", images_dir=tmp_path / "remote-images")
    remote_queue = await JobQueue.open(remote_store, remote_settings(server))
    remote_runner = RemoteRunner(remote_queue, remote_settings(server), presets=PRESETS, poll_s=0.2)

    async def start_remote() -> None:
        await live_workers(server, 1)
        remote_runner.start()

    await run_script(remote_queue, start_remote)
    await bounded(remote_runner.stop(5), "the runner stopping", 5 + 2 * CLOSE_S)
    local_batches = [[spec.seed for spec in specs] for _, specs in engine.batches]
    assert [batch["seeds"] for batch in started_batches(workers)] == local_batches
    # A worker whose engine does not need torch starts without importing it (seconds on a small machine).
    assert [batch["torch"] for batch in started_batches(workers)] == [False] * len(local_batches)
    assert sum(len(b) for b in local_batches) == sum(n for _, n, _ in script())
    for job_id in range(1, len(script()) + 1):
        local_rows = await image_rows(local_store, job_id)
        assert local_rows == await image_rows(remote_store, job_id)
        for index, _ in local_rows:
            assert local_store.image_path(job_id, index).read_bytes() == (
                remote_store.image_path(job_id, index).read_bytes()
            )
    await local_store.close()
    await remote_store.close()


async def remote_queue(store: Store, server: RedisServer) -> tuple[JobQueue, RemoteRunner]:
    queue = await JobQueue.open(store, remote_settings(server))
    return queue, RemoteRunner(queue, remote_settings(server), presets=PRESETS, poll_s=0.2)


async def test_a_batch_whose_worker_is_killed_finishes_on_another_with_each_image_stored_once(
    store: Store, server: RedisServer, tmp_path: Path
) -> None:
    """SIGKILL the worker mid-batch: BullMQ finds the batch stalled, the other worker makes it, once."""
    pool = Workers(server, tmp_path / "slow", step_s=0.3, lock_s=LOCK_S)
    try:
        pool.spawn(2)
        await live_workers(server, 2)
        queue, runner = await remote_queue(store, server)
        runner.start()
        job = await queue.submit(job_request(1, "killed", PARAMS, count=3, seed=42))
        await until(lambda: len(started_batches(pool)) == 1, "the batch starting on a worker")
        (first,) = started_batches(pool)
        os.kill(int(str(first["pid"])), signal.SIGKILL)
        await bounded(queue.join(), "the queue emptying")
        await bounded(runner.stop(5), "the runner stopping", 5 + 2 * CLOSE_S)
        second = started_batches(pool)[1]
        assert second["seeds"] == first["seeds"] == [42, 43, 44]
        assert second["pid"] != first["pid"]
        stored = await store.get_job(job.id)
        assert stored is not None and stored.status is JobStatus.COMPLETE
        assert [index for index, _ in await image_rows(store, job.id)] == [0, 1, 2]
        assert bull_jobs(server) == []  # the made batch left Redis once taken
    finally:
        pool.stop()


async def test_a_paused_worker_past_its_lock_has_its_late_result_refused(
    store: Store, server: RedisServer, tmp_path: Path
) -> None:
    """SIGSTOP a worker until its lock lapses: another makes the batch; the first, resumed, is refused."""
    pool = Workers(server, tmp_path / "paused", step_s=0.3, lock_s=LOCK_S)
    try:
        pool.spawn(2)
        await live_workers(server, 2)
        queue, runner = await remote_queue(store, server)
        runner.start()
        job = await queue.submit(job_request(1, "paused", PARAMS, count=2, seed=7))
        await until(lambda: len(started_batches(pool)) == 1, "the batch starting on a worker")
        paused_pid = int(str(started_batches(pool)[0]["pid"]))
        (paused,) = [p for p in pool.processes if p.pid == paused_pid]
        os.kill(paused_pid, signal.SIGSTOP)
        try:
            await until(lambda: len(started_batches(pool)) == 2, "the batch starting on the other worker")
            await bounded(queue.join(), "the queue emptying")
        finally:
            os.kill(paused_pid, signal.SIGCONT)
        await until(
            lambda: "lost the hold" in pool.output(paused) or "Missing lock" in pool.output(paused),
            "the paused worker being refused",
        )
        await bounded(runner.stop(5), "the runner stopping", 5 + 2 * CLOSE_S)
        stored = await store.get_job(job.id)
        assert stored is not None and stored.status is JobStatus.COMPLETE
        assert [index for index, _ in await image_rows(store, job.id)] == [0, 1]
    finally:
        pool.stop()


async def test_the_bot_takes_jobs_while_redis_is_down_and_runs_them_when_it_returns(
    store: Store, server: RedisServer, workers: Workers
) -> None:
    """Redis stops for a few seconds: the runner says so, the queue still takes jobs, and all of them run."""
    workers.spawn(1)
    await live_workers(server, 1)
    queue, runner = await remote_queue(store, server)
    runner.start()
    first = await queue.submit(job_request(1, "before", PARAMS, count=2, seed=1))
    await bounded(queue.join(), "the queue emptying")
    server.stop()
    await until(lambda: runner.problem == UNREACHABLE, "the runner noticing Redis is gone")
    during = [await queue.submit(job_request(m, "during", PARAMS, count=2, seed=10 * m)) for m in (2, 3)]
    await asyncio.sleep(2.0)  # Redis stays down a while: nothing may be lost meanwhile
    server.start()
    await bounded(queue.join(), "the queue emptying")
    assert runner.problem is None
    await bounded(runner.stop(5), "the runner stopping", 5 + 2 * CLOSE_S)
    for job in (first, *during):
        stored = await store.get_job(job.id)
        assert stored is not None and stored.status is JobStatus.COMPLETE
        assert [index for index, _ in await image_rows(store, job.id)] == [0, 1]


def start_bot(
    server: RedisServer, db: Path, images: Path, *, count: int, seed: int
) -> subprocess.Popen[bytes]:
    """tests/remote_bot.py: a bot's queue and remote runner in a process of its own, with one job."""
    args = ["--db", str(db), "--images", str(images), "--redis", server.url, "--lock-s", str(LOCK_S)]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.remote_bot", *args, "--count", str(count), "--seed", str(seed)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("at_restart", ["on a worker", "made", "gone from Redis"])
async def test_a_restarted_bot_takes_back_the_batch_its_last_run_sent(
    tmp_path: Path, server: RedisServer, at_restart: str
) -> None:
    """The bot is SIGKILLed while a worker makes its batch; a new queue and runner on the same database
    follow the batch still on the worker, or take in the one made meanwhile, without making it again; a
    batch Redis lost is sent again. Each image is stored once and no result is left behind in Redis."""
    pool = Workers(server, tmp_path / "workers", step_s=0.4, lock_s=LOCK_S)
    db, images = tmp_path / "db.sqlite3", tmp_path / "images"
    bot = start_bot(server, db, images, count=3, seed=42)
    client = server.client()
    try:
        pool.spawn(1)
        await until(lambda: len(started_batches(pool)) == 1, "the batch starting on the worker")
        bot.kill()
        bot.wait(timeout=10)
        if at_restart == "made":
            await until(lambda: client.zcard(f"bull:{PLAIN_QUEUE}:completed") == 1, "the batch being made")
        elif at_restart == "gone from Redis":
            client.flushall()
        store = await Store.open(db, images_dir=images)
        queue, runner = await remote_queue(store, server)
        runner.start()
        await bounded(queue.join(), "the queue emptying")
        await bounded(runner.stop(5), "the runner stopping", 5 + 2 * CLOSE_S)
        stored = await store.get_job(1)
        assert stored is not None and stored.status is JobStatus.COMPLETE
        assert [index for index, _ in await image_rows(store, 1)] == [0, 1, 2]
        made = [batch["seeds"] for batch in started_batches(pool)]
        again = [[42, 43, 44]] if at_restart == "gone from Redis" else []
        assert made == [[42, 43, 44], *again]
        assert list(client.scan_iter(match=RESULT_KEY_PREFIX + "*")) == []
        await store.close()
    finally:
        if bot.poll() is None:
            bot.kill()
        pool.stop()


async def test_a_batch_past_the_job_timeout_fails_its_job_and_stops_on_its_worker(
    store: Store, server: RedisServer, tmp_path: Path
) -> None:
    """A batch still running after queue.job_timeout_s fails its job with the reason, and its worker,
    told through Redis, stops it at the next step instead of making it to the end: no PNG reaches Redis."""
    pool = Workers(server, tmp_path / "slow", step_s=0.5, lock_s=LOCK_S)
    try:
        pool.spawn(1)
        await live_workers(server, 1)
        settings = remote_settings(server, job_timeout_s=1.0)
        queue = await JobQueue.open(store, settings)
        runner = RemoteRunner(queue, settings, presets=PRESETS, poll_s=0.2)
        runner.start()
        slow = dataclasses.replace(PARAMS, steps=12)  # 6 s on the worker
        job = await queue.submit(job_request(1, "slow", slow, count=2, seed=5))
        await bounded(queue.join(), "the queue emptying")
        stored = await store.get_job(job.id)
        assert stored is not None and stored.status is JobStatus.FAILED
        assert stored.error == "generation took longer than 1 s and was abandoned"
        (worker,) = pool.processes
        await until(lambda: "the bot gave up on it; stopped" in pool.output(worker), "the worker stopping it")
        # The worker held the job when the bot gave up on it; once it lets go, the job leaves Redis, and
        # then its cancel key (a command after the removal).
        client = server.client()

        def nothing_left() -> bool:
            return not bull_jobs(server) and not list(client.scan_iter(match=CANCEL_KEY_PREFIX + "*"))

        await until(nothing_left, "the failed batch and its cancel key leaving Redis")
        assert list(client.scan_iter(match=RESULT_KEY_PREFIX + "*")) == []
        assert await image_rows(store, job.id) == []
        await bounded(runner.stop(5), "the runner stopping", 5 + 2 * CLOSE_S)
    finally:
        pool.stop()


async def test_stopping_the_runner_at_any_moment_ends_within_its_bound(
    store: Store, server: RedisServer
) -> None:
    """Stops that land in the middle of Redis commands: on Python 3.11 redis-py's wait_for can drop the
    cancellation of a helper task, which once left stop() waiting forever; every stop now ends in time."""
    settings = remote_settings(server)
    rng = random.Random(7)
    for _ in range(20):
        queue = await JobQueue.open(store, settings)
        # The watch sends commands without a pause.
        runner = RemoteRunner(queue, settings, presets=PRESETS, poll_s=0.0)
        runner.start()
        await asyncio.sleep(rng.uniform(0.0, 0.1))
        await bounded(runner.stop(1), "the runner stopping", 1 + 2 * CLOSE_S)
        assert not runner.running


# -- guided batches and workers that differ ------------------------------------------------------------

EDGES = dataclasses.replace(PARAMS, keep=(Guide("edges", 0.8),))
SOURCE = "ab" * 32  # a source's name: the sha256 of the member's upload


def bot_source(tmp_path: Path) -> tuple[Path, bytes]:
    """The bot's sources folder, holding SOURCE as the bot keeps it, and its PNG bytes."""
    sources = tmp_path / "bot-data" / "sources"
    path = SourceImages(sources).save(SOURCE, Image.new("RGB", (64, 64), (200, 30, 90)))
    return sources, path.read_bytes()


async def guided_runner(
    store: Store, server: RedisServer, sources: Path | None
) -> tuple[JobQueue, RemoteRunner]:
    queue = await JobQueue.open(store, remote_settings(server))
    runner = RemoteRunner(queue, remote_settings(server), presets=PRESETS, poll_s=0.2, sources_dir=sources)
    return queue, runner


async def test_a_guided_batch_reaches_a_worker_on_another_data_folder_with_the_bots_exact_source(
    store: Store, server: RedisServer, tmp_path: Path
) -> None:
    """The worker's data folder is not the bot's: the source travels through Redis, the worker keeps the
    very bytes the bot holds, and its engine reads them for each image."""
    sources, png = bot_source(tmp_path)
    pool = Workers(server, tmp_path / "edges", step_s=0.05, lock_s=LOCK_S, guides=("edges",))
    try:
        pool.spawn(1)
        await live_workers(server, 1)
        queue, runner = await guided_runner(store, server, sources)
        runner.start()
        job = await queue.submit(job_request(1, "kite", EDGES, count=2, seed=3, guide_source=SOURCE))
        await bounded(queue.join(), "the queue emptying")
        await bounded(runner.stop(5), "the runner stopping", 5 + 2 * CLOSE_S)
        stored = await store.get_job(job.id)
        assert stored is not None and stored.status is JobStatus.COMPLETE, stored
        assert [index for index, _ in await image_rows(store, job.id)] == [0, 1]
        assert pool.data != sources.parent
        assert (pool.data / "sources" / f"{SOURCE}.png").read_bytes() == png
        (batch,) = started_batches(pool)
        assert batch["guides"] == ["edges"] and batch["sources"] == [sha256(png)] * 2
    finally:
        pool.stop()


@pytest.mark.parametrize("harm", ["damaged in Redis", "lost from Redis", "gone from the bot"])
async def test_a_source_that_cannot_reach_the_worker_fails_its_job_with_one_sentence(
    store: Store, server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, harm: str
) -> None:
    """A source damaged or lost on its way fails the batch with one sentence; the worker keeps nothing
    and goes on to make the next job. A source the bot no longer keeps is never sent."""
    sources, png = bot_source(tmp_path)
    client = server.client()

    async def harmed(*args: Any) -> dict[str, str]:
        digests = await carry(*args)
        if harm == "damaged in Redis":
            client.set(source_key(SOURCE), png[:-8])
        elif harm == "lost from Redis":
            client.delete(source_key(SOURCE))
        return digests

    monkeypatch.setattr(remote, "carry", harmed)
    if harm == "gone from the bot":
        (sources / f"{SOURCE}.png").unlink()
    pool = Workers(server, tmp_path / "edges", step_s=0.05, lock_s=LOCK_S, guides=("edges",))
    try:
        pool.spawn(1)
        await live_workers(server, 1)
        queue, runner = await guided_runner(store, server, sources)
        runner.start()
        job = await queue.submit(job_request(1, "kite", EDGES, count=2, seed=3, guide_source=SOURCE))
        await bounded(queue.join(), "the queue emptying")
        after = await queue.submit(job_request(2, "plain", PARAMS, count=1, seed=9))
        await bounded(queue.join(), "the queue emptying again")
        await bounded(runner.stop(5), "the runner stopping", 5 + 2 * CLOSE_S)
        stored = await store.get_job(job.id)
        assert stored is not None and stored.status is JobStatus.FAILED
        assert (
            stored.error
            == {
                "damaged in Redis": DAMAGED,
                "lost from Redis": NOT_CARRIED,
                "gone from the bot": GONE,
            }[harm]
        )
        assert await image_rows(store, job.id) == []
        assert not (pool.data / "sources" / f"{SOURCE}.png").exists()
        made = await store.get_job(after.id)
        assert made is not None and made.status is JobStatus.COMPLETE
        assert [batch["seeds"] for batch in started_batches(pool)] == [[9]]
        assert all(process.poll() is None for process in pool.processes)
    finally:
        pool.stop()


async def test_batches_go_only_to_workers_that_can_run_them_and_a_job_nobody_can_run_waits(
    store: Store, server: RedisServer, tmp_path: Path
) -> None:
    """Two workers, one offering edges and one nothing beyond the prompt. While only the plain one is live,
    an edges job waits, saying why, and plain jobs queued behind it run; once the edges worker is live the
    job runs there, and no worker is ever given a batch it cannot make."""
    sources, _ = bot_source(tmp_path)
    plain = Workers(server, tmp_path / "plain", step_s=0.05, lock_s=LOCK_S)
    edges = Workers(server, tmp_path / "edges", step_s=0.05, lock_s=LOCK_S, guides=("edges",))
    try:
        plain.spawn(1)
        await live_workers(server, 1)
        queue, runner = await guided_runner(store, server, sources)
        events = queue.subscribe()
        runner.start()
        guided = await queue.submit(job_request(1, "kite", EDGES, count=3, seed=30, guide_source=SOURCE))
        first = await queue.submit(job_request(2, "plain", PARAMS, count=2, seed=40))
        reason = "waiting for a GPU worker that can keep edges"
        await until(lambda: queue.position(guided.id) is not None, "the job being queued")

        async def plain_done() -> bool:
            job = await store.get_job(first.id)
            return job is not None and job.status is JobStatus.COMPLETE

        await until(plain_done, "the plain job finishing on the plain worker")
        position = queue.position(guided.id)
        assert position is not None and position.blocked == reason
        assert status_text(guided, position, locale=None) == f"⏳ Job #{guided.id} is queued, {reason}."
        waiting = await bounded(events_of(events, guided.id, EventKind.WAITING), "the waiting event")
        assert waiting.error == reason
        stored = await store.get_job(guided.id)
        assert stored is not None and stored.status is JobStatus.QUEUED and stored.error is None

        edges.spawn(1)
        await bounded(queue.join(), "the queue emptying")
        later = await queue.submit(job_request(3, "more", PARAMS, count=1, seed=50))
        more = await queue.submit(job_request(1, "kite", EDGES, count=1, seed=60, guide_source=SOURCE))
        await bounded(queue.join(), "the queue emptying again")
        await bounded(runner.stop(5), "the runner stopping", 5 + 2 * CLOSE_S)
        for job in (guided, first, later, more):
            done = await store.get_job(job.id)
            assert done is not None and done.status is JobStatus.COMPLETE, done
        assert all(batch["guides"] == [] for batch in started_batches(plain))
        assert [40, 41] in [batch["seeds"] for batch in started_batches(plain)]
        guided_seeds = sorted(
            s for b in started_batches(edges) if b["guides"] for s in cast(list[int], b["seeds"])
        )
        assert guided_seeds == [30, 31, 32, 60]
        lifted = await bounded(events_of(events, guided.id, EventKind.WAITING), "the waiting lifted")
        assert lifted.error is None
    finally:
        plain.stop()
        edges.stop()


async def events_of(subscription: Subscription, job_id: int, kind: EventKind) -> JobEvent:
    """The next event of this kind for this job."""
    while True:
        event = await subscription.get()
        if event.job_id == job_id and event.kind is kind:
            return event


async def waiting_then_run(
    store: Store,
    server: RedisServer,
    first: Workers,
    then: Workers,
    wanted: GenerationParams,
    prompt: str,
    reason: str,
) -> None:
    """With only `first` live, a job with `wanted` waits saying `reason` while a plain job behind it runs
    on `first`; once `then` is live, the job runs there."""
    first.spawn(1)
    await live_workers(server, 1)
    queue, runner = await remote_queue(store, server)
    events = queue.subscribe()
    runner.start()
    waiting = await queue.submit(job_request(1, prompt, wanted, count=3, seed=30))
    plain = await queue.submit(job_request(2, "plain", PARAMS, count=2, seed=40))

    async def plain_done() -> bool:
        job = await store.get_job(plain.id)
        return job is not None and job.status is JobStatus.COMPLETE

    await until(plain_done, "the plain job finishing on the first worker")
    position = queue.position(waiting.id)
    assert position is not None and position.blocked == reason
    assert status_text(waiting, position, locale=None) == f"⏳ Job #{waiting.id} is queued, {reason}."
    said = await bounded(events_of(events, waiting.id, EventKind.WAITING), "the waiting event")
    assert said.error == reason
    then.spawn(1)
    await bounded(queue.join(), "the queue emptying")
    await bounded(runner.stop(5), "the runner stopping", 5 + 2 * CLOSE_S)
    done = await store.get_job(waiting.id)
    assert done is not None and done.status is JobStatus.COMPLETE, done
    assert [batch["seeds"] for batch in started_batches(first)] == [[40, 41]]
    assert [batch["seeds"] for batch in started_batches(then)] == [[30, 31, 32]]


async def test_a_batch_goes_only_to_workers_that_have_its_model_and_waits_naming_it(
    store: Store, server: RedisServer, tmp_path: Path
) -> None:
    """Two workers with different presets: while only the one without "other" is live, an "other" job
    waits naming the model and a plain job behind it runs; the job then runs on the worker that has it."""
    base = Workers(server, tmp_path / "base", step_s=0.05, lock_s=LOCK_S, presets=("sd-v1-4",))
    both = Workers(server, tmp_path / "both", step_s=0.05, lock_s=LOCK_S, presets=("sd-v1-4", "other"))
    other = dataclasses.replace(PARAMS, preset="other")
    reason = "waiting for a GPU worker that has the model other"
    try:
        await waiting_then_run(store, server, base, both, other, "kite", reason)
        assert [batch["preset"] for batch in started_batches(both)] == ["other"]
    finally:
        base.stop()
        both.stop()


async def test_a_worker_whose_config_gives_a_preset_other_weights_gets_none_of_its_jobs(
    server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose config maps "other" to another generator than the bot's makes plain jobs but no
    "other" job, which waits naming the model; the bot warns once and /admin queue names both sides in
    one line; a worker that matches the bot then makes the job, recorded with the bot's generator."""
    differing = Workers(
        server, tmp_path / "differing", step_s=0.01, lock_s=LOCK_S, generators={"other": "/w/fake-other-b"}
    )
    matching = Workers(server, tmp_path / "matching", step_s=0.01, lock_s=LOCK_S)
    differing.spawn(1)
    queue = {"backend": "redis", "redis_url": server.url, "worker_lock_s": LOCK_S, "max_batch_images": 4}
    try:
        async with running_fake_discord() as discord:
            settings = bot_settings(Settings(), tmp_path / "data", discord, **queue)
            async with running_i2p2i(settings, discord, FakeEngine()) as bot:
                await bounded(live_workers(server, 1), "the differing worker starting")
                wanted = await discord.push_slash(
                    "imagine", {"prompt": "a red kite", "model": "other", "count": 1}
                )
                # Queued before the plain one, so it is job #1: requests are planned on threads, and two
                # pushed at once may be numbered in either order.
                await bounded(wanted.wait_followup(timeout_s=LIMIT_S), "the other job's message")
                plain = await discord.push_slash("imagine", {"prompt": "a blue kite", "count": 1}, user="bob")
                await bounded(plain.wait_followup(timeout_s=LIMIT_S), "the plain job's message")

                async def done(job_id: int) -> bool:
                    job = await bot.store.get_job(job_id)
                    return job is not None and job.status is JobStatus.COMPLETE

                await until(lambda: done(2), "the plain job finishing on the differing worker")
                waiting = "⏳ Job #1 is queued, waiting for a GPU worker that has the model other."
                await discord.wait_until(
                    lambda: waiting in [m.content for m in (wanted.original, *wanted.followups) if m],
                    timeout_s=LIMIT_S,
                    what="the waiting line",
                )
                listing = await bounded(discord.push_slash("admin queue", user="owner"), "/admin queue")
                content = (await bounded(listing.wait_response(), "its answer")).json["data"]["content"]
                assert content.splitlines()[0] == (
                    "⚠️ GPU workers get no jobs of a preset they have with other weights than the bot: "
                    "other (sd1:fake-other-b on a worker, sd1:fake-other in the bot's config)."
                )

                matching.spawn(1)
                await until(lambda: done(1), "the other job finishing on the matching worker")
                record = await bot.store.job_record(1)
                assert record is not None and len(record.images) == 1
                assert record.job.request.model == "fake-other"
        assert [b["preset"] for b in started_batches(differing)] == ["sd-v1-4"]
        assert [b["preset"] for b in started_batches(matching)] == ["other"]
        # Seen at every watch from the first until the matching worker was found: warned of once.
        warned = [r.getMessage() for r in caplog.records if r.name == remote.__name__ and "preset" in r.msg]
        assert len(warned) == 1, warned
        assert "has preset other as sd1:fake-other-b, the bot as sd1:fake-other" in warned[0]
    finally:
        differing.stop()
        matching.stop()


def write_lora(folder: Path, name: str) -> str:
    """A LoRA file as the library lists it (a safetensors header and no tensors); returns its sha256."""
    header = json.dumps({"__metadata__": {"ss_base_model_version": "sd_v1"}}).encode()
    data = len(header).to_bytes(8, "little") + header
    (folder / f"{name}.safetensors").write_bytes(data)
    return sha256(data)


async def test_a_batch_with_a_lora_goes_only_to_the_worker_with_its_file_and_waits_naming_it(
    store: Store, server: RedisServer, tmp_path: Path
) -> None:
    """Two workers alike but for one LoRA file (and a file of the same name with other bytes on the
    first): a job using it waits naming the LoRA, then runs on the worker holding that very file."""
    plain = Workers(server, tmp_path / "plain", step_s=0.05, lock_s=LOCK_S)
    inked = Workers(server, tmp_path / "inked", step_s=0.05, lock_s=LOCK_S)
    digest = write_lora(inked.lora_dir, "ink")
    (plain.lora_dir / "ink.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    ink = dataclasses.replace(PARAMS, loras=(Lora("ink", 0.8, digest),))
    try:
        await waiting_then_run(
            store,
            server,
            plain,
            inked,
            ink,
            "<lora:ink:0.8> kite",
            "waiting for a GPU worker that has the LoRA ink",
        )
        assert [batch["loras"] for batch in started_batches(inked)] == [["ink"]]
    finally:
        plain.stop()
        inked.stop()


def worker_capabilities(server: RedisServer) -> list[Capabilities]:
    """The capabilities each live worker's record in Redis announces, checked against the queue it names."""
    client = server.client()
    found = []
    for key in client.scan_iter(match=WORKER_KEY_PREFIX + "*"):
        record = {k.decode(): v.decode() for k, v in cast(dict[bytes, bytes], client.hgetall(key)).items()}
        capabilities = Capabilities.from_record(record)
        assert record["queue"] == capabilities.queue
        found.append(capabilities)
    return found


async def test_a_lora_copied_into_a_running_worker_is_used_without_a_restart_and_one_removed_is_not(
    store: Store, server: RedisServer, tmp_path: Path
) -> None:
    """A job naming the LoRA ink waits, saying so; the file is copied into the worker's folder while it
    makes a plain batch: that batch is made once, then the same worker process (no restart) moves to its
    new queue and makes the job, once. Once the file is removed, the next job naming it waits again while a
    plain job behind it runs on that worker."""
    pool = Workers(server, tmp_path / "workers", step_s=0.1, lock_s=LOCK_S, rescan_s=0.1)
    staged = tmp_path / "staged"
    staged.mkdir()
    digest = write_lora(staged, "ink")
    ink = dataclasses.replace(PARAMS, loras=(Lora("ink", 0.8, digest),))
    reason = "waiting for a GPU worker that has the LoRA ink"
    presets = preset_ids(PRESETS)
    try:
        (process,) = pool.spawn(1)
        await live_workers(server, 1)
        queue, runner = await remote_queue(store, server)
        events = queue.subscribe()
        runner.start()
        waiting = await queue.submit(job_request(1, "<lora:ink:0.8> kite", ink, count=3, seed=30))
        plain = await queue.submit(job_request(2, "plain", PARAMS, count=2, seed=40))
        said = await bounded(events_of(events, waiting.id, EventKind.WAITING), "the waiting event")
        assert said.error == reason
        position = queue.position(waiting.id)
        assert position is not None and position.blocked == reason
        await until(lambda: len(started_batches(pool)) == 1, "the plain batch starting on the worker")
        shutil.copy(staged / "ink.safetensors", pool.lora_dir / "ink.safetensors")
        await bounded(queue.join(), "the queue emptying", 10)
        for job in (waiting, plain):
            done = await store.get_job(job.id)
            assert done is not None and done.status is JobStatus.COMPLETE, done
        assert len(await image_rows(store, waiting.id)) == 3
        batches = started_batches(pool)
        assert [(b["seeds"], b["loras"]) for b in batches] == [([40, 41], []), ([30, 31, 32], ["ink"])]
        assert {b["pid"] for b in batches} == {process.pid} and process.poll() is None
        assert worker_capabilities(server) == [Capabilities.of(presets=presets, loras=[("ink", digest)])]

        (pool.lora_dir / "ink.safetensors").unlink()
        await until(
            lambda: worker_capabilities(server) == [Capabilities.of(presets=presets)],
            "the worker announcing the LoRA gone",
        )
        again = await queue.submit(job_request(1, "<lora:ink:0.8> kite", ink, count=1, seed=60))
        after = await queue.submit(job_request(2, "plain", PARAMS, count=1, seed=70))

        async def after_done() -> bool:
            job = await store.get_job(after.id)
            return job is not None and job.status is JobStatus.COMPLETE

        await until(after_done, "the plain job behind it finishing")
        position = queue.position(again.id)
        assert position is not None and position.blocked == reason
        assert [b["seeds"] for b in started_batches(pool)] == [[40, 41], [30, 31, 32], [70]]
        assert process.poll() is None
        await bounded(runner.stop(5), "the runner stopping", 5 + 2 * CLOSE_S)
    finally:
        pool.stop()


async def test_a_bot_in_redis_mode_loads_no_generator_and_a_worker_makes_what_it_offers(
    tmp_path: Path,
    server: RedisServer,
    base_settings: Settings,
    describing_cache: Path,
    astronaut: Image.Image,
) -> None:
    """With queue.backend = "redis" the bot starts over models without any UNet, VAE or safety checker and
    never builds a generator; it describes an image, its card offers the guides enabled in [guides] (no
    ControlNet here), a worker makes the card's plain and edges jobs, /settings offers every preset, and a
    job for a preset no worker has waits for one rather than being refused."""
    # The worker's sd-v1-4 is the bot's smoke generator, in a folder of its own.
    same = {"sd-v1-4": str(tmp_path / "elsewhere" / "generator")}
    pool = Workers(
        server, tmp_path / "workers", step_s=0.01, lock_s=LOCK_S, guides=("layout", "edges"), generators=same
    )
    pool.spawn(1)
    try:
        models = dataclasses.replace(base_settings.models, cache_dir=str(describing_cache))
        describing = dataclasses.replace(
            base_settings, models=models, guides=GuideSettings(enabled=["edges", "layout"])
        )
        queue = {"backend": "redis", "redis_url": server.url, "worker_lock_s": LOCK_S, "max_batch_images": 4}
        async with running_fake_discord() as discord:
            settings = bot_settings(describing, tmp_path / "data", discord, **queue)
            with modules_built() as built:
                async with running_i2p2i(settings, discord, None) as bot:
                    engine = bot.engine
                    assert isinstance(engine, Engine) and not engine.generates
                    await live_workers(server, 1)

                    _, card = await describe(discord, astronaut)
                    assert card.embeds[0]["title"] == "Prompt · best"
                    keep = button(card, "i2p:card:keep:")
                    select = card.component(keep)
                    assert select is not None
                    assert [o["value"] for o in select["options"]] == ["prompt", "layout", "edges"]
                    await made(discord, card)
                    chosen = await discord.push_select(card, keep, ["edges"])
                    assert (await chosen.wait_response()).json["type"] == 7
                    await made(discord, discord.message(card.id))
                    stored = await bot.store.get_interrogation(1)
                    assert stored is not None
                    batches = started_batches(pool)
                    assert [(b["preset"], b["guides"]) for b in batches] == [
                        ("sd-v1-4", []),
                        ("sd-v1-4", ["edges"]),
                    ]
                    assert batches[1]["sources"] == [stored.source_sha256]
                    for job_id in (1, 2):
                        record = await bot.store.job_record(job_id)
                        assert record is not None and record.job.status == "complete"
                        assert len(record.images) == 1

                    # sdxl's UNet is not on the bot's machine, nor is the preset on the worker: /settings
                    # offers it, and a job of it waits for a worker that has it.
                    answer = await discord.push_slash(
                        "settings set", {"key": "model", "value": "sdxl"}, user="owner"
                    )
                    assert await ephemeral_answer(answer) == "Set model to sdxl for this server."
                    wanted = await discord.push_slash("imagine", {"prompt": "a red kite"})
                    await wanted.wait_followup(timeout_s=LIMIT_S)
                    waiting = "⏳ Job #3 is queued, waiting for a GPU worker that has the model sdxl."
                    await discord.wait_until(
                        lambda: waiting in [m.content for m in (wanted.original, *wanted.followups) if m],
                        timeout_s=LIMIT_S,
                        what="the waiting line",
                    )
                    assert engine.resident_presets == ()
            assert built & GENERATOR_MODULES == set()
            assert {"VisionTransformer", "BlipVisionEmbeddings"} <= built
    finally:
        pool.stop()


async def made(discord: FakeDiscord, card: StoredMessage) -> StoredMessage:
    """Press a card's Generate and wait for the job's message to carry its images."""
    press = await discord.push_button(card, button(card, "i2p:card:gen:"))
    await press.wait_followup(timeout_s=LIMIT_S)

    def result() -> StoredMessage | None:
        message = press.original
        return message if message is not None and message.attachments else None

    return await discord.wait_until(result, timeout_s=LIMIT_S, what="the job's images")
