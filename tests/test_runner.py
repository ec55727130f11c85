"""The runner on a real GPU thread with a zero-cost engine: order, files, progress, timeouts, stop."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import threading
from collections.abc import Callable, Sequence

from PIL import Image

from i2p2i_bot.cards import status_text
from i2p2i_bot.config import QueueSettings
from i2p2i_bot.gpu import GpuFault, GpuWorker
from i2p2i_bot.interrogation import Interrogation
from i2p2i_bot.interrogation_cache import InterrogationCache
from i2p2i_bot.jobs import EventKind, JobRequest
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.request import GenerationError, GenerationParams, ImageSpec
from i2p2i_bot.runner import GPU_FAULT_REASON, JobRunner
from i2p2i_bot.store import Store
from tests.fake_engine import FakeEngine, OneModelEngine, seed_colour
from tests.requests import job_request

PARAMS = GenerationParams("tiny", 3, 7.5, 64, 64, "dpm")
A, B, C = 1, 2, 3
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def request(owner: int, count: int = 1, prompt: str | None = None) -> JobRequest:
    return job_request(owner, prompt or f"user {owner}", PARAMS, count=count)


async def until(condition: Callable[[], bool]) -> None:
    """Wait for something another thread does; the limit only keeps a broken test from hanging."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


async def statuses(store: Store, *job_ids: int) -> list[str]:
    jobs = [await store.get_job(job_id) for job_id in job_ids]
    return [job.status.value if job else "missing" for job in jobs]


async def test_a_late_single_image_lands_in_the_first_or_second_batch(store: Store, gpu: GpuWorker) -> None:
    """With the runner going, A queues 5 jobs of 8 then B 1 image: B's image is in batch 1 or 2."""
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=8))
    engine = FakeEngine()
    engine.gate.clear()  # the first batch stays on the GPU while the members queue their jobs
    runner = JobRunner(queue, engine, gpu, timeout_s=30)
    runner.start()
    for _ in range(5):
        await queue.submit(request(A, 8))
    await queue.submit(request(B, 1))
    engine.gate.set()
    await queue.join()
    await runner.stop()
    owners = engine.owners_by_batch(lambda prompt: prompt)
    assert len(owners) == 6
    assert [i for i, batch in enumerate(owners) if "user 2" in batch] in ([0], [1])
    assert sum(batch.count("user 1") for batch in owners) == 40


async def test_three_users_in_the_recorded_batches(store: Store, gpu: GpuWorker) -> None:
    """The engine receives batches that interleave three members round-robin, and every image is stored."""
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=3))
    engine = FakeEngine()
    for owner, count in ((A, 3), (A, 3), (B, 2), (C, 1)):
        await queue.submit(request(owner, count, prompt="ABC"[owner - 1]))
    runner = JobRunner(queue, engine, gpu, timeout_s=30)
    runner.start()
    await queue.join()
    await runner.stop()
    assert engine.owners_by_batch(lambda prompt: prompt) == [
        ["A", "B", "C"],
        ["A", "B", "A"],
        ["A", "A", "A"],
    ]
    assert (await store.global_stats()).images == 9


async def test_images_are_stored_as_pngs_with_their_seed_and_hash(store: Store, gpu: GpuWorker) -> None:
    """Each image becomes images/<job>/<index>.png; its pixels match its seed and its row holds its sha256."""
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=2))
    runner = JobRunner(queue, FakeEngine(), gpu, timeout_s=30)
    runner.start()
    job = await queue.submit(job_request(A, "x", PARAMS, count=3, seed=70000))
    await queue.join()
    await runner.stop()
    record = await store.job_record(job.id)
    assert record is not None and record.job.status.value == "complete"
    assert [(i.index, i.seed) for i in record.images] == [(0, 70000), (1, 70001), (2, 70002)]
    for image in record.images:
        path = store.image_path(job.id, image.index)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == image.sha256
        assert Image.open(path).getpixel((0, 0)) == seed_colour(image.seed)


async def test_step_progress_hops_from_the_gpu_thread_to_subscribers(store: Store, gpu: GpuWorker) -> None:
    """on_step runs on the GPU thread and reaches subscribers as step k/n events, in order, up to n/n."""
    queue = await JobQueue.open(store, QueueSettings())
    engine = FakeEngine()
    runner = JobRunner(queue, engine, gpu, timeout_s=30)
    job = await queue.submit(request(A, 2))
    subscription = queue.subscribe(job_id=job.id)
    runner.start()
    events = [event async for event in subscription]
    await runner.stop()
    assert engine.step_threads == {gpu.thread}
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.STARTED and kinds[-3:] == [
        EventKind.IMAGE,
        EventKind.IMAGE,
        EventKind.FINISHED,
    ]
    # A loop that falls behind sees fewer steps, never an old one after a newer one, and always the last.
    steps = [(e.step, e.total_steps) for e in events[1:-3]]
    assert steps and steps == sorted(set(steps)) and steps[-1] == (3, 3)
    assert {e.kind for e in events[1:-3]} == {EventKind.STEP}


async def test_a_batch_past_the_timeout_fails_and_the_queue_goes_on(store: Store, gpu: GpuWorker) -> None:
    """A batch still running after job_timeout_s fails its jobs with the reason; the next job completes."""
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=1))
    engine = FakeEngine()
    engine.gate.clear()
    runner = JobRunner(queue, engine, gpu, timeout_s=0.2)
    runner.start()
    stuck = await queue.submit(request(A))
    waiting = queue.subscribe(job_id=stuck.id)
    later = await queue.submit(request(B))
    events = [event async for event in waiting]
    engine.gate.set()
    await queue.join()
    await runner.stop()
    assert [e.kind for e in events][-1] is EventKind.FAILED
    failed = await store.job_record(stuck.id)
    assert failed is not None and failed.images == ()
    assert failed.job.error == "generation took longer than 0.2 s and was abandoned"
    assert await statuses(store, later.id) == ["complete"]


async def test_engine_errors_become_permanent_or_retried_failures(store: Store, gpu: GpuWorker) -> None:
    """A GenerationError fails the job at once with its sentence; an unexpected one is retried, then fails."""

    def fail(params: GenerationParams, specs: Sequence[ImageSpec]) -> Exception | None:
        if specs[0].prompt == "too big":
            return GenerationError("Images can be at most 768 pixels wide.")
        return (
            RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR") if specs[0].prompt == "flaky" else None
        )

    queue = await JobQueue.open(store, QueueSettings(max_batch_images=1, max_attempts=2))
    engine = FakeEngine(fail=fail)
    runner = JobRunner(queue, engine, gpu, timeout_s=30)
    big = await queue.submit(request(A, prompt="too big"))
    flaky = await queue.submit(request(B, prompt="flaky"))
    runner.start()
    await queue.join()
    await runner.stop()
    big_job, flaky_job = await store.get_job(big.id), await store.get_job(flaky.id)
    assert big_job is not None and flaky_job is not None
    assert (big_job.status.value, big_job.attempts, big_job.error) == (
        "failed",
        0,
        "Images can be at most 768 pixels wide.",
    )
    assert (flaky_job.status.value, flaky_job.attempts) == ("failed", 2)
    assert (
        flaky_job.error == "generation failed with an internal error (RuntimeError) (gave up after 2 tries)"
    )
    assert [specs[0].prompt for _, specs in engine.batches] == ["too big", "flaky", "flaky"]


async def test_an_interrogation_overtakes_a_waiting_batch(store: Store, gpu: GpuWorker) -> None:
    """Interrogations share the GPU thread with priority: one submitted after a batch still runs first."""
    order: list[str] = []
    engine = FakeEngine(on_batch=lambda n, params, specs: order.append("generate"))
    queue = await JobQueue.open(store, QueueSettings())
    runner = JobRunner(queue, engine, gpu, timeout_s=30)
    busy = threading.Event()
    gpu.submit(busy.wait, 5)  # something long already on the GPU thread
    runner.start()
    await queue.submit(request(A))
    await until(lambda: gpu.pending() == 1)  # the batch waits behind it

    def interrogate() -> Interrogation:
        order.append("interrogate")
        return Interrogation("best", "a cat", 0.3, "a cat", None, (), (1.0, 0.0))

    cache = InterrogationCache(store, gpu)
    asking = asyncio.create_task(
        cache.interrogate(interrogate, source_sha256="s", mode="best", models={"clip": "c"}, user_id=B)
    )
    await until(lambda: gpu.pending() == 2)
    busy.set()
    described = await asking
    await queue.join()
    await runner.stop()
    assert order == ["interrogate", "generate"]
    assert described.interrogation.prompt == "a cat" and not described.cached


async def test_stop_lets_the_running_batch_finish_and_takes_no_more(store: Store, gpu: GpuWorker) -> None:
    """On stop, the batch on the GPU is finished and stored; queued jobs stay queued for the next start."""
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=1))
    engine = FakeEngine()
    engine.gate.clear()
    runner = JobRunner(queue, engine, gpu, timeout_s=30)
    first = await queue.submit(request(A))
    second = await queue.submit(request(B))
    task = runner.start()
    await asyncio.to_thread(engine.entered.wait, 5)
    stopping = asyncio.create_task(runner.stop(grace_s=30))
    await asyncio.sleep(0.05)
    assert not task.done()
    engine.gate.set()
    await stopping
    assert task.done() and queue.closed
    assert await statuses(store, first.id, second.id) == ["complete", "queued"]
    assert len(engine.batches) == 1


async def test_stop_after_the_grace_period_hands_the_batch_back_uncharged(
    store: Store, gpu: GpuWorker
) -> None:
    """A batch still running after the grace period is handed back uncharged and redone on the next start."""
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=2))
    engine = FakeEngine()
    engine.gate.clear()
    runner = JobRunner(queue, engine, gpu, timeout_s=30)
    job = await queue.submit(request(A, 2))
    runner.start()
    try:
        await asyncio.to_thread(engine.entered.wait, 5)
        await runner.stop(grace_s=0.05)
        stopped = await store.get_job(job.id)
        assert stopped is not None and (stopped.status.value, stopped.attempts) == ("running", 0)
        assert await store.stored_indices([job.id]) == {}
    finally:
        engine.gate.set()

    revived = await JobQueue.open(store, QueueSettings(max_batch_images=2))
    assert [(j.id, j.attempts) for j in revived.active_jobs()] == [(job.id, 0)]
    again = JobRunner(revived, FakeEngine(), gpu, timeout_s=30)
    again.start()
    await revived.join()
    await again.stop()
    assert await statuses(store, job.id) == ["complete"]
    assert await store.stored_indices([job.id]) == {job.id: {0, 1}}


async def test_a_batch_that_breaks_the_gpu_waits_for_a_restart_and_only_its_culprit_fails(
    store: Store, gpu: GpuWorker
) -> None:
    """A CUDA fault holds its batch's jobs, in flight, with the reason and a HELD event, and the runner
    stops, so the job behind is not failed too. Each restart charges the held jobs an attempt and runs
    them alone: the job that shared the batch finishes, and the job that breaks the GPU every time fails
    after max_attempts with the reason."""

    def fail(params: GenerationParams, specs: Sequence[ImageSpec]) -> Exception | None:
        return RuntimeError(ILLEGAL_ACCESS) if any(s.prompt == "broken" for s in specs) else None

    settings = QueueSettings(max_batch_images=2, max_attempts=3)
    queue = await JobQueue.open(store, settings)
    engine = FakeEngine(fail=fail)
    runner = JobRunner(queue, engine, gpu, timeout_s=30)
    broken = await queue.submit(request(A, prompt="broken"))
    beside = await queue.submit(request(B))
    behind = await queue.submit(request(C))
    with queue.subscribe() as events:
        await asyncio.wait_for(runner.start(), timeout=10)
        seen = [events.get_nowait() for _ in range(events.pending())]
    assert not runner.running and gpu.device_fault == f"RuntimeError: {ILLEGAL_ACCESS}"
    assert [len(specs) for _, specs in engine.batches] == [2]
    held = [(e.job_id, e.error) for e in seen if e.kind is EventKind.HELD]
    assert held == [(broken.id, GPU_FAULT_REASON), (beside.id, GPU_FAULT_REASON)]
    assert not any(e.kind.terminal for e in seen)
    rows = {
        job.id: (job.status.value, job.attempts, in_flight, job.error)
        for job, in_flight in await store.active_jobs()
    }
    assert rows == {
        broken.id: ("running", 0, True, GPU_FAULT_REASON),
        beside.id: ("running", 0, True, GPU_FAULT_REASON),
        behind.id: ("queued", 0, False, None),
    }
    await runner.stop()

    starts = 0
    while await store.active_jobs():
        starts += 1
        assert starts <= settings.max_attempts, "the held jobs never settled"
        restarted = GpuWorker()
        try:
            revived = await JobQueue.open(store, settings)
            again = JobRunner(revived, engine, restarted, timeout_s=30)
            stopped, joined = again.start(), asyncio.ensure_future(revived.join())
            await asyncio.wait({stopped, joined}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            joined.cancel()
            await again.stop()
        finally:
            restarted.close(timeout_s=5)

    # The culprit ran in the shared batch, then alone at each start until its attempts ran out.
    culprit_runs = [specs for _, specs in engine.batches if any(s.prompt == "broken" for s in specs)]
    assert [len(specs) for specs in culprit_runs] == [2, 1, 1]
    assert starts == 3
    failed = await store.get_job(broken.id)
    assert failed is not None and (failed.status.value, failed.attempts) == ("failed", 3)
    assert failed.error == f"{GPU_FAULT_REASON} (gave up after 3 tries)"
    assert await statuses(store, beside.id, behind.id) == ["complete", "complete"]
    assert await store.stored_indices([beside.id, behind.id]) == {beside.id: {0}, behind.id: {0}}
    finished = await store.get_job(beside.id)
    assert finished is not None and (finished.attempts, finished.error) == (1, None)
    after = await store.get_job(behind.id)
    assert after is not None and after.attempts == 0


async def test_a_batch_after_another_task_broke_the_gpu_is_handed_back_uncharged(
    store: Store, gpu: GpuWorker
) -> None:
    """A CUDA fault in a task ahead of the batch (an interrogation): the batch never runs, costs its job
    no attempt, and the runner stops."""
    release = threading.Event()

    def interrogation_that_breaks_the_gpu() -> None:
        release.wait(5)
        raise RuntimeError(ILLEGAL_ACCESS)

    breaking = gpu.submit(interrogation_that_breaks_the_gpu)
    queue = await JobQueue.open(store, QueueSettings())
    engine = FakeEngine()
    runner = JobRunner(queue, engine, gpu, timeout_s=30)
    job = await queue.submit(request(A))
    task = runner.start()
    await until(lambda: gpu.pending() == 1)  # the batch waits behind the interrogation
    release.set()
    await asyncio.wait_for(task, timeout=10)
    assert isinstance(breaking.exception(), GpuFault)
    assert engine.batches == []
    handed_back = await store.get_job(job.id)
    assert handed_back is not None and (handed_back.status.value, handed_back.attempts) == ("running", 0)
    await runner.stop()


async def test_the_resident_preset_goes_first_and_a_swap_waits_one_batch(
    store: Store, gpu: GpuWorker
) -> None:
    """A, due first, wants the preset not on the GPU: C's and B's batch on the resident one goes before it,
    then A's runs (one batch of preference, not B's whole backlog), saying "loading model other" until its
    first step."""
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=2))
    engine = OneModelEngine()
    engine.gate.clear()  # B's first batch stays on the GPU while the members queue their jobs
    events = queue.subscribe()
    runner = JobRunner(queue, engine, gpu, timeout_s=30)
    runner.start()
    await queue.submit(request(B, 2, prompt="B"))
    await until(engine.entered.is_set)
    other = dataclasses.replace(PARAMS, preset="other")
    a_job = await queue.submit(job_request(A, "A", other, count=2))
    for _ in range(3):
        await queue.submit(request(B, 2, prompt="B"))
    await queue.submit(request(C, 2, prompt="C"))
    engine.gate.set()
    await queue.join()
    await runner.stop()
    owners = engine.owners_by_batch(lambda prompt: prompt)
    assert owners[:4] == [["B", "B"], ["C", "B"], ["A", "A"], ["C", "B"]]
    assert [p.preset for p, _ in engine.batches][:4] == ["sd-v1-4", "sd-v1-4", "other", "sd-v1-4"]
    seen = [events.get_nowait() for _ in range(events.pending())]
    loading = [(e.job_id, e.model) for e in seen if e.kind is EventKind.LOADING]
    # A's batch loads "other"; the batch after it, C's and B's jobs, loads sd-v1-4 back: two swaps in all.
    assert loading[0] == (a_job.id, "other")
    assert [model for _, model in loading[1:]] == ["sd-v1-4", "sd-v1-4"]
    a_kinds = [e.kind for e in seen if e.job_id == a_job.id]
    assert a_kinds.index(EventKind.LOADING) < a_kinds.index(EventKind.STEP)


async def test_a_job_says_loading_model_until_its_first_step(store: Store) -> None:
    """While its batch waits for its preset, the job's position and its status line (its message and
    /queue) say which model loads; the first step clears it."""
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=2))
    other = dataclasses.replace(PARAMS, preset="other")
    job = await queue.submit(job_request(A, "A", other, count=2))
    batch = await queue.next_batch()
    assert batch is not None
    queue.batch_loading(batch, "other")
    position = queue.position(job.id)
    assert position is not None and position.loading == "other"
    assert status_text(job, position, locale=None) == f"🔄 Job #{job.id}: loading model other…"
    assert status_text(job, position, locale="zh-CN") == f"🔄 任务 #{job.id}：正在加载模型 other…"
    queue.batch_progress(batch, 1, 3)
    position = queue.position(job.id)
    assert position is not None and position.loading is None
    assert "loading" not in status_text(job, position, locale=None)
