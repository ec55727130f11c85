"""The SQLite store: migrations, jobs and images, the interrogation cache, history queries and /forget."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from PIL import Image

from i2p2i_bot import store as store_module
from i2p2i_bot.flagged import FlaggedPolicy
from i2p2i_bot.gpu import GpuWorker
from i2p2i_bot.guides import Guide
from i2p2i_bot.interrogation import Candidate, Interrogation
from i2p2i_bot.interrogation_cache import InterrogationCache
from i2p2i_bot.jobs import Delivery, JobStatus
from i2p2i_bot.loras import Lora
from i2p2i_bot.request import GenerationParams
from i2p2i_bot.store import (
    CardChoices,
    JobChange,
    Migration,
    PendingDescribe,
    Store,
    StoredImage,
    StoreError,
    packaged_migrations,
)
from tests.requests import job_request, planned

PARAMS = GenerationParams("tiny", 2, 7.5, 64, 64, "dpm")


async def open_store(tmp_path: Path, migrations: list[Migration] | None = None) -> Store:
    return await Store.open(tmp_path / "db.sqlite3", images_dir=tmp_path / "images", migrations=migrations)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(tmp_path)
    yield store
    await store.close()


def make_interrogation(prompt: str = "a cat, oil painting", mode: str = "best") -> Interrogation:
    return Interrogation(
        mode=mode,
        prompt=prompt,
        score=0.31,
        caption="a cat",
        negative=None,
        candidates=(Candidate(mode, prompt, 0.31), Candidate(mode, "a dog", 0.12)),
        image_embedding=(0.6, 0.8, 0.0),
        models={"clip": "ViT-L-14/openai"},
        timings_s={"clip": 0.5},
    )


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


async def test_migrations_on_an_empty_file(tmp_path: Path) -> None:
    """A new file gets every packaged migration, WAL and foreign keys, and its version in user_version."""
    store = await open_store(tmp_path)
    try:
        assert await store.schema_version() == len(packaged_migrations()) == 17
        rows = await store._fetchall("PRAGMA journal_mode")
        assert rows[0][0] == "wal"
        rows = await store._fetchall("PRAGMA foreign_keys")
        assert rows[0][0] == 1
    finally:
        await store.close()
    assert {
        "jobs",
        "images",
        "interrogations",
        "interrogation_results",
        "cards",
        "pending_describes",
    } <= tables(tmp_path / "db.sqlite3")


async def test_migrations_on_an_existing_file_apply_only_the_new_ones(tmp_path: Path) -> None:
    """Reopening applies only migrations past user_version and keeps the data already there."""
    first = list(packaged_migrations())
    store = await open_store(tmp_path, first)
    job = await store.insert_job(job_request(7, "kept", PARAMS, seed=1))
    await store.close()

    note = "ALTER TABLE jobs ADD COLUMN note TEXT; CREATE TABLE extra (x);"
    n = len(first)
    second = [*first, Migration(n + 1, f"{n + 1:04d}_note.sql", note)]
    store = await open_store(tmp_path, second)
    try:
        assert await store.schema_version() == n + 1
        stored = await store.get_job(job.id)
        assert stored is not None and stored.request.prompt == "kept"
        columns = {row["name"] for row in await store._fetchall("PRAGMA table_info(jobs)")}
        assert "note" in columns
    finally:
        await store.close()
    # A third open must not run 0002 again (CREATE TABLE extra would fail if it did).
    store = await open_store(tmp_path, second)
    assert await store.schema_version() == n + 1
    await store.close()


async def test_a_failing_migration_leaves_the_file_untouched(tmp_path: Path) -> None:
    """Pending migrations run in one transaction: if the last fails, the ones before it roll back too."""
    first = list(packaged_migrations())
    await (await open_store(tmp_path, first)).close()
    n = len(first)
    broken = [
        *first,
        Migration(n + 1, "ok.sql", "CREATE TABLE added (x);"),
        Migration(n + 2, "bad.sql", "ALTER TABLE no_such_table ADD COLUMN y;"),
    ]
    with pytest.raises(sqlite3.OperationalError):
        await open_store(tmp_path, broken)
    store = await open_store(tmp_path, first)
    try:
        assert await store.schema_version() == n
    finally:
        await store.close()
    assert "added" not in tables(tmp_path / "db.sqlite3")


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file written by a newer version of the code is not opened by an older one."""
    first = list(packaged_migrations())
    newer = len(first) + 1
    await (await open_store(tmp_path, [*first, Migration(newer, "x.sql", "CREATE TABLE x (y);")])).close()
    with pytest.raises(StoreError, match=f"schema version {newer}"):
        await open_store(tmp_path, first)


async def test_a_version_1_file_is_upgraded_and_keeps_its_jobs(tmp_path: Path) -> None:
    """A database from the first schema gains the later columns; its jobs read back unchanged, their
    requests whole (the first seed taken from the seeds list)."""
    first = list(packaged_migrations())[:1]
    store = await open_store(tmp_path, first)
    query = """
        INSERT INTO jobs (owner_id, origin, prompt, negative_prompt, count, seeds, model, steps, guidance,
                          width, height, scheduler, status, created_at)
        VALUES (7, 'discord', 'from version 1', 'blurry', 2, '[4294967295, 0]', 'tiny', 2, 7.5, 64, 64, 'dpm',
                'queued', 5.0)
    """
    await store._execute(query)
    await store.close()
    store = await open_store(tmp_path)
    try:
        assert await store.schema_version() == len(packaged_migrations())
        stored = await store.get_job(1)
        assert stored is not None and stored.delivery_error is None
        expected = planned("from version 1", PARAMS, count=2, seed=2**32 - 1, negative_prompt="blurry")
        assert stored.request == expected and stored.request.seeds == (2**32 - 1, 0)
        assert await store.integrity_problems() == []
    finally:
        await store.close()


async def test_an_undeliverable_reason_is_kept_until_delivery(store: Store) -> None:
    job = await store.insert_job(job_request(7, "nowhere to post", PARAMS, seed=1))
    await store.mark_undeliverable(job.id, "your DMs are closed to me")
    stored = await store.get_job(job.id)
    assert stored is not None and stored.delivery_error == "your DMs are closed to me"
    await store.mark_delivered(job.id, now=50.0)
    stored = await store.get_job(job.id)
    assert stored is not None and stored.delivery_error is None and stored.delivered_at == 50.0


async def test_job_round_trip_and_delivery(store: Store) -> None:
    """A job comes back with its seeds, parameters and delivery data; delivery marks drop the token."""
    request = job_request(
        5,
        "a lighthouse",
        PARAMS,
        count=3,
        seed=10,
        negative_prompt="blurry",
        guild_id=1,
        channel_id=2,
        flagged_policy=FlaggedPolicy.SPOILER,
        delivery=Delivery(channel_id=2, interaction_token="tok", token_expires_at=900.0),
    )
    job = await store.insert_job(request, now=100.0)
    again = await store.get_job(job.id)
    assert again == job and again.flagged_policy is FlaggedPolicy.SPOILER
    rows = await store._fetchall("SELECT flagged_policy FROM jobs WHERE id = ?", (job.id,))
    assert rows[0][0] == "spoiler"
    assert job.request == request.request and job.owner_id == 5 and job.guild_id == 1
    assert job.request.seeds == (10, 11, 12) and job.request.params == PARAMS
    assert job.status is JobStatus.QUEUED
    assert job.delivery.interaction_token == "tok" and job.created_at == 100.0

    await store.set_delivery(job.id, Delivery(channel_id=2, message_id=99, interaction_token="tok"))
    await store.mark_running([job.id], 101.0)
    await store.save_changes(
        [JobChange(job_id=job.id, status=JobStatus.COMPLETE, attempts=0, finished_at=102.0)]
    )
    assert [j.id for j in await store.undelivered_jobs()] == [job.id]
    await store.mark_delivered(job.id, now=103.0)
    done = await store.get_job(job.id)
    assert done is not None
    assert done.delivery.message_id == 99 and done.delivery.interaction_token is None
    assert done.delivered_at == 103.0 and await store.undelivered_jobs() == []


GUIDED = GenerationParams("tiny", 2, 7.5, 64, 64, "dpm", (Guide("layout", 0.45), Guide("edges", 1.25)))
SOURCE = hashlib.sha256(b"a source").hexdigest()


async def test_a_queued_guided_job_keeps_its_guides_and_source_across_a_restart(tmp_path: Path) -> None:
    """Guides and their source are stored with the job: reopened, the queued job has the same request, its
    batch key has the guides, its images keep the source, and Reroll keeps both."""
    store = await open_store(tmp_path)
    try:
        job = await store.insert_job(job_request(3, "a fox", GUIDED, count=2, seed=8, guide_source=SOURCE))
        plain = await store.insert_job(job_request(3, "a fox", PARAMS, seed=8))
        (row,) = await store._fetchall("SELECT keep, guide_source FROM jobs WHERE id = ?", (job.id,))
        assert json.loads(row["keep"]) == [
            {"name": "layout", "weight": 0.45},
            {"name": "edges", "weight": 1.25},
        ]
        assert row["guide_source"] == SOURCE
    finally:
        await store.close()
    store = await open_store(tmp_path)
    try:
        active = [j for j, _ in await store.active_jobs()]
        assert [j.id for j in active] == [job.id, plain.id]
        again = active[0]
        assert again == job and again.request.params == GUIDED
        assert [s.guide_source for s in again.request.specs()] == [SOURCE, SOURCE]
        assert active[1].request.keep == () and active[1].request.specs()[0].guide_source is None
        reroll = again.reroll(3)
        assert reroll.request.keep == GUIDED.keep and reroll.request.guide_source == SOURCE
        assert reroll.request.seed is None
    finally:
        await store.close()


async def test_an_image_cannot_be_stored_twice(store: Store) -> None:
    """(job, index) is unique in the images table, so a retried batch can never add an image again."""
    job = await store.insert_job(job_request(1, "x", PARAMS, count=2, seed=1))
    image = StoredImage(
        job_id=job.id, index=0, seed=1, nsfw=False, fidelity=None, sha256="ab" * 32, created_at=1.0
    )
    await store.save_changes([], [image])
    with pytest.raises(sqlite3.IntegrityError):
        await store.save_changes([], [image])
    assert await store.stored_indices([job.id]) == {job.id: {0}}


async def test_final_jobs_ignore_late_changes(store: Store) -> None:
    """A change for a job that is already final (a cancelled one, say) does not bring it back."""
    job = await store.insert_job(job_request(1, "x", PARAMS, seed=1))
    await store.save_changes(
        [JobChange(job_id=job.id, status=JobStatus.CANCELLED, attempts=0, finished_at=5.0)]
    )
    await store.save_changes([JobChange(job_id=job.id, status=JobStatus.RUNNING, attempts=0, in_flight=True)])
    stored = await store.get_job(job.id)
    assert stored is not None and stored.status is JobStatus.CANCELLED


async def test_image_files_are_written_whole_with_their_hash(store: Store) -> None:
    """PNG files land at images/<job>/<index>.png with the sha256 the store returns and no temp files left."""
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    (digest,) = await asyncio.to_thread(store.write_image_files, [(3, 1, image)])
    path = store.image_path(3, 1)
    assert path == store.images_dir / "3" / "1.png"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert Image.open(path).getpixel((0, 0)) == (10, 20, 30)
    assert [p.name for p in path.parent.iterdir()] == ["1.png"]


def test_a_batchs_pngs_are_encoded_side_by_side_into_the_same_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """png_bytes_of gives each image's own PNG, in order, and encodes two at once: each encoding waits at a
    barrier for another, which one encoder thread would never reach."""
    images = [Image.new("RGB", (8, 8), (k, 2 * k, 3 * k)) for k in range(4)]
    expected = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        expected.append(buffer.getvalue())
    both = threading.Barrier(2, timeout=10)
    threads: set[str] = set()
    encode = store_module._png_bytes

    def waiting_for_another(image: Image.Image) -> bytes:
        threads.add(threading.current_thread().name)
        both.wait()
        return encode(image)

    monkeypatch.setattr(store_module, "_PNG_THREADS", 2)
    monkeypatch.setattr(store_module, "_png_pool", None)
    monkeypatch.setattr(store_module, "_png_bytes", waiting_for_another)
    try:
        assert store_module.png_bytes_of(images) == expected
    finally:
        pool = store_module._png_pool
        if pool is not None:
            pool.shutdown()
    assert len(threads) == 2 and all(name.startswith("i2p2i-png") for name in threads)


async def test_interrogation_cache_hit(store: Store) -> None:
    """The same bytes, mode and models are computed once; later requests get the stored result, as cached."""
    gpu = GpuWorker()
    calls: list[str] = []

    def run(mode: str = "best") -> Interrogation:
        calls.append(mode)
        return make_interrogation(mode=mode)

    try:
        cache = InterrogationCache(store, gpu)
        sha = hashlib.sha256(b"image bytes").hexdigest()
        models = {"clip": "ViT-L-14/openai", "caption": "blip"}
        first = await cache.interrogate(run, source_sha256=sha, mode="best", models=models, user_id=1)
        second = await cache.interrogate(run, source_sha256=sha, mode="best", models=dict(models), user_id=2)
        assert calls == ["best"]
        assert not first.cached and second.cached
        assert second.result_id == first.result_id and second.id != first.id
        assert second.interrogation.prompt == "a cat, oil painting"
        assert second.interrogation.candidates == first.interrogation.candidates
        assert second.interrogation.image_embedding == pytest.approx((0.6, 0.8, 0.0), abs=1e-7)

        await cache.interrogate(lambda: run("fast"), source_sha256=sha, mode="fast", models=models, user_id=1)
        await cache.interrogate(run, source_sha256=sha, mode="best", models={"clip": "other"}, user_id=1)
        assert calls == ["best", "fast", "best"]
        assert [i.cached for i in await store.recent_interrogations(2)] == [True]
        assert await store.interrogation_embedding(second.id) == second.interrogation.image_embedding
    finally:
        gpu.close()


async def test_identical_interrogations_in_flight_share_one_run(store: Store) -> None:
    """Two members asking about the same image at once cause one GPU call; both get a history row."""
    gpu = GpuWorker()
    calls = 0
    release = threading.Event()

    def run() -> Interrogation:
        nonlocal calls
        calls += 1
        release.wait(5)
        return make_interrogation()

    try:
        cache = InterrogationCache(store, gpu)
        ask = [
            cache.interrogate(run, source_sha256="s", mode="best", models={"clip": "c"}, user_id=user)
            for user in (1, 2)
        ]
        tasks = [asyncio.create_task(a) for a in ask]
        await asyncio.sleep(0.05)
        release.set()
        first, second = await asyncio.gather(*tasks)
        assert calls == 1
        assert (first.cached, second.cached) == (False, True)
        assert first.result_id == second.result_id
    finally:
        gpu.close()


async def test_a_result_a_card_looks_up_is_stored_once_without_a_request(store: Store) -> None:
    """A card's lookup in another mode runs once, even pressed twice at once, is cached for later cards and
    members, and is no member's history."""
    gpu = GpuWorker()
    calls = 0
    release = threading.Event()

    def run() -> Interrogation:
        nonlocal calls
        calls += 1
        release.wait(5)
        return make_interrogation("blurry, watermark", mode="negative")

    try:
        cache = InterrogationCache(store, gpu)
        models = {"clip": "c"}
        looks = [
            asyncio.create_task(cache.result(run, source_sha256="s", mode="negative", models=models))
            for _ in range(2)
        ]
        await asyncio.sleep(0.05)
        release.set()
        first, second = await asyncio.gather(*looks)
        assert calls == 1 and first.prompt == second.prompt == "blurry, watermark"
        again = await cache.result(run, source_sha256="s", mode="negative", models=dict(models))
        assert calls == 1 and again.prompt == "blurry, watermark"
        assert await store.recent_interrogations(1) == []
        assert (await store.global_stats()).interrogations == 0
        described = await cache.interrogate(run, source_sha256="s", mode="negative", models=models, user_id=1)
        assert calls == 1 and described.cached

        await store.forget_user(2)
        assert await store.find_interrogation("s", "negative", models) is not None
        await store.forget_user(1)
        assert await store.find_interrogation("s", "negative", models) is None
    finally:
        gpu.close()


async def test_card_choices_are_kept_per_card_across_a_restart(tmp_path: Path) -> None:
    """A card's applied negative, More prompts and guides survive reopening the file; other cards keep the
    defaults; the choices go with the card on /forget."""
    store = await open_store(tmp_path)
    try:
        card = await store.add_interrogation(make_interrogation(), source_sha256="s", user_id=1)
        other = await store.add_cache_hit(card.result_id, card.interrogation, source_sha256="s", user_id=1)
        assert await store.card_choices(card.id) == CardChoices()
        await store.set_card_negative(card.id, "blurry, watermark")
        await store.show_all_card_prompts(card.id)
        await store.set_card_keep(card.id, (Guide("layout", 0.45), Guide("edges", 1.2)))
    finally:
        await store.close()
    store = await open_store(tmp_path)
    keep = (Guide("layout", 0.45), Guide("edges", 1.2))
    try:
        assert await store.card_choices(card.id) == CardChoices(
            negative_prompt="blurry, watermark", all_prompts=True, keep=keep
        )
        assert await store.card_choices(other.id) == CardChoices()
        await store.set_card_negative(card.id, None)
        assert await store.card_choices(card.id) == CardChoices(all_prompts=True, keep=keep)
        await store.set_card_keep(card.id, ())
        assert await store.card_choices(card.id) == CardChoices(all_prompts=True)
        await store.forget_user(1)
        assert await store._fetchall("SELECT * FROM cards") == []
    finally:
        await store.close()


async def test_history_queries(store: Store) -> None:
    """Recent jobs, prompt search (with LIKE wildcards taken literally), a job's record and the stats."""
    a1 = await store.insert_job(job_request(1, "red fox in snow", PARAMS, seed=1), now=10.0)
    a2 = await store.insert_job(job_request(1, "100% blue_sky", PARAMS, count=2, seed=2), now=20.0)
    b1 = await store.insert_job(job_request(2, "red car", PARAMS, seed=4), now=30.0)
    await store.mark_running([a2.id], 21.0)
    await store.save_changes(
        [JobChange(job_id=a2.id, status=JobStatus.COMPLETE, attempts=0, finished_at=25.0)],
        [
            StoredImage(
                job_id=a2.id,
                index=i,
                seed=2 + i,
                nsfw=i == 1,
                fidelity=0.4,
                sha256=f"{i:064x}",
                created_at=24.0,
            )
            for i in range(2)
        ],
    )
    fox = make_interrogation("red fox, sketch")
    await store.add_interrogation(fox, source_sha256="f", user_id=1, now=5.0)

    assert [j.id for j in await store.recent_jobs(1)] == [a2.id, a1.id]
    assert [j.id for j in await store.recent_jobs(1, limit=1)] == [a2.id]
    assert [j.id for j in await store.search_jobs("RED")] == [b1.id, a1.id]
    assert [j.id for j in await store.search_jobs("red", owner_id=1)] == [a1.id]
    assert [j.id for j in await store.search_jobs("0% b")] == [a2.id]
    assert [j.id for j in await store.search_jobs("_s")] == [a2.id]
    assert await store.search_jobs("d_c") == []
    assert [i.interrogation.prompt for i in await store.search_interrogations("fox")] == ["red fox, sketch"]

    record = await store.job_record(a2.id)
    assert record is not None and record.job.status is JobStatus.COMPLETE
    assert [(i.index, i.seed, i.nsfw) for i in record.images] == [(0, 2, False), (1, 3, True)]
    assert await store.job_record(999) is None

    stats = await store.user_stats(1)
    assert stats.jobs == {"queued": 1, "complete": 1}
    assert (stats.images, stats.interrogations, stats.cache_hits) == (2, 1, 0)
    assert (stats.first_at, stats.last_at) == (5.0, 20.0)
    overall = await store.global_stats()
    assert overall.users == 2 and overall.images == 2 and overall.jobs == {"queued": 2, "complete": 1}
    assert overall.mean_job_s == pytest.approx(4.0)


async def test_a_hidden_job_keeps_its_rows_for_admins_and_loses_its_files(store: Store) -> None:
    """hide_job marks a finished job once (when, by whom), removes its image files and keeps its rows;
    history and search leave it out unless asked, and it is never delivered again."""
    job = await store.insert_job(job_request(1, "a red fox", PARAMS, count=2, seed=5))
    queued = await store.insert_job(job_request(1, "a red kite", PARAMS, seed=6))
    digests = await asyncio.to_thread(
        store.write_image_files, [(job.id, i, Image.new("RGB", (2, 2))) for i in range(2)]
    )
    await store.mark_running([job.id], 1.0)
    await store.save_changes(
        [JobChange(job_id=job.id, status=JobStatus.COMPLETE, attempts=0, finished_at=2.0)],
        [
            StoredImage(
                job_id=job.id, index=i, seed=5 + i, nsfw=False, fidelity=None, sha256=d, created_at=2.0
            )
            for i, d in enumerate(digests)
        ],
    )
    assert [j.id for j in await store.undelivered_jobs()] == [job.id]

    hidden = await store.hide_job(job.id, by=1, now=10.0)
    again = await store.hide_job(job.id, by=99, now=20.0)

    assert hidden is not None and (hidden.hidden_at, hidden.hidden_by) == (10.0, 1)
    assert again == hidden
    assert not store.image_path(job.id, 0).parent.exists()
    record = await store.job_record(job.id)
    assert record is not None and [i.sha256 for i in record.images] == digests
    assert [j.id for j in await store.recent_jobs(1)] == [queued.id]
    assert [j.id for j in await store.recent_jobs(1, include_hidden=True)] == [queued.id, job.id]
    assert [j.id for j in await store.search_jobs("red", owner_id=1)] == [queued.id]
    assert [j.id for j in await store.search_jobs("fox", include_hidden=True)] == [job.id]
    assert await store.undelivered_jobs() == []
    # A job still queued is not hidden: Delete belongs to finished results.
    still = await store.hide_job(queued.id, by=1)
    assert still is not None and still.hidden_at is None
    assert await store.hide_job(999, by=1) is None


async def test_forget_user_deletes_only_their_history(store: Store) -> None:
    """/forget removes one member's jobs, image rows and files and interrogations; others keep theirs."""
    mine = await store.insert_job(job_request(1, "mine", PARAMS, seed=1))
    theirs = await store.insert_job(job_request(2, "theirs", PARAMS, seed=2))
    for job in (mine, theirs):
        (digest,) = await asyncio.to_thread(store.write_image_files, [(job.id, 0, Image.new("RGB", (2, 2)))])
        await store.save_changes(
            [],
            [
                StoredImage(
                    job_id=job.id,
                    index=0,
                    seed=job.request.seeds[0],
                    nsfw=False,
                    fidelity=None,
                    sha256=digest,
                    created_at=1.0,
                )
            ],
        )
    shared = await store.add_interrogation(make_interrogation("shared"), source_sha256="s", user_id=1)
    await store.add_cache_hit(shared.result_id, shared.interrogation, source_sha256="s", user_id=2)
    await store.add_interrogation(make_interrogation("private"), source_sha256="p", user_id=1)

    result = await store.forget_user(1)

    assert (result.jobs, result.images, result.interrogations) == (1, 1, 2)
    assert await store.get_job(mine.id) is None and not store.image_path(mine.id, 0).parent.exists()
    assert await store.get_job(theirs.id) is not None and store.image_path(theirs.id, 0).exists()
    assert await store.recent_interrogations(1) == []
    assert [i.interrogation.prompt for i in await store.recent_interrogations(2)] == ["shared"]
    assert await store.find_interrogation("p", "best", {"clip": "ViT-L-14/openai"}) is None
    assert await store.find_interrogation("s", "best", {"clip": "ViT-L-14/openai"}) is not None


async def test_forget_removes_the_sources_and_cached_results_only_they_used(tmp_path: Path) -> None:
    """/forget removes the member's uploads and cached results that nobody else's interrogation or job
    names, after its commit; what another member asked for or made images from stays, file and row."""
    store = await Store.open(
        tmp_path / "db.sqlite3", images_dir=tmp_path / "images", sources_dir=tmp_path / "sources"
    )
    try:
        sources = {}
        for name in ("shared", "theirs", "private", "job-only", "their-job", "their-guide", "unrelated"):
            sha = hashlib.sha256(name.encode()).hexdigest()
            path = store.source_path(sha)
            assert path is not None
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"png")
            sources[name] = sha
        models = {"clip": "ViT-L-14/openai"}
        # Alice (1) computed "shared"; Bob (2) was served it from the cache.
        shared = await store.add_interrogation(
            make_interrogation("shared"), source_sha256=sources["shared"], user_id=1
        )
        await store.add_cache_hit(
            shared.result_id, shared.interrogation, source_sha256=sources["shared"], user_id=2
        )
        # Bob computed "theirs"; Alice was served it from the cache.
        theirs = await store.add_interrogation(
            make_interrogation("theirs"), source_sha256=sources["theirs"], user_id=2
        )
        await store.add_cache_hit(
            theirs.result_id, theirs.interrogation, source_sha256=sources["theirs"], user_id=1
        )
        # Only Alice asked about "private", in two modes, twice in one of them.
        for mode in ("best", "fast", "best"):
            await store.add_interrogation(
                make_interrogation("private", mode=mode), source_sha256=sources["private"], user_id=1
            )
        # A job of Alice's names a source no interrogation does; Bob made a job from one Alice described.
        await store.insert_job(job_request(1, "mine", PARAMS, seed=1, source_sha256=sources["job-only"]))
        await store.add_interrogation(
            make_interrogation("their job"), source_sha256=sources["their-job"], user_id=1
        )
        await store.insert_job(job_request(2, "bob's", PARAMS, seed=2, source_sha256=sources["their-job"]))
        # Alice's job guided from an image of hers that Bob's job also keeps the edges of.
        await store.insert_job(job_request(1, "kept", GUIDED, seed=3, guide_source=sources["their-guide"]))
        await store.insert_job(job_request(2, "edges", GUIDED, seed=4, guide_source=sources["their-guide"]))

        result = await store.forget_user(1)

        assert (result.jobs, result.interrogations, result.sources) == (2, 6, 2)
        kept = {name for name, sha in sources.items() if (tmp_path / "sources" / f"{sha}.png").exists()}
        assert kept == {"shared", "theirs", "their-job", "their-guide", "unrelated"}
        # The cache keeps the results another member asked for, and nothing only Alice did.
        assert await store.find_interrogation(sources["shared"], "best", models) is not None
        assert await store.find_interrogation(sources["theirs"], "best", models) is not None
        for mode in ("best", "fast"):
            assert await store.find_interrogation(sources["private"], mode, models) is None
        assert await store.find_interrogation(sources["their-job"], "best", models) is None
        rows = await store._fetchall("SELECT source_sha256 FROM interrogation_results ORDER BY id")
        assert [row[0] for row in rows] == [sources["shared"], sources["theirs"]]
        assert [i.interrogation.prompt for i in await store.recent_interrogations(2)] == ["theirs", "shared"]
        assert await store.recent_interrogations(1) == []
        assert await store.integrity_problems() == []
    finally:
        await store.close()


async def test_forget_leaves_no_trace_of_the_rows_in_the_files(store: Store) -> None:
    """What /forget deletes is overwritten in the database file and gone from its write-ahead log, not
    left readable in free pages."""
    secret = "a-private-prompt-7c1e"
    job = await store.insert_job(job_request(1, f"{secret} job", PARAMS, seed=1))
    await store.mark_running([job.id], 1.0)
    await store.add_interrogation(make_interrogation(f"{secret} card"), source_sha256="p", user_id=1)
    await store.insert_job(job_request(2, "someone else's", PARAMS, seed=2))
    # Fold the log into the file first, so the rows sit in the database's own pages as well.
    await store._fetchall("PRAGMA wal_checkpoint(TRUNCATE)")
    assert secret.encode() in store.path.read_bytes()

    await store.forget_user(1)

    files = [store.path, store.path.with_name(store.path.name + "-wal")]
    assert all(secret.encode() not in f.read_bytes() for f in files if f.exists())
    assert b"someone else's" in store.path.read_bytes()


async def test_job_ids_are_never_reused(store: Store) -> None:
    """Ids rise in submission order, also for jobs stored together; a forgotten id is never given again."""
    jobs = await store.insert_jobs([job_request(1, f"p{i}", PARAMS, seed=i) for i in range(3)])
    assert [j.id for j in jobs] == [1, 2, 3] and [j.request.prompt for j in jobs] == ["p0", "p1", "p2"]
    assert [await store.get_job(j.id) for j in jobs] == jobs
    await store.insert_job(job_request(2, "last", PARAMS, seed=9))
    await store.forget_user(2)
    again = await store.insert_jobs(
        [job_request(1, "x", PARAMS, seed=1), job_request(1, "y", PARAMS, seed=2)]
    )
    assert [j.id for j in again] == [5, 6]
    assert (await store.insert_job(job_request(1, "z", PARAMS, seed=3))).id == 7


async def test_pending_describes_are_kept_until_removed_and_forgotten_with_their_member(store: Store) -> None:
    """A deferred describe's row reads back as written, oldest first; removing it, or its member's
    /forget, deletes it (its token with it)."""
    first = PendingDescribe(11, 99, "token-a", 501, 1, 7, 1000.0, 1900.0)
    second = PendingDescribe(12, 99, "token-b", None, 2, None, 1001.0, 1901.0)
    await store.add_pending_describe(second)
    await store.add_pending_describe(first)
    assert await store.pending_describes() == [first, second]
    await store.remove_pending_describe(11)
    assert await store.pending_describes() == [second]
    await store.forget_user(2)
    assert await store.pending_describes() == []


LORA_PARAMS = dataclasses.replace(PARAMS, loras=(Lora("style", 0.8, "a" * 64), Lora("ink", -0.5, "b" * 64)))


async def test_a_job_row_records_its_loras_with_their_file_hashes(tmp_path: Path) -> None:
    """The LoRA set is stored with the job (name, weight, file sha256, in the prompt's order): reopened, the
    queued job has the same batch key, and Reroll keeps the set that pins the files."""
    store = await open_store(tmp_path)
    try:
        job = await store.insert_job(job_request(3, "a fox <lora:style:0.8> <lora:ink:-0.5>", LORA_PARAMS))
        (row,) = await store._fetchall("SELECT loras FROM jobs WHERE id = ?", (job.id,))
        assert json.loads(row["loras"]) == [
            {"name": "style", "weight": 0.8, "sha256": "a" * 64},
            {"name": "ink", "weight": -0.5, "sha256": "b" * 64},
        ]
        plain = await store.insert_job(job_request(3, "a fox", PARAMS))
        (row,) = await store._fetchall("SELECT loras FROM jobs WHERE id = ?", (plain.id,))
        assert row["loras"] == "[]"
    finally:
        await store.close()
    store = await open_store(tmp_path)
    try:
        again = await store.get_job(job.id)
        assert again == job and again.request.params == LORA_PARAMS
        assert again.reroll(3).request.loras == LORA_PARAMS.loras
    finally:
        await store.close()
