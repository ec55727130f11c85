"""Scale-out: the bot's queue feeding 1, 2, 4, 8 GPU workers through a real Redis (BullMQ).

Each point starts a fresh redis-server on a loopback port (append-only, no eviction) and N real
`i2p2i worker` processes running the stub engine (tests/stub_engine.py), which sleeps `--batch-s` per batch
and makes no images worth the name, so two CPU cores do not cap the figure: it measures the bot's scheduling,
Redis round trips and result handling against ideal scaling. The bot side is the production JobQueue and
RemoteRunner in this process, with its SQLite database and PNG files.

`--members` (20) members each submit N × `--jobs-per-member` jobs of `--images-per-job` images, all at once,
so every worker gets about the same number of batches at every N. Per N it prints images/s, the efficiency
X(N)/(N·X(1)), the latency from a batch's forming to a worker starting it (p50/p99), the bot's CPU time per
batch (this process, all its threads), and the Jain index of the members' completed images at the moment half
of all images were done (1.0: every member had the same share). Ends with
`efficiency_4=… efficiency_8=… jain_min=…` (the points run).

    python bench/scale.py [--workers 1,2,4,8] [--batch-s 1.0] [--members 20] [--jobs-per-member 2]

Needs redis-server (apt-get install redis-server). The workers and the Redis fixture belong to the test
suite, so this script puts the repository root on the import path; it imports its sibling measure.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from measure import count, headline, print_table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from i2p2i_bot.config import QueueSettings
from i2p2i_bot.jobs import EventKind
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.remote import RemoteRunner
from i2p2i_bot.remote_wire import WORKER_KEY_PREFIX
from i2p2i_bot.request import GenerationParams
from i2p2i_bot.store import Store
from tests.fake_engine import FakeEngine
from tests.redis_server import RedisServer, Workers, redis_server_path
from tests.requests import job_request

STEPS = 4
PARAMS = GenerationParams("fake", STEPS, 7.5, 64, 64, "dpm")  # the model the stub engine has
BATCH_IMAGES = 4
READY_LIMIT_S = 120.0


@dataclass(frozen=True)
class Point:
    workers: int
    images: int
    batches: int
    elapsed_s: float
    start_p50_s: float
    start_p99_s: float
    cpu_per_batch_ms: float
    jain: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def jain(shares: list[int]) -> float:
    """Jain's fairness index: (Σx)² / (n·Σx²); 1.0 when everyone has the same."""
    total = sum(shares)
    squares = sum(x * x for x in shares)
    return total * total / (len(shares) * squares) if squares else 1.0


async def wait_for_workers(server: RedisServer, n: int) -> None:
    client = server.client()
    give_up_at = time.monotonic() + READY_LIMIT_S
    while len(list(client.scan_iter(match=WORKER_KEY_PREFIX + "*"))) < n:
        if time.monotonic() > give_up_at:
            raise SystemExit(f"scale.py: {n} workers did not report ready within {READY_LIMIT_S:g} s")
        await asyncio.sleep(0.1)


async def run_point(n: int, args: argparse.Namespace, folder: Path) -> Point:
    server = RedisServer(folder / "redis")
    server.start()
    pool = Workers(server, folder / "workers", step_s=args.batch_s / STEPS, lock_s=30.0)
    try:
        pool.spawn(n)
        await wait_for_workers(server, n)
        settings = QueueSettings(
            max_batch_images=BATCH_IMAGES,
            max_queued_jobs=100_000,
            max_queued_jobs_per_user=10_000,
            backend="redis",
            redis_url=server.url,
        )
        store = await Store.open(folder / "db.sqlite3", images_dir=folder / "images")
        queue = await JobQueue.open(store, settings)
        members = list(range(1, args.members + 1))
        for round_ in range(n * args.jobs_per_member):
            for member in members:
                seed = 1000 * member + round_ * args.images_per_job
                request = job_request(member, f"m{member}", PARAMS, count=args.images_per_job, seed=seed)
                await queue.submit(request)
        total = len(members) * n * args.jobs_per_member * args.images_per_job
        done: Counter[int] = Counter()
        at_half: list[int] = []
        events = queue.subscribe()

        async def count_images() -> None:
            async for event in events:
                if event.kind is EventKind.IMAGE:
                    done[event.owner_id] += 1
                    if not at_half and sum(done.values()) >= total / 2:
                        at_half.extend(done[m] for m in members)

        counter = asyncio.create_task(count_images())
        runner = RemoteRunner(queue, settings, presets=FakeEngine().presets, poll_s=0.5)
        cpu_before, wall_before = time.process_time(), time.monotonic()
        runner.start()
        await queue.join()
        elapsed_s = time.monotonic() - wall_before
        cpu_s = time.process_time() - cpu_before
        await runner.stop(5)
        events.close()
        counter.cancel()
        await store.close()
        with sqlite3.connect(folder / "db.sqlite3") as db:
            (stored,) = db.execute("SELECT COUNT(*) FROM images").fetchone()
        if stored != total:
            raise SystemExit(f"scale.py: {stored} of {total} images were made; see {pool.directory}")
        latencies = list(runner.start_latencies_s)
        return Point(
            workers=n,
            images=total,
            batches=runner.batches_run,
            elapsed_s=elapsed_s,
            start_p50_s=statistics.median(latencies),
            start_p99_s=percentile(latencies, 0.99),
            cpu_per_batch_ms=1000 * cpu_s / runner.batches_run,
            jain=jain(at_half),
        )
    finally:
        pool.stop()
        server.stop()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts, comma-separated (1 first)")
    parser.add_argument("--batch-s", type=float, default=1.0, help="the stub's time per batch (s)")
    parser.add_argument("--members", type=count, default=20)
    parser.add_argument("--jobs-per-member", type=count, default=2, help="per worker")
    parser.add_argument("--images-per-job", type=count, default=2)
    parser.add_argument(
        "--dir", type=Path, help="where the database, PNGs and Redis live (default: a temp dir)"
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    if not counts or counts[0] != 1 or any(n < 1 for n in counts):
        parser.error("--workers must start with 1 (the base of the efficiency), e.g. 1,2,4,8")
    if redis_server_path() is None:
        print("scale.py: redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)
    points = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n in counts:
            points.append(await run_point(n, args, Path(tmp) / f"workers-{n}"))
    base = points[0].images_per_s
    rows = [
        [
            str(p.workers),
            str(p.images),
            str(p.batches),
            f"{p.elapsed_s:.2f}",
            f"{p.images_per_s:.2f}",
            f"{p.images_per_s / (p.workers * base):.3f}",
            f"{p.start_p50_s * 1000:.0f} / {p.start_p99_s * 1000:.0f}",
            f"{p.cpu_per_batch_ms:.1f}",
            f"{p.jain:.3f}",
        ]
        for p in points
    ]
    print(
        f"stub batch time {args.batch_s:g} s, {BATCH_IMAGES} images per batch, {args.members} members, "
        f"{args.jobs_per_member} jobs of {args.images_per_job} images per member and worker"
    )
    print_table(
        [
            "workers",
            "images",
            "batches",
            "wall (s)",
            "images/s",
            "efficiency",
            "form→start p50 / p99 (ms)",
            "bot CPU/batch (ms)",
            "Jain at half",
        ],
        rows,
    )
    figures = {f"efficiency_{p.workers}": p.images_per_s / (p.workers * base) for p in points[1:]}
    figures["jain_min"] = min(p.jain for p in points)
    print(headline(figures))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
