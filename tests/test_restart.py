"""Durability across real process deaths: SIGKILL mid-batch and mid-write, and a graceful SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from i2p2i_bot.jobs import Delivery, JobStatus
from i2p2i_bot.store import JobChange, Store, StoredImage, packaged_migrations
from tests.fake_engine import seed_colour
from tests.requests import job_request
from tests.restart_worker import PARAMS, job_plan

ROOT = Path(__file__).resolve().parents[1]
JOBS = 10


class Worker:
    def __init__(self, tmp_path: Path, name: str, *args: str, module: str = "tests.restart_worker") -> None:
        self.db = tmp_path / "db.sqlite3"
        self.data = tmp_path / "data"
        self.log = tmp_path / f"{name}.jsonl"
        self.lines: list[str] = []
        command = [
            sys.executable,
            "-m",
            module,
            "--db",
            str(self.db),
            "--data",
            str(self.data),
        ]
        self.process = subprocess.Popen(
            [*command, "--log", str(self.log), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=(tmp_path / f"{name}.stderr").open("w"),
            text=True,
        )

    def wait_for(self, text: str) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())
            if line.strip() == text:
                return
        raise AssertionError(f"the worker exited without printing {text!r}: {self.lines}")

    def finish(self) -> int:
        out, _ = self.process.communicate(timeout=60)
        self.lines += out.split()
        return self.process.returncode

    def made(self) -> list[tuple[str, int]]:
        if not self.log.exists():
            return []
        return [(prompt, seed) for prompt, seed in map(json.loads, self.log.read_text().splitlines())]


def query(db: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def expected_images() -> dict[tuple[int, int], tuple[str, int]]:
    """(job id, index) → (prompt, seed) for the worker's job plan (ids are given in submission order)."""
    return {
        (j + 1, i): (submitted.request.prompt, submitted.request.seeds[i])
        for j, submitted in enumerate(job_plan(JOBS))
        for i in range(submitted.request.count)
    }


def test_sigkill_mid_batch_then_restart_makes_every_image_exactly_once(tmp_path: Path) -> None:
    """After SIGKILL during a batch, the next start finishes every job, redoing only unstored images."""
    first = Worker(tmp_path, "first", "--enqueue", str(JOBS), "--hang-at-batch", "3")
    first.wait_for("batch 3 started")
    # Batches 1 and 2 are stored while batch 3 runs; kill once they are, with batch 3 still on the GPU.
    for _ in range(1000):
        if query(first.db, "SELECT COUNT(*) FROM images") == [(8,)]:
            break
        time.sleep(0.01)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    assert query(first.db, "PRAGMA integrity_check") == [("ok",)]
    assert query(first.db, "PRAGMA user_version") == [(len(packaged_migrations()),)]

    expected = expected_images()
    stored_before = {(j, i) for j, i in query(first.db, "SELECT job_id, image_index FROM images")}
    on_gpu = {j for (j,) in query(first.db, "SELECT id FROM jobs WHERE in_flight = 1")}
    assert len(stored_before) == 8 and on_gpu  # two batches of 4 stored, a third caught on the GPU

    second = Worker(tmp_path, "second")
    assert second.finish() == 0 and "done" in second.lines

    assert query(first.db, "SELECT DISTINCT status FROM jobs") == [("complete",)]
    assert query(first.db, "PRAGMA integrity_check") == [("ok",)]
    rows = query(first.db, "SELECT job_id, image_index, seed, sha256 FROM images")
    assert len(rows) == len(expected) == len({(j, i) for j, i, _, _ in rows})
    assert {(j, i): s for j, i, s, _ in rows} == {key: seed for key, (_, seed) in expected.items()}
    for job_id, index, seed, _ in rows:
        path = first.data / "images" / str(job_id) / f"{index}.png"
        assert Image.open(path).getpixel((0, 0)) == seed_colour(seed)  # type: ignore[arg-type]
    assert not list((first.data / "images").glob("*/.*.tmp"))

    # The second run made exactly the images that were not stored, each once.
    missing = sorted(value for key, value in expected.items() if key not in stored_before)
    assert sorted(second.made()) == missing
    attempts = {job_id: n for job_id, n in query(first.db, "SELECT id, attempts FROM jobs")}
    assert {j for j, n in attempts.items() if n} == on_gpu and set(attempts.values()) == {0, 1}


def test_sigterm_finishes_the_running_batch_and_closes_the_database(tmp_path: Path) -> None:
    """SIGTERM mid-batch: that batch is stored, no new one starts, the database closes cleanly, no charge."""
    worker = Worker(tmp_path, "first", "--enqueue", str(JOBS), "--delay-s", "0.3")
    worker.wait_for("batch 2 started")
    worker.process.send_signal(signal.SIGTERM)
    assert worker.finish() == 0 and "done" in worker.lines
    assert "batch 3 started" not in worker.lines
    # Checked before anything else opens the file: a clean close folds the WAL back and removes it.
    assert not Path(f"{worker.db}-wal").exists()

    assert query(worker.db, "SELECT COUNT(*) FROM images") == [(8,)]
    assert query(worker.db, "SELECT COUNT(*) FROM jobs WHERE in_flight = 1 OR status = 'failed'") == [(0,)]

    again = Worker(tmp_path, "second")
    assert again.finish() == 0
    assert query(worker.db, "SELECT status, MAX(attempts), COUNT(*) FROM jobs GROUP BY status") == [
        ("complete", 0, JOBS)
    ]
    assert query(worker.db, "SELECT COUNT(*) FROM images") == [(len(expected_images()),)]


# --- SIGKILL during database writes ------------------------------------------------------------------------

GROUP_PROMPT = re.compile(r"^group (\d+) job (\d+) of (\d+)$")
KILLS = 5


def churn_image(seed: int) -> Image.Image:
    """Noise with the seed's colour in the top-left pixel: slow enough to encode that kills often land
    between a group's jobs being stored and its images being recorded."""
    noise = np.random.default_rng(seed).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    noise[0, 0] = seed_colour(seed)
    return Image.fromarray(noise)


async def churn(db: Path, data: Path, first_group: int) -> None:
    """Write through the Store until killed, group after group: its jobs in one transaction, then their
    images and completion in another (files first, as the queue does), then where each was delivered."""
    store = await Store.open(db, images_dir=data / "images")
    print("ready", flush=True)
    for group in itertools.count(first_group):
        size = 1 + group % 4
        requests = [
            job_request(
                1 + k,
                f"group {group} job {k} of {size}",
                PARAMS,
                count=1 + (group + k) % 3,
                seed=1000 * group + 10 * k,
            )
            for k in range(size)
        ]
        jobs = await store.insert_jobs(requests)
        await store.mark_running([job.id for job in jobs], time.time())
        made = [(job.id, index, seed) for job in jobs for index, seed in enumerate(job.request.seeds)]
        hashes = await asyncio.to_thread(
            store.write_image_files, [(job_id, index, churn_image(seed)) for job_id, index, seed in made]
        )
        now = time.time()
        await store.save_changes(
            [
                JobChange(job_id=job.id, status=JobStatus.COMPLETE, attempts=0, finished_at=now)
                for job in jobs
            ],
            [
                StoredImage(
                    job_id=job_id,
                    index=index,
                    seed=seed,
                    nsfw=False,
                    fidelity=None,
                    sha256=sha256,
                    created_at=now,
                )
                for (job_id, index, seed), sha256 in zip(made, hashes, strict=True)
            ],
        )
        for job in jobs:
            await store.set_delivery(job.id, Delivery(channel_id=7, message_id=job.id))
            await store.mark_delivered(job.id)


def check_stored(db: Path, images_dir: Path) -> tuple[int, int]:
    """Every invariant a kill must not break; returns how many groups are complete and how many pending.

    A group's jobs are all stored or none; a group is complete (every image recorded, every job complete)
    or pending (no image recorded, every job queued or running); every recorded image's file is whole.
    """
    jobs = query(db, "SELECT id, prompt, count, seeds, status, delivered_at FROM jobs")
    recorded: dict[int, dict[int, tuple[int, str]]] = {}
    for job_id, index, seed, sha256 in query(db, "SELECT job_id, image_index, seed, sha256 FROM images"):
        recorded.setdefault(int(str(job_id)), {})[int(str(index))] = (int(str(seed)), str(sha256))
    groups: dict[int, list[tuple[int, int, str, set[int]]]] = {}
    for job_id, prompt, count, seeds_json, status, delivered_at in jobs:
        found = GROUP_PROMPT.match(str(prompt))
        assert found is not None, prompt
        group, member, size = map(int, found.groups())
        seeds = json.loads(str(seeds_json))
        assert len(seeds) == count and seeds == [seeds[0] + i for i in range(len(seeds))]
        assert delivered_at is None or status == "complete"
        images = recorded.get(int(str(job_id)), {})
        for index, (seed, sha256) in images.items():
            assert seed == seeds[index]
            path = images_dir / str(job_id) / f"{index}.png"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256
            assert Image.open(path).getpixel((0, 0)) == seed_colour(seed)
        groups.setdefault(group, []).append((member, size, str(status), set(images)))
        if status == "complete":
            assert set(images) == set(range(len(seeds))), (job_id, images)
    complete = pending = 0
    for group, members in groups.items():
        size = members[0][1]
        assert sorted(member for member, *_ in members) == list(range(size)), f"group {group} is half stored"
        statuses = {status for _, _, status, _ in members}
        if statuses == {"complete"}:
            complete += 1
        else:
            assert statuses <= {"queued", "running"}, (group, statuses)
            assert all(not images for *_, images in members), f"group {group} has half its results"
            pending += 1
    return complete, pending


async def reopen_and_check(db: Path, images_dir: Path) -> tuple[int, int]:
    """Open the file with the Store as the next start would, then check SQLite's view and ours."""
    store = await Store.open(db, images_dir=images_dir)
    try:
        assert await store.integrity_problems() == []
        assert await store.schema_version() == len(packaged_migrations())
    finally:
        await store.close()
    return check_stored(db, images_dir)


def test_integrity_problems_names_what_is_wrong(tmp_path: Path) -> None:
    """The check the kill tests rely on is not vacuous: a sound file has no problems, a dangling row one."""

    async def problems() -> list[str]:
        store = await Store.open(tmp_path / "db.sqlite3", images_dir=tmp_path / "images")
        try:
            return await store.integrity_problems()
        finally:
            await store.close()

    assert asyncio.run(problems()) == []
    with sqlite3.connect(tmp_path / "db.sqlite3") as conn:  # foreign keys are off in a plain connection
        conn.execute("INSERT INTO images VALUES (1, 99, 0, 5, 0, NULL, 'x', 0)")
    assert asyncio.run(problems()) == ["row 1 of images refers to a missing row of jobs"]


def test_sigkill_during_database_writes_leaves_whole_jobs_and_a_sound_file(tmp_path: Path) -> None:
    """A process writing jobs and results through the Store is killed at random moments, five times.

    After each kill the file reopens with integrity_check ok and its schema version, every job is stored
    whole or not at all, results are all there or none; resuming then makes each missing image once.
    """
    rng = random.Random(20240611)
    pending_after: list[int] = [0]
    for kill in range(KILLS):
        writer = Worker(
            tmp_path, f"writer-{kill}", "--first-group", str(1000 * kill), module="tests.test_restart"
        )
        writer.wait_for("ready")
        time.sleep(rng.uniform(0.1, 1.2))
        writer.process.send_signal(signal.SIGKILL)
        assert writer.process.wait(timeout=30) == -signal.SIGKILL
        complete, pending = asyncio.run(reopen_and_check(writer.db, writer.data / "images"))
        # Each kill leaves at most the one group it interrupted unfinished; earlier ones stay as they were.
        assert pending - pending_after[-1] in (0, 1)
        pending_after.append(pending)
    assert complete >= KILLS  # the writers got work done between kills

    unfinished = query(writer.db, "SELECT id, prompt, seeds FROM jobs WHERE status != 'complete' ORDER BY id")
    unfinished_groups = {str(prompt).split()[1] for _, prompt, _ in unfinished}  # "group G job k of n"
    assert len(unfinished_groups) == pending_after[-1]
    missing = sorted(
        (str(prompt), seed) for _, prompt, seeds in unfinished for seed in json.loads(str(seeds))
    )
    resume = Worker(tmp_path, "resume")
    assert resume.finish() == 0 and "done" in resume.lines
    assert sorted(resume.made()) == missing  # each missing image made exactly once
    complete, pending = asyncio.run(reopen_and_check(writer.db, writer.data / "images"))
    assert pending == 0 and complete > 0
    assert query(writer.db, "SELECT DISTINCT status FROM jobs") == [("complete",)]
    total = query(writer.db, "SELECT SUM(count) FROM jobs")[0][0]
    assert query(writer.db, "SELECT COUNT(*), COUNT(DISTINCT job_id || '/' || image_index) FROM images") == [
        (total, total)
    ]
    assert not list((writer.data / "images").glob("*/.*.tmp"))


def _churn_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--log", type=Path)
    parser.add_argument("--first-group", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(churn(args.db, args.data, args.first_group))


if __name__ == "__main__":
    _churn_main(sys.argv[1:])
