"""Load: a hundred members, ten interactions each, at once, against the real bot over the loopback Discord.

The scenario of tests/test_load.py (the Crowd in tests/bot_harness.py): the production bot with the smoke
models (one denoising step, 64×64 images, short label lists), the real discord.py client, and the fake
Discord in the same process and event loop. Each member describes an image (/imagine-from, or the context
menu on a message they post), presses Generate and Info, runs /queue, waits for the result and presses
Reroll, then Cancel on the reroll, opens Edit prompt and submits the modal, runs /history and /job.

Prints acknowledgement times (interaction sent → first callback received by the fake) per kind and overall,
checks that every interaction was answered exactly once and every job finished and was delivered once, writes
JSON, and ends with `ack_p50_ms=… ack_p99_ms=… ack_max_ms=… interactions_per_s=…`. A broken promise is
printed above that line and makes the exit status 1.

    python bench/load.py [--members 100] [--steps 1] [--size 64] [--device cpu] [--json-out PATH]

`--scenario describe-flood` runs another workload on the same bot: one member sends `--flood` (50)
/imagine-from of different pictures within `--flood-over-s` (2 s), another member describes one picture
1 s in, and a third asks /imagine for one image 0.1 s in. It prints each member's wait (sent → card, sent
→ result), how many describes the GPU ran after each of the other two members asked and before it served
them, and ends with `other_card_s=… job_result_s=… describes_ahead_of_job=… describes_ahead_of_card=…`.

The fake Discord and the scenario belong to the test suite, so this script puts the repository root on the
import path; it imports its sibling measure.py from bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from measure import count, default_json_path, environment, fmt, headline, print_table, write_json
from PIL import Image, ImageOps

from i2p2i_bot import progress_bars
from i2p2i_bot.batches import BatchResult, StepCallback
from i2p2i_bot.config import GenerateSettings, InterrogateSettings, ModelSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.gpu import resolve_device
from i2p2i_bot.guides import GuideName
from i2p2i_bot.interrogate import LABEL_FILES
from i2p2i_bot.interrogation import Interrogation
from i2p2i_bot.presets import Presets
from i2p2i_bot.request import GenerationParams, GenerationRequest, ImageSpec
from i2p2i_bot.server_settings import ServerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.bot_harness import (
    LoadAudit,
    LoadRun,
    bot_settings,
    percentile,
    png_bytes,
    run_crowd,
    running_i2p2i,
)
from tests.discord_fake import FakeDiscord, InteractionHandle, RecordedCall, running_fake_discord

DEFAULT_CACHE = Path(os.environ.get("I2P2I_BENCH_CACHE", Path.home() / ".cache" / "i2p2i-bench"))
# Discord shows "This interaction failed" when the first response takes longer than this.
ACK_DEADLINE_S = 3.0
# Lines taken from each packaged label list: tables that embed in a blink with the smoke CLIP.
SHORT_LIST_LINES = {"artists.txt": 40, "flavors.txt": 100, "mediums.txt": 20, "movements.txt": 20}
BOT_PACKAGES = ("discord.py", "aiohttp", "aiosqlite")


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = _parser().parse_args(argv)
    load_at_start = os.getloadavg()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress_bars.only_on_a_terminal()
    device = resolve_device(args.device)
    cache_dir = Path(args.cache_dir).expanduser()
    with tempfile.TemporaryDirectory(prefix="i2p2i-load-") as folder:
        labels = Path(args.labels).expanduser() if args.labels else short_labels(Path(folder) / "labels")
        settings = bench_settings(cache_dir, labels, device, steps=args.steps, size=args.size)
        engine = Engine.load(settings)
        if args.scenario == "describe-flood":
            return describe_flood(args, settings, engine, Path(folder) / "data", device, load_at_start)
        run, report, server = asyncio.run(
            run_crowd(
                settings,
                Path(folder) / "data",
                engine,
                members=args.members,
                images=args.images,
                max_count=args.max_count,
                seed=args.seed,
                spread_s=args.spread_s,
                timeout_s=args.timeout_s,
            )
        )
        calls = len(server.calls())
    figures, payload = summarise(run, report, calls)
    failures = report.failures(run)
    payload.update(
        benchmark="load",
        environment={**environment(device, load_at_start), "bot_versions": package_versions(BOT_PACKAGES)},
        settings={
            "members": args.members,
            "interactions_per_member": len(run.sent) // max(1, args.members),
            "distinct_images": args.images,
            "max_count": args.max_count,
            "steps": args.steps,
            "size": args.size,
            "labels": str(labels) if args.labels else "first lines of the packaged lists",
            "spread_s": args.spread_s,
            "seed": args.seed,
        },
        failures=failures,
        headline=figures,
    )
    json_path = Path(args.json_out) if args.json_out else default_json_path("load", device, "smoke")
    write_json(json_path, payload)
    print_report(payload)
    report_failures(failures, json_path)
    print(headline(figures))
    if failures:
        raise SystemExit(1)
    return figures


def report_failures(failures: Sequence[str], json_path: Path) -> None:
    """Broken promises are printed before the headline (they are all in the JSON); the exit status is 1."""
    if not failures:
        return
    print(f"BROKEN: {len(failures)} promises broken under load (all listed in {json_path}), e.g.:")
    for failure in failures[:5]:
        print(f"  {failure}")
    print()


def short_labels(directory: Path) -> Path:
    """The first lines of each packaged label list (all of the negative list) in `directory`."""
    import clip_interrogator

    packaged = Path(clip_interrogator.__file__).parent / "data"
    directory.mkdir(parents=True, exist_ok=True)
    for name in LABEL_FILES:
        lines = (packaged / name).read_text(encoding="utf-8", errors="replace").splitlines()
        keep = SHORT_LIST_LINES.get(name, len(lines))
        (directory / name).write_text("\n".join(lines[:keep]) + "\n", encoding="utf-8")
    return directory


def bench_settings(cache_dir: Path, labels: Path, device: torch.device, *, steps: int, size: int) -> Settings:
    """The smoke models with the load test's interrogation and generation settings."""
    return Settings(
        models=ModelSettings(preset="smoke", cache_dir=str(cache_dir), device=str(device)),
        interrogate=InterrogateSettings(labels_dir=str(labels), min_flavors=2, max_flavors=6),
        generate=GenerateSettings(steps=steps, width=size, height=size, min_side=64, max_side=max(128, size)),
    )


def summarise(run: LoadRun, report: LoadAudit, calls: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Acknowledgement times per kind and overall, throughput, and what became of the jobs."""
    by_kind: defaultdict[str, list[float]] = defaultdict(list)
    for sent in run.sent:
        if sent.ack_s is not None:
            by_kind[sent.kind].append(sent.ack_s)
    rows = []
    for kind, times in sorted(by_kind.items(), key=lambda item: -len(item[1])):
        rows.append({"kind": kind, **_ack_stats(sorted(times))})
    every = run.ack_times_s()
    overall = _ack_stats(every)
    statuses: defaultdict[str, int] = defaultdict(int)
    for job in report.jobs.values():
        statuses[job.status] += 1
    acked_s = run.acked_at - run.started_at
    settled_s = run.settled_at - run.started_at
    payload: dict[str, Any] = {
        "interactions": len(run.sent),
        "answered": len(every),
        "acks_over_deadline": sum(1 for t in every if t > ACK_DEADLINE_S),
        "ack_deadline_s": ACK_DEADLINE_S,
        "ack_ms": overall,
        "ack_ms_by_kind": rows,
        "all_answered_after_s": round(acked_s, 3),
        "all_delivered_after_s": round(settled_s, 3),
        "interactions_per_s": round(run.interactions_per_s, 2),
        "jobs": dict(statuses),
        "images_stored": sum(job.images for job in report.jobs.values()),
        "rest_calls": calls,
        "rest_calls_per_s": round(calls / max(settled_s, 1e-9), 1),
    }
    figures = {
        "ack_p50_ms": overall["p50"],
        "ack_p99_ms": overall["p99"],
        "ack_max_ms": overall["max"],
        "interactions_per_s": run.interactions_per_s,
    }
    return figures, payload


def _ack_stats(sorted_s: list[float]) -> dict[str, Any]:
    if not sorted_s:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}
    return {
        "count": len(sorted_s),
        **{f"p{q}": round(1000 * percentile(sorted_s, q / 100), 1) for q in (50, 90, 99)},
        "max": round(1000 * sorted_s[-1], 1),
    }


def print_report(payload: dict[str, Any]) -> None:
    env, setup = payload["environment"], payload["settings"]
    print(
        f"load: {setup['members']} members x {setup['interactions_per_member']} interactions, smoke models "
        f"on {env['device_name']} [{env['device']}], {env['torch_threads']} torch threads, host load "
        f"{env['load_average_at_start'][0]} at start"
    )
    print(
        f"{setup['steps']} step(s) at {setup['size']}x{setup['size']}, at most {setup['max_count']} "
        f"images per job, {setup['distinct_images']} distinct source images; members start within "
        f"{setup['spread_s']} s"
    )
    print()
    table = [*payload["ack_ms_by_kind"], {"kind": "all", **payload["ack_ms"]}]
    print_table(
        ("interaction", "count", "ack p50 ms", "p90 ms", "p99 ms", "max ms"),
        [(r["kind"], str(r["count"]), *(_ms(r[k]) for k in ("p50", "p90", "p99", "max"))) for r in table],
    )
    print()
    jobs = ", ".join(f"{n} {status}" for status, n in sorted(payload["jobs"].items()))
    print(
        f"answered {payload['answered']} of {payload['interactions']} interactions "
        f"({payload['acks_over_deadline']} after {payload['ack_deadline_s']:g} s); "
        f"all answered after {payload['all_answered_after_s']:.1f} s = {payload['interactions_per_s']:.1f} "
        "interactions/s"
    )
    print(
        f"jobs: {jobs}; {payload['images_stored']} images; all delivered after "
        f"{payload['all_delivered_after_s']:.1f} s; the fake answered {payload['rest_calls']} REST calls "
        f"({payload['rest_calls_per_s']:.0f}/s)"
    )
    print()


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    found = {}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


# -- the describe flood -------------------------------------------------------------------------------------

# Who floods /imagine-from, who describes one picture, who asks for one image; and when the last two ask.
FLOODER, DESCRIBER, IMAGINER = "alice", "bob", "mod"
DESCRIBER_AT_S = 1.0
IMAGINER_AT_S = 0.1
CALLBACK = "POST /interactions/{interaction}/{token}/callback"
FOLLOWUP = "POST /webhooks/{app}/{token}"
DEFERRED = 5


class GpuCallLog:
    """The engine as the bot uses it, noting when each describe (whose, by the picture's hash) and each
    batch of images starts on the GPU thread."""

    def __init__(self, engine: Engine, owner_of: dict[str, str]) -> None:
        self._engine = engine
        self._owner_of = owner_of
        self._lock = threading.Lock()
        self.started: list[tuple[float, str]] = []  # (time.time(), "describe <member>" or "generate")

    @property
    def presets(self) -> Presets:
        return self._engine.presets

    @property
    def models(self) -> dict[str, str]:
        return self._engine.models

    def models_for(self, preset: str | None) -> dict[str, str]:
        return self._engine.models_for(preset)

    def available_presets(self) -> tuple[str, ...]:
        return self._engine.available_presets()

    def guides_for(self, preset: str | None) -> tuple[GuideName, ...]:
        return self._engine.guides_for(preset)

    def plan(self, request: GenerationRequest, server: ServerSettings | None = None) -> GenerationRequest:
        return self._engine.plan(request, server)

    def interrogate(
        self, image: Any, mode: str, key: str | None = None, preset: str | None = None
    ) -> Interrogation:
        self._note(f"describe {self._owner_of.get(key or '', 'nobody')}")
        return self._engine.interrogate(image, mode, key, preset)

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: StepCallback | None = None
    ) -> BatchResult:
        self._note("generate")
        return self._engine.generate_batch(params, specs, on_step)

    def _note(self, what: str) -> None:
        with self._lock:
            self.started.append((time.time(), what))


@dataclass
class FloodRun:
    """What each member sent (with when), and what the GPU ran when."""

    sent: dict[str, list[tuple[float, InteractionHandle]]] = field(default_factory=dict)
    gpu: list[tuple[float, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    started_at: float = 0.0


def describe_flood(
    args: argparse.Namespace,
    settings: Settings,
    engine: Engine,
    data_dir: Path,
    device: torch.device,
    load_at_start: tuple[float, float, float],
) -> dict[str, float]:
    """Run the describe flood, print each member's wait and write the JSON; returns the headline."""
    cap = args.max_describes_per_user
    if cap is not None:
        interrogate = dataclasses.replace(settings.interrogate, max_describes_per_user=cap)
        settings = dataclasses.replace(settings, interrogate=interrogate)
    run = asyncio.run(
        run_describe_flood(
            settings, data_dir, engine, flood=args.flood, over_s=args.flood_over_s, timeout_s=args.timeout_s
        )
    )
    figures, payload = summarise_flood(run)
    payload.update(
        benchmark="load-describe-flood",
        environment={**environment(device, load_at_start), "bot_versions": package_versions(BOT_PACKAGES)},
        settings={
            "flood": args.flood,
            "flood_over_s": args.flood_over_s,
            "describer_at_s": DESCRIBER_AT_S,
            "imaginer_at_s": IMAGINER_AT_S,
            "steps": args.steps,
            "size": args.size,
            # The per-member cap, where the bot has one.
            "max_describes_per_user": getattr(settings.interrogate, "max_describes_per_user", None),
        },
        failures=run.problems,
        headline=figures,
    )
    json_path = (
        Path(args.json_out) if args.json_out else default_json_path("load-describe-flood", device, "smoke")
    )
    write_json(json_path, payload)
    print_flood(payload)
    report_failures(run.problems, json_path)
    print(headline(figures))
    if run.problems:
        raise SystemExit(1)
    return figures


async def run_describe_flood(
    base: Settings, data_dir: Path, engine: Engine, *, flood: int, over_s: float, timeout_s: float
) -> FloodRun:
    """The flood against the bot on a loopback Discord; waits until every answer, card and result is in."""
    flooded = pictures(flood)
    single = pictures(1, side=112)[0]
    owner_of = {hashlib.sha256(data).hexdigest(): FLOODER for data in flooded}
    owner_of[hashlib.sha256(single).hexdigest()] = DESCRIBER
    log = GpuCallLog(engine, owner_of)
    run = FloodRun()
    async with running_fake_discord() as server:
        settings = bot_settings(base, data_dir, server)
        async with running_i2p2i(settings, server, log):
            run.started_at = time.time()

            async def push(member: str, at_s: float, command: str, options: dict[str, Any]) -> None:
                await asyncio.sleep(max(0.0, run.started_at + at_s - time.time()))
                sent_at = time.time()
                handle = await server.push_slash(command, options, user=member)
                run.sent.setdefault(member, []).append((sent_at, handle))

            def describe(data: bytes, name: str) -> dict[str, Any]:
                return {"image": server.add_attachment(data, name), "count": 1}

            step_s = over_s / max(1, flood - 1)
            await asyncio.gather(
                *(
                    push(FLOODER, k * step_s, "imagine-from", describe(data, f"flood-{k}.png"))
                    for k, data in enumerate(flooded)
                ),
                push(DESCRIBER, DESCRIBER_AT_S, "imagine-from", describe(single, "single.png")),
                push(IMAGINER, IMAGINER_AT_S, "imagine", {"prompt": "a lighthouse at dusk", "count": 1}),
            )
            await asyncio.gather(
                *(
                    _settle(server, handle, member, run, timeout_s)
                    for member, sent in run.sent.items()
                    for _, handle in sent
                )
            )
    run.gpu = list(log.started)
    return run


def pictures(count: int, side: int = 96) -> list[bytes]:
    """`count` different small PNG pictures (colour gradients), so none of them is a cached description."""
    grey = Image.radial_gradient("L").resize((side, side))
    made = []
    for k in range(count):
        dark, light = ((5 * k) % 256, 30, 90), (250, (41 * k) % 256, 140)
        made.append(png_bytes(ImageOps.colorize(grey, black=dark, white=light)))
    return made


async def _settle(
    server: FakeDiscord, handle: InteractionHandle, member: str, run: FloodRun, timeout_s: float
) -> None:
    """Wait for an interaction's first answer and, when deferred, its card or its job's result."""
    try:
        answer = await handle.wait_response(timeout_s=timeout_s)
        if answer.json["type"] != DEFERRED:
            return
        await handle.wait_followup(timeout_s=timeout_s)
        if member == IMAGINER:
            await server.wait_until(lambda: _result(handle), timeout_s=timeout_s)
    except (TimeoutError, AssertionError) as exc:
        run.problems.append(f"{member}'s interaction {handle.id} never finished: {exc}")


def _result(handle: InteractionHandle) -> RecordedCall | None:
    """The first post or edit of this interaction's messages that carried files: the job's result."""
    return next((call for call in handle.calls() if call.files and call.ok), None)


def summarise_flood(run: FloodRun) -> tuple[dict[str, float], dict[str, Any]]:
    """Each member's waits, and how many describes the GPU ran while the other two members waited."""
    members: dict[str, Any] = {}
    for member, sent in run.sent.items():
        waits, refused = [], 0
        for sent_at, handle in sent:
            callbacks = handle.callbacks()
            if not callbacks or callbacks[0].json["type"] != DEFERRED:
                refused += 1
                continue
            done = _result(handle) if member == IMAGINER else _first(handle.calls(FOLLOWUP))
            if done is not None:
                waits.append(done.at - sent_at)
        members[member] = {
            "sent": len(sent),
            "refused": refused,
            "served": len(waits),
            "first_wait_s": round(waits[0], 2) if waits else None,
            "median_wait_s": round(statistics.median(waits), 2) if waits else None,
            "max_wait_s": round(max(waits), 2) if waits else None,
        }
    ((imagine_at, _),) = run.sent[IMAGINER]
    ((describe_at, _),) = run.sent[DESCRIBER]
    batch_at = next((at for at, what in run.gpu if what == "generate"), float("inf"))
    card_at = next((at for at, what in run.gpu if what == f"describe {DESCRIBER}"), float("inf"))
    flooder = f"describe {FLOODER}"
    describes = [at for at, what in run.gpu if what.startswith("describe")]
    ahead_of_job = sum(1 for at in describes if imagine_at < at < batch_at)
    ahead_of_card = sum(1 for at, what in run.gpu if what == flooder and describe_at < at < card_at)
    payload: dict[str, Any] = {
        "members": members,
        "gpu_order": [what for _, what in run.gpu],
        "describes_ahead_of_job": ahead_of_job,
        "flood_describes_ahead_of_card": ahead_of_card,
    }
    figures = {
        "other_card_s": members[DESCRIBER]["first_wait_s"] or float("nan"),
        "job_result_s": members[IMAGINER]["first_wait_s"] or float("nan"),
        "describes_ahead_of_job": float(ahead_of_job),
        "describes_ahead_of_card": float(ahead_of_card),
    }
    return figures, payload


def _first(calls: list[RecordedCall]) -> RecordedCall | None:
    return next((call for call in calls if call.ok), None)


def print_flood(payload: dict[str, Any]) -> None:
    env, setup = payload["environment"], payload["settings"]
    cap = setup["max_describes_per_user"]
    print(
        f"describe flood: {FLOODER} sends {setup['flood']} /imagine-from within {setup['flood_over_s']:g} s, "
        f"{DESCRIBER} one at {setup['describer_at_s']:g} s, {IMAGINER} /imagine ×1 at "
        f"{setup['imaginer_at_s']:g} s; smoke models on {env['device_name']} [{env['device']}], "
        f"{setup['steps']} step(s) at {setup['size']}x{setup['size']}; "
        + ("no cap on describes" if cap is None else f"at most {cap} describes in flight per member")
    )
    print()
    rows = []
    for member, what in ((FLOODER, "describes"), (DESCRIBER, "describe"), (IMAGINER, "1-image job")):
        row = payload["members"][member]
        rows.append(
            (
                f"{member} ({what})",
                str(row["sent"]),
                str(row["refused"]),
                fmt(row["first_wait_s"]),
                fmt(row["median_wait_s"]),
                fmt(row["max_wait_s"]),
            )
        )
    print_table(("member", "sent", "refused", "first wait s", "median s", "max s"), rows)
    print()
    print(
        f"describes the GPU ran after {IMAGINER} asked and before its batch: "
        f"{payload['describes_ahead_of_job']}; "
        f"{FLOODER}'s describes it ran after {DESCRIBER} asked and before {DESCRIBER}'s: "
        f"{payload['flood_describes_ahead_of_card']}"
    )
    print()


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--scenario",
        choices=("crowd", "describe-flood"),
        default="crowd",
        help="crowd: members × ten interactions each; describe-flood: one member floods /imagine-from",
    )
    parser.add_argument("--members", type=count, default=100, help="members acting at once")
    parser.add_argument("--images", type=count, default=8, help="distinct source images among them")
    parser.add_argument("--max-count", type=count, default=2, help="most images per job")
    parser.add_argument("--steps", type=count, default=1, help="denoising steps per image")
    parser.add_argument("--size", type=count, default=64, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--seed", type=int, default=7, help="seeds the members' think times")
    parser.add_argument("--spread-s", type=float, default=1.0, help="members start within this many seconds")
    parser.add_argument("--flood", type=count, default=50, help="describe-flood: describes the flooder sends")
    parser.add_argument("--flood-over-s", type=float, default=2.0, help="describe-flood: sent within this")
    parser.add_argument(
        "--max-describes-per-user",
        type=count,
        help="describe-flood: the bot's cap on one member's describes in flight (default: the setting's)",
    )
    parser.add_argument("--timeout-s", type=float, default=300.0, help="give up on any one wait after this")
    parser.add_argument("--labels", help="label lists (default: the first lines of the packaged ones)")
    parser.add_argument("--device", default="cpu", help="cpu, auto, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="smoke models and label tables")
    parser.add_argument("--json-out", help="default: bench/results/load-<device>.json")
    return parser


if __name__ == "__main__":
    main()
