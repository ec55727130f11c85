"""The bot's own layer: event-loop lag while the GPU thread works, and interactions/s with a zero-cost engine.

(a) Event-loop lag: a ticker sleeps 10 ms again and again on the bot's event loop and records how late each
wake-up is, while the production bot (smoke models, connected to the loopback Discord) is idle, while its
GPU thread generates batches back to back, and while it interrogates back to back. Lag there means the
model work starves the loop (the GIL, or CPU cores) and every interaction waits that much longer.

(b) Throughput: the load scenario of tests/test_load.py (every member sends ten interactions; they all
start at once and do not pause) against the production bot with an engine stand-in that answers at once,
so the figure is the cost of the bot, the job queue, SQLite, discord.py and the fake Discord (which shares
the process and event loop, so the figure is a floor for the bot alone). The ticker runs here too: its
worst lateness is the longest the loop was blocked while serving.

Prints a table, writes JSON, ends with `lag_idle_p99_ms=… lag_busy_p99_ms=… interactions_per_s=… …`; a
broken promise in (b) is printed above that line and makes the exit status 1.

    python bench/bot.py [--lag-s 5] [--size 128] [--steps 10] [--batch 4] [--members 100] [--json-out PATH]

Like bench/load.py it imports the fake Discord and the scenario from tests/ and its siblings from bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from load import DEFAULT_CACHE, bench_settings, package_versions, report_failures, short_labels
from measure import count, default_json_path, environment, headline, print_table, write_json
from PIL import Image

from i2p2i_bot import progress_bars
from i2p2i_bot.batches import BatchResult, GeneratedImage
from i2p2i_bot.config import BUILTIN_PRESET, GenerateSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.gpu import GpuWorker, Priority, resolve_device
from i2p2i_bot.guides import GuideName
from i2p2i_bot.interrogation import Candidate, Interrogation
from i2p2i_bot.presets import Preset, Presets
from i2p2i_bot.request import GenerationParams, GenerationRequest, ImageSpec
from i2p2i_bot.request import plan as plan_request
from i2p2i_bot.server_settings import ServerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.bot_harness import bot_settings, percentile, run_crowd, running_i2p2i, sample_images
from tests.discord_fake import running_fake_discord

TICK_S = 0.01
LAG_COLUMNS = ("p50_ms", "p99_ms", "max_ms")
BOT_PACKAGES = ("discord.py", "aiohttp", "aiosqlite")
ZERO_COST = "zero-cost"


# -- an engine that costs nothing ----------------------------------------------------------------------


class ZeroCostEngine:
    """Answers at once: one fixed description, and solid 8×8 images; everything around it is the product's."""

    def __init__(self, settings: GenerateSettings) -> None:
        self.settings = settings
        self.models = {"generator": ZERO_COST, "clip": ZERO_COST, "caption": ZERO_COST}
        # One preset, the built-in one's name, made by nothing.
        only = Preset(BUILTIN_PRESET, ZERO_COST, "sd1", ZERO_COST, settings)
        self.presets = Presets({BUILTIN_PRESET: only})
        self._tile = Image.new("RGB", (8, 8), (90, 120, 200))

    def plan(self, request: GenerationRequest, server: ServerSettings | None = None) -> GenerationRequest:
        """The real request validation and seed planning, for a model that does not exist."""
        preset = self.presets.get(request.preset)
        settings = self.presets.settings_for(preset.name, server, self.settings)
        return plan_request(request, settings, ZERO_COST, (), preset=preset.name)

    def guides_for(self, preset: str | None) -> tuple[GuideName, ...]:
        """None: its images keep nothing of a source."""
        return ()

    def models_for(self, preset: str | None) -> dict[str, str]:
        self.presets.get(preset)
        return self.models

    def available_presets(self) -> tuple[str, ...]:
        return self.presets.names

    def interrogate(
        self, image: Image.Image, mode: str, key: str | None = None, preset: str | None = None
    ) -> Interrogation:
        prompt = "a lighthouse on a cliff at dusk, oil on canvas"
        modes = ("best", "fast", "classic") if mode == "candidates" else (mode,)
        candidates = tuple(Candidate(m, prompt, 0.3) for m in modes)
        return Interrogation(
            mode=mode,
            prompt=prompt,
            score=0.3,
            caption="a lighthouse on a cliff",
            negative="blurry" if mode != "negative" else None,
            candidates=(*candidates, Candidate("negative", "blurry", -0.1)),
            image_embedding=(1.0,) + (0.0,) * 7,
            models={k: v for k, v in self.models.items() if k != "generator"},
            timings_s={"total_s": 0.0},
        )

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: Any = None
    ) -> BatchResult:
        for step in range(1, params.steps + 1):
            if on_step is not None:
                on_step(step, params.steps)
        return BatchResult(
            tuple(
                GeneratedImage(spec, self._tile.copy(), False, None if spec.source_embedding is None else 0.5)
                for spec in specs
            )
        )


# -- measuring the loop ---------------------------------------------------------------------------------


async def ticker(stop: asyncio.Event | None = None, duration_s: float | None = None) -> list[float]:
    """Sleep TICK_S again and again until `stop` is set or `duration_s` passed; each wake-up's lateness."""
    loop = asyncio.get_running_loop()
    end = loop.time() + duration_s if duration_s is not None else float("inf")
    late: list[float] = []
    while loop.time() < end and not (stop is not None and stop.is_set()):
        before = time.perf_counter()
        await asyncio.sleep(TICK_S)
        late.append(time.perf_counter() - before - TICK_S)
    return late


async def while_busy(
    gpu: GpuWorker, work: Callable[[], object], duration_s: float
) -> tuple[list[float], int]:
    """The ticker's lateness while the GPU thread runs `work` back to back; and how many times it ran."""
    stop = asyncio.Event()
    started = threading.Event()
    runs = 0

    def timed() -> object:
        started.set()
        return work()

    async def keep_busy() -> None:
        nonlocal runs
        while not stop.is_set():
            await gpu.run(timed, priority=Priority.GENERATE)
            runs += 1

    # Two in flight, so the GPU thread never waits for the loop to hand it the next one.
    workers = [asyncio.create_task(keep_busy()) for _ in range(2)]
    await asyncio.to_thread(started.wait)
    try:
        late = await ticker(duration_s=duration_s)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    return late, runs


def lag_stats(late_s: list[float]) -> dict[str, float]:
    ordered = sorted(late_s)
    return {
        "ticks": len(ordered),
        "p50_ms": round(1000 * percentile(ordered, 0.5), 3),
        "p99_ms": round(1000 * percentile(ordered, 0.99), 3),
        "max_ms": round(1000 * ordered[-1], 3),
    }


async def measure_lag(
    settings: Settings, engine: Engine, data_dir: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Lag rows: the bot idle, generating, interrogating."""
    planned = engine.plan(GenerationRequest("a lighthouse on a cliff", count=args.batch))
    params, specs = planned.params, planned.specs()
    source = Image.open(io.BytesIO(sample_images(1, side=256)[0])).convert("RGB")
    generating = f"GPU thread generating (batch {args.batch}, {args.size}x{args.size}, {args.steps} steps)"
    work: list[tuple[str, Callable[[], object]]] = [
        (generating, lambda: engine.generate_batch(params, specs)),
        ("GPU thread interrogating (best mode)", lambda: engine.interrogate(source, "best")),
    ]
    rows: list[dict[str, Any]] = []
    async with running_fake_discord() as server:
        with_server = bot_settings(settings, data_dir, server)
        async with running_i2p2i(with_server, server, engine) as bot:
            rows.append({"state": "idle", "work_runs": 0, **lag_stats(await ticker(duration_s=args.lag_s))})
            for state, run in work:
                late, runs = await while_busy(bot.gpu, run, args.lag_s)
                rows.append({"state": state, "work_runs": runs, **lag_stats(late)})
    return rows


class FullCollections:
    """Times the garbage collector's full (generation 2) collections: they hold the GIL, so the loop waits."""

    def __init__(self) -> None:
        self.pauses_s: list[float] = []
        self._started: float | None = None

    def __enter__(self) -> FullCollections:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses_s.append(time.perf_counter() - self._started)
            self._started = None


async def measure_throughput(settings: Settings, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The load scenario, everyone at once, with the zero-cost engine; the ticker runs alongside."""
    engine = ZeroCostEngine(settings.generate)
    tracked_objects = len(gc.get_objects())
    stop = asyncio.Event()
    ticking = asyncio.create_task(ticker(stop))
    with FullCollections() as collections:
        try:
            run, report, server = await run_crowd(
                settings, data_dir, engine, members=args.members, spread_s=0.0, think_s=0.0, timeout_s=300.0
            )
        finally:
            stop.set()
            late = await ticking
    failures = report.failures(run)
    acks = run.ack_times_s()
    return {
        "members": args.members,
        "interactions": len(run.sent),
        "all_answered_after_s": round(run.acked_at - run.started_at, 3),
        "all_delivered_after_s": round(run.settled_at - run.started_at, 3),
        "interactions_per_s": round(run.interactions_per_s, 2),
        "rest_calls": len(server.calls()),
        "ack_p50_ms": round(1000 * percentile(acks, 0.5), 1) if acks else None,
        "ack_p99_ms": round(1000 * percentile(acks, 0.99), 1) if acks else None,
        "ack_max_ms": round(1000 * acks[-1], 1) if acks else None,
        "lag": lag_stats(late),
        "gc_tracked_objects_at_start": tracked_objects,
        "gc_full_collections_ms": [round(1000 * pause, 1) for pause in collections.pauses_s],
        "jobs": len(report.jobs),
        "failures": failures,
    }


# -- the report -------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = _parser().parse_args(argv)
    load_at_start = os.getloadavg()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress_bars.only_on_a_terminal()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="i2p2i-bench-bot-") as folder:
        root = Path(folder)
        labels = Path(args.labels).expanduser() if args.labels else short_labels(root / "labels")
        settings = bench_settings(
            Path(args.cache_dir).expanduser(), labels, device, steps=args.steps, size=args.size
        )
        engine = Engine.load(settings)
        lag_rows = asyncio.run(measure_lag(settings, engine, root / "lag", args))
        # The models stay loaded through (b), as in the bot's process: the garbage collector walks them too.
        throughput = asyncio.run(measure_throughput(settings, root / "throughput", args))
    busy = lag_rows[1]
    figures = {
        "lag_idle_p99_ms": lag_rows[0]["p99_ms"],
        "lag_busy_p99_ms": busy["p99_ms"],
        "lag_busy_max_ms": busy["max_ms"],
        "interactions_per_s": throughput["interactions_per_s"],
        "serving_lag_max_ms": throughput["lag"]["max_ms"],
    }
    payload = {
        "benchmark": "bot",
        "environment": {**environment(device, load_at_start), "bot_versions": package_versions(BOT_PACKAGES)},
        "tick_ms": TICK_S * 1000,
        "lag": lag_rows,
        "throughput": throughput,
        "headline": figures,
    }
    json_path = Path(args.json_out) if args.json_out else default_json_path("bot", device, "smoke")
    write_json(json_path, payload)
    _print(payload)
    report_failures(throughput["failures"], json_path)
    print(headline(figures))
    if throughput["failures"]:
        raise SystemExit(1)
    return figures


def _print(payload: dict[str, Any]) -> None:
    env = payload["environment"]
    print(
        f"bot: event-loop lag and interactions/s on {env['device_name']} [{env['device']}], "
        f"{env['torch_threads']} torch threads, host load {env['load_average_at_start'][0]} at start"
    )
    print(f"lag: how late a {payload['tick_ms']:g} ms sleep on the bot's event loop wakes up")
    print()
    t = payload["throughput"]
    serving = {"state": f"serving {t['members']} members, zero-cost engine", "work_runs": "-", **t["lag"]}
    rows = [
        (row["state"], str(row["work_runs"]), str(row["ticks"]), *(f"{row[k]:.2f}" for k in LAG_COLUMNS))
        for row in [*payload["lag"], serving]
    ]
    print_table(("bot state", "GPU runs", "ticks", "lag p50 ms", "p99 ms", "max ms"), rows)
    print()
    print(
        f"zero-cost engine: {t['interactions']} interactions from {t['members']} members at once, all "
        f"answered after {t['all_answered_after_s']:.2f} s = {t['interactions_per_s']:.0f} interactions/s; "
        f"ack p50 {t['ack_p50_ms']} ms, p99 {t['ack_p99_ms']} ms, max {t['ack_max_ms']} ms; "
        f"{t['jobs']} jobs all delivered after {t['all_delivered_after_s']:.2f} s; "
        f"{t['rest_calls']} REST calls"
    )
    pauses = t["gc_full_collections_ms"]
    print(
        f"full garbage collections while serving: {len(pauses)}, longest {max(pauses, default=0.0):.0f} ms "
        f"({t['gc_tracked_objects_at_start']} objects tracked at the start, the loaded models' included)"
    )
    print()


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--lag-s", type=float, default=5.0, help="seconds of ticking per lag row")
    parser.add_argument("--size", type=count, default=128, help="image side for the busy GPU thread")
    parser.add_argument("--steps", type=count, default=10, help="denoising steps for the busy GPU thread")
    parser.add_argument("--batch", type=count, default=4, help="images per batch for the busy GPU thread")
    parser.add_argument("--members", type=count, default=100, help="members in the throughput run")
    parser.add_argument("--labels", help="label lists (default: the first lines of the packaged ones)")
    parser.add_argument("--device", default="cpu", help="cpu, auto, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="smoke models and label tables")
    parser.add_argument("--json-out", help="default: bench/results/bot-<device>.json")
    return parser


if __name__ == "__main__":
    main()
