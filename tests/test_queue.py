"""The fair scheduler, driven batch by batch without a GPU thread: order, batching, caps, cancel, recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from i2p2i_bot.batches import Batch, BatchFailure, FailureKind
from i2p2i_bot.config import QueueSettings
from i2p2i_bot.events import Subscription
from i2p2i_bot.interrogation import Interrogation
from i2p2i_bot.jobs import EventKind, Job, JobEvent, JobRefused, JobRequest, JobStatus
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.request import GenerationParams, GenerationRequest
from i2p2i_bot.store import Store
from tests.fake_engine import FakeEngine
from tests.requests import job_request

SMALL = GenerationParams("tiny", 2, 7.5, 64, 64, "dpm")
LARGE = dataclasses.replace(SMALL, width=128)
A, B, C = 1, 2, 3
NAMES = {A: "A", B: "B", C: "C"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def make_queue(store: Store, clock: Clock | None = None, **settings: Any) -> JobQueue:
    return await JobQueue.open(store, QueueSettings(**settings), clock=clock or Clock())


def request(owner: int, count: int = 1, params: GenerationParams = SMALL, **extra: Any) -> JobRequest:
    return job_request(owner, f"{NAMES.get(owner, owner)} prompt", params, count=count, **extra)


async def take(queue: JobQueue) -> Batch:
    batch = await asyncio.wait_for(queue.next_batch(), 2)
    assert batch is not None
    return batch


async def finish(queue: JobQueue, engine: FakeEngine, batch: Batch) -> None:
    result = engine.generate_batch(batch.params, batch.specs, lambda s, t: queue.batch_progress(batch, s, t))
    await queue.batch_result(batch, result)


async def run_all(queue: JobQueue, engine: FakeEngine) -> list[Batch]:
    batches = []
    while queue.active_jobs():
        batch = await take(queue)
        await finish(queue, engine, batch)
        batches.append(batch)
    return batches


def owners(batch: Batch, owner_of: dict[int, int]) -> list[str]:
    return [NAMES[owner_of[item.job_id]] for item in batch.items]


def rows(store: Store, query: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(store.path) as db:
        return db.execute(query, params).fetchall()


def drain(subscription: Subscription) -> list[JobEvent]:
    return [subscription.get_nowait() for _ in range(subscription.pending())]


async def test_a_single_image_is_not_stuck_behind_a_backlog(store: Store, tmp_path: Path) -> None:
    """A queues 5 jobs of 8 images, then B 1 image: B's is in the first batch (second if A's had begun)."""
    queue = await make_queue(store)
    engine = FakeEngine()
    a_jobs = [await queue.submit(request(A, 8)) for _ in range(5)]
    b_job = await queue.submit(request(B, 1))
    first = await take(queue)
    assert [i.job_id for i in first.items].count(b_job.id) == 1
    assert [i.job_id for i in first.items][:2] == [a_jobs[0].id, b_job.id]

    # The same, but the runner had already taken A's first batch when B arrived.
    other_store = await Store.open(tmp_path / "other.sqlite3", images_dir=tmp_path / "other")
    try:
        other = await make_queue(other_store)
        a_jobs = [await other.submit(request(A, 8)) for _ in range(5)]
        before = await take(other)
        late = await other.submit(request(B, 1))
        await finish(other, engine, before)
        second = await take(other)
    finally:
        await other_store.close()
    assert late.id not in [i.job_id for i in before.items]
    assert {i.job_id for i in before.items} == {a_jobs[0].id}
    # B has not been served yet and A just was, so B's image leads the next batch.
    assert [i.job_id for i in second.items][:2] == [late.id, a_jobs[1].id]


async def test_three_users_are_served_round_robin(store: Store) -> None:
    """Batches interleave members one image per pass and the next batch starts with whoever is owed."""
    queue = await make_queue(store, max_batch_images=4)
    engine = FakeEngine()
    owner_of = {}
    for owner, count in ((A, 4), (A, 4), (A, 4), (B, 4), (C, 2), (C, 2)):
        job = await queue.submit(request(owner, count))
        owner_of[job.id] = owner
    batches = await run_all(queue, engine)
    assert [owners(b, owner_of) for b in batches] == [
        ["A", "B", "C", "A"],
        ["B", "C", "A", "B"],
        ["C", "A", "B", "C"],
        ["A", "A", "A", "A"],
        ["A", "A", "A", "A"],
    ]
    # Each member's jobs ran in their own order, each image exactly once.
    seen = [(i.job_id, i.index) for b in batches for i in b.items]
    assert sorted(seen) == sorted({(j, i) for j, o in owner_of.items() for i in range(4 if o != C else 2)})
    a_jobs = [j for b in batches for j in b.job_ids if owner_of[j] == A]
    assert a_jobs == sorted(a_jobs)


async def test_compatible_jobs_share_a_batch_and_different_sizes_never_do(store: Store) -> None:
    """Two 2-image jobs with the same parameters go in one batch; a job of another size gets its own."""
    queue = await make_queue(store)
    engine = FakeEngine()
    a = await queue.submit(request(A, 2))
    c = await queue.submit(request(C, 2, LARGE))
    b = await queue.submit(request(B, 2))
    batches = await run_all(queue, engine)
    assert [(batch.params, sorted(batch.job_ids)) for batch in batches] == [
        (SMALL, sorted([a.id, b.id])),
        (LARGE, [c.id]),
    ]
    assert [(p.width, len(specs)) for p, specs in engine.batches] == [(64, 4), (128, 2)]


async def test_two_presets_alternate_without_mixing_a_batch(store: Store) -> None:
    """Members alternating between two presets of the same size get batches of one preset each, and each
    batch names the preset its pipeline must be."""
    queue = await make_queue(store)
    engine = FakeEngine()
    other = dataclasses.replace(SMALL, preset="other")
    jobs = [
        await queue.submit(request(owner, 1, params))
        for owner, params in ((A, SMALL), (B, other), (C, SMALL), (A, other), (B, SMALL))
    ]
    batches = await run_all(queue, engine)
    preset_of = {job.id: job.request.preset for job in jobs}
    assert all(len({preset_of[i.job_id] for i in b.items}) == 1 for b in batches)
    assert all(b.params.preset == preset_of[b.items[0].job_id] for b in batches)
    assert {b.params.preset for b in batches} == {"sd-v1-4", "other"}
    made = sorted((p.preset, len(specs)) for p, specs in engine.batches)
    assert sum(n for _, n in made) == 5 and len(made) >= 2


async def test_a_restart_keeps_a_queued_jobs_preset(store: Store, tmp_path: Path) -> None:
    """A job queued for a preset comes back after a restart for the same preset, and is made with it."""
    queue = await make_queue(store)
    job = await queue.submit(request(A, 2, dataclasses.replace(SMALL, preset="other")))
    await store.close()
    reopened = await Store.open(tmp_path / "db.sqlite3", images_dir=tmp_path / "images")
    try:
        revived = await make_queue(reopened)
        (active,) = revived.active_jobs()
        assert active.id == job.id and active.request.preset == "other"
        engine = FakeEngine()
        await run_all(revived, engine)
        assert [p.preset for p, _ in engine.batches] == ["other"]
        assert rows(reopened, "SELECT preset FROM jobs") == [("other",)]
    finally:
        await reopened.close()


async def test_caps_refuse_with_a_sentence_naming_the_cap(store: Store) -> None:
    """Over a cap, submit raises JobRefused naming it, and nothing is stored."""
    queue = await make_queue(store, max_queued_jobs_per_user=2, max_queued_jobs=3)
    await queue.submit(request(A))
    await queue.submit(request(A))
    with pytest.raises(JobRefused, match="You already have 2 jobs queued, the most allowed"):
        await queue.submit(request(A))
    await queue.submit(request(B))
    with pytest.raises(JobRefused, match=r"The queue is full \(3 jobs\)"):
        await queue.submit(request(C))
    assert rows(store, "SELECT owner_id FROM jobs ORDER BY id") == [(A,), (A,), (B,)]


async def test_the_queue_takes_only_planned_requests(store: Store) -> None:
    """Bounds are the plan's to check, once: a request that skipped it is a programming error."""
    queue = await make_queue(store)
    unplanned = JobRequest(owner_id=A, request=GenerationRequest("no settings filled in", count=2))
    with pytest.raises(ValueError, match="planned"):
        await queue.submit(unplanned)
    assert rows(store, "SELECT COUNT(*) FROM jobs") == [(0,)]


async def test_seeds_count_up_from_the_first_seed(store: Store) -> None:
    """A job's seeds are s, s+1, ... (wrapping at 2**32); the store keeps the first and spells out all."""
    queue = await make_queue(store)
    job = await queue.submit(request(A, 3, seed=2**32 - 2))
    assert job.request.seeds == (2**32 - 2, 2**32 - 1, 0)
    stored = rows(store, "SELECT seed, seeds FROM jobs WHERE id = ?", job.id)
    assert stored == [(2**32 - 2, f"[{2**32 - 2}, {2**32 - 1}, 0]")]
    assert (await store.get_job(job.id)) == job


async def test_cancel_a_queued_job(store: Store) -> None:
    """The owner's cancel of a queued job is stored, announced, and the job never reaches the GPU."""
    queue = await make_queue(store)
    engine = FakeEngine()
    keep = await queue.submit(request(A))
    drop = await queue.submit(request(A))
    subscription = queue.subscribe(job_id=drop.id)
    cancelled = await queue.cancel(drop.id, A)
    assert cancelled.status is JobStatus.CANCELLED
    assert [e.kind for e in drain(subscription)] == [EventKind.CANCELLED]
    batches = await run_all(queue, engine)
    assert [b.job_ids for b in batches] == [(keep.id,)]
    statuses = rows(store, "SELECT id, status FROM jobs ORDER BY id")
    assert statuses == [(keep.id, "complete"), (drop.id, "cancelled")]


async def test_cancel_a_running_job_keeps_made_images_and_drops_the_rest(store: Store) -> None:
    """Cancelling mid-job keeps the images stored so far; images on the GPU at that moment are discarded."""
    queue = await make_queue(store, max_batch_images=4)
    engine = FakeEngine()
    job = await queue.submit(request(A, 8))
    await finish(queue, engine, await take(queue))
    on_gpu = await take(queue)
    await queue.cancel(job.id, A)
    await finish(queue, engine, on_gpu)
    assert rows(store, "SELECT status FROM jobs") == [("cancelled",)]
    assert rows(store, "SELECT image_index FROM images ORDER BY image_index") == [(0,), (1,), (2,), (3,)]
    files = sorted(p.name for p in store.image_path(job.id, 0).parent.iterdir())
    assert files == [f"{i}.png" for i in range(4)]
    assert queue.active_jobs() == []


async def test_only_the_owner_or_an_admin_may_cancel(store: Store) -> None:
    """Another member's cancel is refused and changes nothing; an admin's goes through; final jobs refuse."""
    queue = await make_queue(store)
    job = await queue.submit(request(A))
    with pytest.raises(JobRefused, match=f"Only the member who queued job #{job.id} can cancel it."):
        await queue.cancel(job.id, B)
    assert rows(store, "SELECT status FROM jobs") == [("queued",)]
    await queue.cancel(job.id, B, admin=True)
    with pytest.raises(JobRefused, match="already cancelled"):
        await queue.cancel(job.id, A)
    with pytest.raises(JobRefused, match=r"There is no job #999\."):
        await queue.cancel(999, A)


async def test_position_and_eta(store: Store) -> None:
    """Images ahead follow the round-robin order, and the ETA divides by the measured images per second."""
    clock = Clock()
    queue = await make_queue(store, clock, max_batch_images=4)
    engine = FakeEngine()
    a1 = await queue.submit(request(A, 4))
    a2 = await queue.submit(request(A, 4))
    b1 = await queue.submit(request(B, 4))
    # Coming order: A B A B | A B A B | A A A A.
    pos_b1, pos_a2 = queue.position(b1.id), queue.position(a2.id)
    assert pos_b1 is not None and pos_a2 is not None
    assert (pos_b1.images_ahead, pos_b1.images_left, pos_b1.eta_s) == (1, 4, None)
    assert (pos_a2.images_ahead, pos_a2.images_left) == (8, 4)

    batch = await take(queue)
    clock.now += 2.0  # the batch of 4 takes 2 s: 2 images per second
    await finish(queue, engine, batch)
    assert queue.images_per_s == pytest.approx(2.0)
    pos_a2 = queue.position(a2.id)
    assert pos_a2 is not None
    # A1 and B1 have 2 images each left, all ahead of A2; A2 is done after 8 more images: 4 s.
    assert (pos_a2.images_ahead, pos_a2.eta_s) == (4, pytest.approx(4.0))
    # A1 is next: its last 2 images come after one of B's (A B A), 1.5 s at 2 images per second.
    pos_a1 = queue.position(a1.id)
    assert pos_a1 is not None
    assert (pos_a1.status, pos_a1.images_ahead, pos_a1.images_left) == (JobStatus.RUNNING, 0, 2)
    assert pos_a1.eta_s == pytest.approx(1.5)
    await run_all(queue, engine)
    assert queue.position(a2.id) is None


async def test_every_event_is_committed_before_it_is_announced(store: Store) -> None:
    """At the moment each event is published, another connection already sees the state it announces."""
    queue = await make_queue(store, max_batch_images=2)
    engine = FakeEngine()
    checked: list[EventKind] = []
    publish = queue.events.publish

    def checking_publish(event: JobEvent) -> None:
        status = rows(store, "SELECT status FROM jobs WHERE id = ?", event.job_id)[0][0]
        stored = rows(store, "SELECT COUNT(*) FROM images WHERE job_id = ?", event.job_id)[0][0]
        expected = {
            EventKind.QUEUED: "queued",
            EventKind.STARTED: "running",
            EventKind.STEP: "running",
            EventKind.IMAGE: "running" if event.images_done < event.count else "complete",
            EventKind.FINISHED: "complete",
        }[event.kind]
        assert status == expected, event
        if event.kind in (EventKind.IMAGE, EventKind.FINISHED):
            assert isinstance(stored, int) and stored >= event.images_done
            assert store.image_path(event.job_id, event.image_index or 0).exists()
        checked.append(event.kind)
        publish(event)

    queue.events.publish = checking_publish  # type: ignore[method-assign]
    await queue.submit(request(A, 3))
    await run_all(queue, engine)
    steps = [EventKind.STEP] * SMALL.steps
    assert checked == [
        EventKind.QUEUED,
        EventKind.STARTED,
        *steps,
        EventKind.IMAGE,
        EventKind.IMAGE,
        *steps,
        EventKind.IMAGE,
        EventKind.FINISHED,
    ]


async def test_a_slow_subscriber_loses_only_step_events(store: Store) -> None:
    """A subscriber that never reads keeps every non-step event; only old step-progress events are dropped."""
    queue = await make_queue(store)
    engine = FakeEngine()
    slow = queue.subscribe(owner_id=A, maxsize=8)
    job = await queue.submit(request(A, 4, dataclasses.replace(SMALL, steps=30)))
    await run_all(queue, engine)
    kinds = [e.kind for e in drain(slow)]
    assert [k for k in kinds if k is not EventKind.STEP] == [
        EventKind.QUEUED,
        EventKind.STARTED,
        *[EventKind.IMAGE] * 4,
        EventKind.FINISHED,
    ]
    assert slow.dropped == 30 - kinds.count(EventKind.STEP) > 0
    assert queue.position(job.id) is None


async def test_a_job_subscription_ends_after_its_final_event(store: Store) -> None:
    """Iterating a one-job subscription yields its events in order and stops after the final one."""
    queue = await make_queue(store)
    engine = FakeEngine()
    job = await queue.submit(request(A, 2))
    subscription = queue.subscribe(job_id=job.id)
    await run_all(queue, engine)
    events = [event async for event in subscription]
    assert [e.kind for e in events if e.kind is not EventKind.STEP] == [
        EventKind.STARTED,
        EventKind.IMAGE,
        EventKind.IMAGE,
        EventKind.FINISHED,
    ]
    assert [(e.image_index, e.images_done) for e in events if e.kind is EventKind.IMAGE] == [(0, 1), (1, 2)]
    assert [e async for e in queue.subscribe(job_id=job.id)] == []


async def test_a_shared_failure_retries_each_job_alone_and_blames_the_culprit(store: Store) -> None:
    """A failed shared batch charges nobody; alone, the bad job uses its attempts, the good one completes."""
    queue = await make_queue(store, max_attempts=2)

    def fail(params: GenerationParams, specs: object) -> Exception | None:
        return RuntimeError("boom") if any(s.prompt == "bad" for s in specs) else None  # type: ignore[attr-defined]

    engine = FakeEngine(fail=fail)
    bad = await queue.submit(job_request(A, "bad", SMALL))
    good = await queue.submit(job_request(B, "good", SMALL))
    while queue.active_jobs():
        batch = await take(queue)
        try:
            await finish(queue, engine, batch)
        except RuntimeError as exc:
            await queue.batch_result(batch, BatchFailure(f"internal error ({exc})"))
    assert [tuple(sorted(s.prompt for s in specs)) for _, specs in engine.batches] == [
        ("bad", "good"),
        ("bad",),
        ("bad",),
        ("good",),
    ]
    assert rows(store, "SELECT id, status, attempts, error FROM jobs ORDER BY id") == [
        (bad.id, "failed", 2, "internal error (boom) (gave up after 2 tries)"),
        (good.id, "complete", 0, None),
    ]


async def test_a_permanent_failure_fails_the_jobs_at_once(store: Store) -> None:
    """A permanent failure (a timeout, a user-fixable error) fails every job in the batch without retries."""
    queue = await make_queue(store)
    a = await queue.submit(request(A))
    b = await queue.submit(request(B))
    subscription = queue.subscribe()
    batch = await take(queue)
    await queue.batch_result(batch, BatchFailure("generation took longer than 5 s", FailureKind.PERMANENT))
    assert rows(store, "SELECT id, status, attempts, error FROM jobs ORDER BY id") == [
        (a.id, "failed", 0, "generation took longer than 5 s"),
        (b.id, "failed", 0, "generation took longer than 5 s"),
    ]
    failed = [e for e in drain(subscription) if e.kind is EventKind.FAILED]
    reason = "generation took longer than 5 s"
    assert [(e.job_id, e.error) for e in failed] == [(a.id, reason), (b.id, reason)]
    assert queue.active_jobs() == []


async def test_an_interrupted_batch_goes_back_without_charge(store: Store) -> None:
    """A batch handed back as interrupted returns to the front of the queue and costs no attempt."""
    queue = await make_queue(store, max_batch_images=2)
    engine = FakeEngine()
    job = await queue.submit(request(A, 2))
    other = await queue.submit(request(B, 2))
    batch = await take(queue)
    await queue.batch_result(batch, BatchFailure("stopped", FailureKind.INTERRUPTED))
    again = await take(queue)
    assert [(i.job_id, i.index) for i in again.items] == [(i.job_id, i.index) for i in batch.items]
    await finish(queue, engine, again)
    await run_all(queue, engine)
    assert rows(store, "SELECT status, attempts FROM jobs ORDER BY id") == [("complete", 0), ("complete", 0)]
    assert {job.id, other.id} == {j.id for j in await store.recent_jobs(A) + await store.recent_jobs(B)}


async def test_recovery_resumes_queued_jobs_in_order_and_only_missing_images(store: Store) -> None:
    """After a crash, queued jobs come back in order and a running job re-runs exactly its unstored images."""
    queue = await make_queue(store, max_batch_images=3)
    engine = FakeEngine()
    running = await queue.submit(request(A, 5))
    queued = [await queue.submit(request(B, 1)), await queue.submit(request(C, 2))]
    await finish(queue, engine, await take(queue))  # stores A0, B0, C0
    crashed = await take(queue)  # A1, C1, A2 on the GPU when the process dies
    on_gpu = [(i.job_id, i.index) for i in crashed.items]
    assert on_gpu == [(running.id, 1), (queued[1].id, 1), (running.id, 2)]

    revived = await make_queue(store, max_batch_images=8)
    assert [j.id for j in revived.active_jobs()] == [running.id, queued[1].id]
    assert [j.attempts for j in revived.active_jobs()] == [1, 1]
    engine.batches.clear()
    await run_all(revived, engine)
    redone = [(spec.prompt, spec.seed) for _, specs in engine.batches for spec in specs]
    assert sorted(redone) == sorted(
        [("A prompt", running.request.seeds[i]) for i in (1, 2, 3, 4)]
        + [("C prompt", queued[1].request.seeds[1])]
    )
    query = "SELECT job_id, COUNT(*), COUNT(DISTINCT image_index) FROM images GROUP BY job_id"
    assert rows(store, query) == [
        (running.id, 5, 5),
        (queued[0].id, 1, 1),
        (queued[1].id, 2, 2),
    ]
    assert rows(store, "SELECT DISTINCT status FROM jobs") == [("complete",)]


async def test_a_batch_found_out_after_a_restart_is_taken_back_and_not_handed_out_again(store: Store) -> None:
    """A restarted queue adopts the images of a batch still out that still wait (not those stored before
    the crash, not those of a job gone since); they leave the ring, and the batch's result finishes them."""
    queue = await make_queue(store, max_batch_images=3)
    engine = FakeEngine()
    job = await queue.submit(request(A, 4))
    finished = await queue.submit(request(B, 1))
    await finish(queue, engine, await take(queue))  # stores A0, A1 and B0
    out = await take(queue)  # A2, A3 on a worker when the bot dies
    assert [(i.job_id, i.index) for i in out.items] == [(job.id, 2), (job.id, 3)]
    gone = await queue.submit(request(C, 1))

    revived = await make_queue(store, max_batch_images=3)
    await revived.cancel(gone.id, C)
    adopted = await revived.adopt([(job.id, 1), (job.id, 2), (gone.id, 0), (job.id, 3), (finished.id, 0)])
    assert adopted is not None
    assert [(i.job_id, i.index) for i in adopted.items] == [(job.id, 2), (job.id, 3)]
    assert [i.spec for i in adopted.items] == [i.spec for i in out.items]
    assert await revived.adopt([(job.id, 2)]) is None  # out already
    engine.batches.clear()
    await finish(revived, engine, adopted)
    await asyncio.wait_for(revived.join(), 2)
    assert len(engine.batches) == 1
    assert rows(store, "SELECT image_index FROM images WHERE job_id = ? ORDER BY 1", job.id) == [
        (0,),
        (1,),
        (2,),
        (3,),
    ]
    assert rows(store, "SELECT status, in_flight FROM jobs WHERE id = ?", job.id) == [("complete", 0)]


async def test_recovery_gives_up_after_max_attempts(store: Store) -> None:
    """A job caught on the GPU by its last allowed crash is failed with the reason, not run again."""
    queue = await make_queue(store, max_attempts=1)
    job = await queue.submit(request(A, 2))
    await take(queue)
    revived = await make_queue(store, max_attempts=1)
    assert revived.active_jobs() == []
    assert rows(store, "SELECT status, attempts, error FROM jobs WHERE id = ?", job.id) == [
        ("failed", 1, "generation was interrupted or failed 1 time; giving up")
    ]


async def test_a_request_key_makes_resubmission_harmless(store: Store) -> None:
    """Submitting the same request key twice returns the first job and stores one row."""
    queue = await make_queue(store)
    first = await queue.submit(request(A, request_key="interaction-1"))
    second = await queue.submit(request(A, request_key="interaction-1"))
    assert second.id == first.id
    assert rows(store, "SELECT COUNT(*) FROM jobs") == [(1,)]


async def test_jobs_from_an_interrogation_carry_the_source_embedding(store: Store) -> None:
    """A job made from an interrogation gives the engine that image's embedding; a missing one is refused."""
    stored = await store.add_interrogation(
        Interrogation("best", "p", 0.3, "c", None, (), (0.5, -0.5)), source_sha256="s", user_id=A
    )
    queue = await make_queue(store)
    await queue.submit(request(A, interrogation_id=stored.id))
    batch = await take(queue)
    assert batch.specs[0].source_embedding == (0.5, -0.5)
    with pytest.raises(JobRefused, match="no longer exists"):
        await queue.submit(request(A, interrogation_id=stored.id + 100))


async def test_forget_cancels_active_jobs_and_deletes_history(store: Store) -> None:
    """/forget takes the member's jobs off the queue (announced as cancelled) and deletes their rows."""
    queue = await make_queue(store)
    engine = FakeEngine()
    mine = await queue.submit(request(A, 2))
    theirs = await queue.submit(request(B, 1))
    on_gpu = await take(queue)
    subscription = queue.subscribe(owner_id=A)
    result = await queue.forget(A)
    await finish(queue, engine, on_gpu)
    assert result.jobs == 1
    assert [e.kind for e in drain(subscription)] == [EventKind.CANCELLED]
    assert rows(store, "SELECT id, status FROM jobs") == [(theirs.id, "complete")]
    assert not store.image_path(mine.id, 0).exists()


async def test_close_stops_batches_and_new_jobs(store: Store) -> None:
    """After close, a waiting next_batch returns None and submit is refused; stored jobs stay queued."""
    queue = await make_queue(store)
    waiting = asyncio.create_task(queue.next_batch())
    await asyncio.sleep(0)
    queue.close()
    assert await asyncio.wait_for(waiting, 1) is None
    with pytest.raises(JobRefused, match="shutting down"):
        await queue.submit(request(A))


async def test_submissions_arriving_together_share_one_commit_within_the_caps(store: Store) -> None:
    """Concurrent submits are stored in one group commit, in arrival order, and the member cap holds."""
    queue = await make_queue(store, max_queued_jobs_per_user=3)
    groups: list[int] = []
    insert_jobs = store.insert_jobs

    async def counting(entries: Sequence[JobRequest], now: float | None = None) -> list[Job]:
        groups.append(len(entries))
        return await insert_jobs(entries, now)

    store.insert_jobs = counting  # type: ignore[method-assign]
    owners = [A, A, B, A, A, B, A]
    outcomes = await asyncio.gather(*(queue.submit(request(o)) for o in owners), return_exceptions=True)
    refused = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, JobRefused)]
    assert refused == [4, 6]
    jobs = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
    assert [job.owner_id for job in jobs] == [A, A, B, A, B]
    assert [job.id for job in jobs] == sorted(job.id for job in jobs)
    assert groups == [5]
    assert rows(store, "SELECT owner_id FROM jobs ORDER BY id") == [(A,), (A,), (B,), (A,), (B,)]


async def test_the_same_request_key_twice_at_once_makes_one_job(store: Store) -> None:
    """Two concurrent submits with one request key (a double click) return the same single job."""
    queue = await make_queue(store)
    first, second = await asyncio.gather(
        queue.submit(request(A, request_key="click-7")), queue.submit(request(A, request_key="click-7"))
    )
    assert first.id == second.id
    assert rows(store, "SELECT COUNT(*) FROM jobs") == [(1,)]


async def test_results_arriving_together_are_all_recorded(store: Store) -> None:
    """A success and a failure handed back at once are both recorded: one job completes, the other retries."""
    queue = await make_queue(store, max_batch_images=1)
    engine = FakeEngine()
    ok = await queue.submit(request(A))
    flaky = await queue.submit(request(B))
    first, second = await take(queue), await take(queue)
    result = engine.generate_batch(first.params, first.specs)
    await asyncio.gather(
        queue.batch_result(first, result), queue.batch_result(second, BatchFailure("CUDA error"))
    )
    assert rows(store, "SELECT id, status, attempts, in_flight FROM jobs ORDER BY id") == [
        (ok.id, "complete", 0, 0),
        (flaky.id, "running", 1, 0),
    ]
    retry = await take(queue)
    assert retry.job_ids == (flaky.id,)


async def test_pause_holds_batches_and_resume_releases_them(store: Store) -> None:
    """While paused, jobs are taken but no batch is handed out; resume hands it out."""
    queue = await make_queue(store)
    queue.pause()
    job = await queue.submit(request(1))
    waiting = asyncio.create_task(queue.next_batch())
    await asyncio.sleep(0.05)
    assert queue.paused and not waiting.done()
    queue.resume()
    batch = await asyncio.wait_for(waiting, 5)
    assert batch is not None and batch.job_ids == (job.id,)


async def test_a_newcomer_goes_before_the_member_just_served(store: Store) -> None:
    """With batches of one, B arriving while A's image runs gets the next turn, not A's second image."""
    queue = await make_queue(store, max_batch_images=1)
    engine = FakeEngine()
    first_a = await queue.submit(request(A, 2))
    running = await take(queue)
    b_job = await queue.submit(request(B, 1))
    position = queue.position(b_job.id)
    assert position is not None and position.images_ahead == 1  # only the image on the GPU
    await finish(queue, engine, running)
    nxt = await take(queue)
    assert [i.job_id for i in nxt.items] == [b_job.id]
    await finish(queue, engine, nxt)
    last = await take(queue)
    assert [i.job_id for i in last.items] == [first_a.id]


async def test_a_database_that_refuses_writes_for_a_while_loses_no_result(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While another process holds the write lock, results wait and are recorded once it lets go."""
    store = await Store.open(tmp_path / "db.sqlite3", images_dir=tmp_path / "images", busy_timeout_ms=20)
    try:
        queue = await make_queue(store)
        engine = FakeEngine()
        job = await queue.submit(request(A, count=2))
        batch = await take(queue)
        blocker = sqlite3.connect(store.path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        recording = asyncio.create_task(
            queue.batch_result(batch, engine.generate_batch(batch.params, batch.specs))
        )
        await asyncio.sleep(1.2)  # a few refused tries
        assert not recording.done()
        assert any("the database refused" in r.getMessage() for r in caplog.records)
        blocker.execute("ROLLBACK")
        blocker.close()
        await asyncio.wait_for(recording, 60)
        assert rows(store, "SELECT status, attempts, in_flight FROM jobs") == [("complete", 0, 0)]
        assert rows(store, "SELECT job_id, image_index FROM images ORDER BY image_index") == [
            (job.id, 0),
            (job.id, 1),
        ]
        assert queue.active_jobs() == []
    finally:
        await store.close()
