"""Durability across real process deaths: SIGKILL mid-batch, and a graceful SIGTERM."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from tests.fake_engine import seed_colour
from tests.restart_worker import job_plan

ROOT = Path(__file__).resolve().parents[1]
JOBS = 10


class Worker:
    def __init__(self, tmp_path: Path, name: str, *args: str) -> None:
        self.db = tmp_path / "db.sqlite3"
        self.data = tmp_path / "data"
        self.log = tmp_path / f"{name}.jsonl"
        self.lines: list[str] = []
        command = [
            sys.executable,
            "-m",
            "tests.restart_worker",
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
        (j + 1, i): (request.prompt, request.seed + i)  # type: ignore[operator]
        for j, request in enumerate(job_plan(JOBS))
        for i in range(request.count)
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

    expected = expected_images()
    stored_before = {(j, i) for j, i in query(first.db, "SELECT job_id, image_index FROM images")}
    on_gpu = {j for (j,) in query(first.db, "SELECT id FROM jobs WHERE in_flight = 1")}
    assert len(stored_before) == 8 and on_gpu  # two batches of 4 stored, a third caught on the GPU

    second = Worker(tmp_path, "second")
    assert second.finish() == 0 and "done" in second.lines

    assert query(first.db, "SELECT DISTINCT status FROM jobs") == [("complete",)]
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
