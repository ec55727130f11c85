"""Job-system throughput with a zero-cost engine: members' jobs scheduled, run on the GPU thread and stored.

Everything real except the model: the fair queue, the GPU thread, PNG files, SQLite commits and an event
subscriber that reads every event, as the bot does. Each member submits 100 jobs of 1 to 4 images, all members
at once. Prints a table, then `jobs_per_s=<number>` as its last line.

    python bench/jobs.py [--users 100] [--jobs-per-user 100] [--batch 8] [--dir FOLDER]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from i2p2i_bot.batches import BatchResult, GeneratedImage, StepCallback
from i2p2i_bot.config import GenerateSettings, QueueSettings
from i2p2i_bot.gpu import GpuWorker
from i2p2i_bot.jobs import EventKind, JobRequest
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.request import GenerationParams, GenerationRequest, ImageSpec, plan
from i2p2i_bot.runner import JobRunner
from i2p2i_bot.store import Store

PARAMS = GenerationParams("zero-cost", 4, 7.5, 512, 512, "dpm")
# Requests are planned as the bot plans them, with these defaults.
PLANNING = GenerateSettings(
    steps=PARAMS.steps, guidance=PARAMS.guidance, width=PARAMS.width, height=PARAMS.height
)


class ZeroCostEngine:
    """Hands out ready-made 8×8 solid images, reporting every step like the real pipeline."""

    def __init__(self) -> None:
        self.batches = 0
        self.images = 0
        self._tiles = [Image.new("RGB", (8, 8), (red, 0, 0)) for red in range(256)]

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: StepCallback | None = None
    ) -> BatchResult:
        self.batches += 1
        self.images += len(specs)
        for step in range(1, params.steps + 1):
            if on_step is not None:
                on_step(step, params.steps)
        images = tuple(GeneratedImage(spec, self._tiles[spec.seed & 255], False, None) for spec in specs)
        return BatchResult(images)


async def run(users: int, jobs_per_user: int, batch: int, folder: Path) -> None:
    total_jobs = users * jobs_per_user
    settings = QueueSettings(
        max_batch_images=batch,
        max_queued_jobs_per_user=jobs_per_user,
        max_queued_jobs=total_jobs,
    )
    store = await Store.open(folder / "bench.sqlite3", images_dir=folder / "images")
    queue = await JobQueue.open(store, settings)
    gpu = GpuWorker()
    engine = ZeroCostEngine()
    runner = JobRunner(queue, engine, gpu, timeout_s=settings.job_timeout_s)

    queued_at: dict[int, float] = {}
    latencies: list[float] = []
    last_done: dict[int, float] = {}
    counts: dict[EventKind, int] = dict.fromkeys(EventKind, 0)
    subscription = queue.subscribe()

    async def listen() -> None:
        async for event in subscription:
            counts[event.kind] += 1
            if event.kind is EventKind.QUEUED:
                queued_at[event.job_id] = time.perf_counter()
            elif event.kind is EventKind.FINISHED:
                now = time.perf_counter()
                latencies.append(now - queued_at.pop(event.job_id))
                last_done[event.owner_id] = now - start

    async def member(user: int) -> None:
        for j in range(jobs_per_user):
            request = GenerationRequest(f"member {user} job {j}", count=1 + (user + j) % 4)
            await queue.submit(JobRequest(owner_id=user, request=plan(request, PLANNING, PARAMS.model)))

    listener = asyncio.create_task(listen())
    start = time.perf_counter()
    runner.start()
    await asyncio.gather(*(member(user) for user in range(users)))
    enqueued = time.perf_counter()
    await queue.join()
    finished = time.perf_counter()
    await runner.stop()
    subscription.close()
    await listener
    await store.close()
    gpu.close()

    with sqlite3.connect(folder / "bench.sqlite3") as db:
        complete = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'complete'").fetchone()[0]
        stored = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    files = sum(1 for _ in (folder / "images").glob("*/*.png"))
    if complete != total_jobs or stored != engine.images or files != stored:
        raise SystemExit(f"incomplete run: {complete} jobs complete, {stored} image rows, {files} files")

    elapsed = finished - start
    latencies.sort()
    rows = [
        ("folder (database and PNGs)", f"{folder.parent}"),
        ("members", f"{users}"),
        ("jobs", f"{total_jobs}"),
        ("images (rows = PNG files)", f"{stored}"),
        ("GPU batches", f"{engine.batches}"),
        ("mean images per batch", f"{engine.images / engine.batches:.2f} of {batch}"),
        ("events read (step events)", f"{sum(counts.values())} ({counts[EventKind.STEP]})"),
        ("step events dropped (reader behind)", f"{subscription.dropped}"),
        ("all jobs submitted after (s)", f"{enqueued - start:.2f}"),
        ("all jobs finished after (s)", f"{elapsed:.2f}"),
        ("job latency p50 / p95 / max (s)", " / ".join(f"{q:.2f}" for q in _quantiles(latencies))),
        (
            "members' last jobs done between (s)",
            f"{min(last_done.values()):.2f} and {max(last_done.values()):.2f}",
        ),
        ("images per second", f"{stored / elapsed:.0f}"),
        ("jobs per second", f"{total_jobs / elapsed:.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"{'metric':<{width}}  value")
    print(f"{'-' * width}  {'-' * 16}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(f"jobs_per_s={total_jobs / elapsed:.0f}")


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(values, n=20)
    return statistics.median(values), cuts[18], values[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--jobs-per-user", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--dir",
        default="/dev/shm" if os.access("/dev/shm", os.W_OK) else None,
        help="where the database and PNGs go (default: /dev/shm when there is one, so that a slow disk's "
        "cost per file creation does not hide the job system's own cost; pass a disk folder to include it)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="i2p2i-bench-", dir=args.dir) as folder:
        asyncio.run(run(args.users, args.jobs_per_user, args.batch, Path(folder)))


if __name__ == "__main__":
    main()
