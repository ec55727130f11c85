"""A job-system process for the restart tests: opens a store, may queue jobs, runs until they are done.

Run as `python -m tests.restart_worker --db PATH --data DIR [--enqueue N] ...` from the repository root. It
prints `batch <n> started` (flushed) when the engine begins a batch, so a test can kill it mid-batch, and
`done` once every job is finished and the store is closed. SIGTERM/SIGINT stop it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

from i2p2i_bot.config import QueueSettings
from i2p2i_bot.gpu import GpuWorker
from i2p2i_bot.jobs import JobRequest
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.request import GenerationParams, ImageSpec
from i2p2i_bot.runner import JobRunner
from i2p2i_bot.store import Store
from tests.fake_engine import FakeEngine
from tests.requests import job_request

PARAMS = GenerationParams("tiny", 2, 7.5, 64, 64, "dpm")


def job_plan(n: int) -> list[JobRequest]:
    """n jobs from three members, 1 to 4 images each, with seeds that say which job and image they are."""
    return [
        job_request(1 + j % 3, f"job {j}", PARAMS, count=1 + j % 4, seed=1000 * (j + 1)) for j in range(n)
    ]


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--enqueue", type=int, default=0)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--hang-at-batch", type=int, default=0, help="block forever when batch N starts")
    parser.add_argument("--log", type=Path, help="append one JSON line per image the engine makes")
    args = parser.parse_args(argv)

    def on_batch(number: int, params: GenerationParams, specs: Sequence[ImageSpec]) -> None:
        if args.log:
            with args.log.open("a") as log:
                log.writelines(json.dumps([s.prompt, s.seed]) + "\n" for s in specs)
        print(f"batch {number} started", flush=True)
        if number == args.hang_at_batch:
            time.sleep(3600)
        time.sleep(args.delay_s)

    settings = QueueSettings(max_batch_images=args.batch, max_queued_jobs_per_user=100)
    store = await Store.open(args.db, images_dir=args.data / "images")
    queue = await JobQueue.open(store, settings)
    for request in job_plan(args.enqueue):
        await queue.submit(request)
    gpu = GpuWorker()
    runner = JobRunner(queue, FakeEngine(on_batch=on_batch), gpu, timeout_s=settings.job_timeout_s)
    runner.stop_on_signals(grace_s=settings.stop_grace_s)
    stopped = runner.start()
    idle = asyncio.ensure_future(queue.join())
    print("ready", flush=True)
    await asyncio.wait({stopped, idle}, return_when=asyncio.FIRST_COMPLETED)
    idle.cancel()
    await runner.stop()
    await store.close()
    gpu.close(timeout_s=5)
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
