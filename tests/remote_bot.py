"""The bot's job system with remote GPU workers in a process of its own, for the restart tests.

Run as `python -m tests.remote_bot --db PATH --images DIR --redis URL --lock-s S --count N --seed K` from the
repository root: it opens the store and the queue, submits one job of N images, and runs the remote runner
until it is killed. It prints `ready` (flushed) once the job is stored and the runner has started.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

from i2p2i_bot.config import QueueSettings
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.remote import RemoteRunner
from i2p2i_bot.request import GenerationParams
from i2p2i_bot.store import Store
from tests.fake_engine import FakeEngine
from tests.requests import job_request

PARAMS = GenerationParams("fake", 4, 7.5, 64, 64, "dpm")


def remote_settings(url: str, lock_s: float) -> QueueSettings:
    return QueueSettings(max_batch_images=4, backend="redis", redis_url=url, worker_lock_s=lock_s)


async def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--lock-s", type=float, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)
    settings = remote_settings(args.redis, args.lock_s)
    store = await Store.open(args.db, images_dir=args.images)
    queue = await JobQueue.open(store, settings)
    await queue.submit(job_request(1, "restart", PARAMS, count=args.count, seed=args.seed))
    runner = RemoteRunner(queue, settings, presets=FakeEngine().presets, poll_s=0.2)
    runner.start()
    print("ready", flush=True)
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main())
