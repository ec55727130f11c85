"""bot.py for the lifecycle tests: the real run_bot and its signal handling, without the models.

Run as `python -m tests.lifecycle_bot [--backoff-s S] [--gpu-lost-when PATH] [--load-s S] -- BOT.PY ARGS` from
the
repository root. The engine is the zero-cost stand-in, so the bot connects in seconds. discord.py draws each
reconnect delay at random, up to 2^k s after k failed tries (about 17 min at most); `--backoff-s` fixes every
delay at S, so a test can stop the bot while it waits out a long one without first sitting through the short
ones. With `--gpu-lost-when`, the GPU counts as lost for good once PATH exists, and the bot checks often.
With `--describe-hangs`, describing an image never returns (it prints a line first), for a kill meanwhile.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import discord.client
from discord.backoff import ExponentialBackoff

import bot
from i2p2i_bot import app
from i2p2i_bot.engine import Engine
from tests.fake_engine import FakeEngine


class FixedBackoff(ExponentialBackoff[bool]):
    """discord.py's reconnect backoff, with every delay the same."""

    delay_s = 0.0

    def delay(self) -> float:
        return self.delay_s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.lifecycle_bot")
    parser.add_argument("--backoff-s", type=float, help="every gateway reconnect delay, in seconds")
    parser.add_argument("--gpu-lost-when", type=Path, metavar="PATH", help="the GPU is lost once PATH exists")
    parser.add_argument("--load-s", type=float, default=0.0, help="how long loading the models takes")
    parser.add_argument("--describe-hangs", action="store_true", help="describing an image never returns")
    parser.add_argument("bot_args", nargs=argparse.REMAINDER, help="-- then bot.py's own arguments")
    args = parser.parse_args(argv)
    if args.backoff_s is not None:
        FixedBackoff.delay_s = args.backoff_s
        discord.client.ExponentialBackoff = FixedBackoff  # type: ignore[assignment, misc]

    if args.gpu_lost_when is not None:
        marker: Path = args.gpu_lost_when
        app.GPU_WATCH_INTERVAL_S = 0.05

        def gpu_lost(self: app.I2P2IBot) -> str | None:
            return f"{marker} exists" if marker.exists() else None

        app.I2P2IBot.gpu_lost = gpu_lost  # type: ignore[method-assign]

    def load(cls: type[Engine], settings: Any, **options: Any) -> Any:
        print("stand-in engine: loading", flush=True)
        time.sleep(args.load_s)
        return FakeEngine()

    if args.describe_hangs:

        def hang(
            self: FakeEngine, image: Any, mode: str, key: str | None = None, preset: str | None = None
        ) -> Any:
            print("stand-in engine: describing", flush=True)
            threading.Event().wait()

        FakeEngine.interrogate = hang  # type: ignore[method-assign]

    Engine.load = classmethod(load)  # type: ignore[assignment, method-assign]
    bot_args = args.bot_args[1:] if args.bot_args[:1] == ["--"] else args.bot_args
    return bot.main(bot_args)


if __name__ == "__main__":
    sys.exit(main())
