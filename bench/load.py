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

The fake Discord and the scenario belong to the test suite, so this script puts the repository root on the
import path; it imports its sibling measure.py from bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from measure import count, default_json_path, environment, headline, print_table, write_json

from i2p2i_bot import progress_bars
from i2p2i_bot.config import GenerateSettings, InterrogateSettings, ModelSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.gpu import resolve_device
from i2p2i_bot.interrogate import LABEL_FILES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.bot_harness import LoadAudit, LoadRun, percentile, run_crowd

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


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--members", type=count, default=100, help="members acting at once")
    parser.add_argument("--images", type=count, default=8, help="distinct source images among them")
    parser.add_argument("--max-count", type=count, default=2, help="most images per job")
    parser.add_argument("--steps", type=count, default=1, help="denoising steps per image")
    parser.add_argument("--size", type=count, default=64, help="image side in pixels (a multiple of 8)")
    parser.add_argument("--seed", type=int, default=7, help="seeds the members' think times")
    parser.add_argument("--spread-s", type=float, default=1.0, help="members start within this many seconds")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="give up on any one wait after this")
    parser.add_argument("--labels", help="label lists (default: the first lines of the packaged ones)")
    parser.add_argument("--device", default="cpu", help="cpu, auto, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="smoke models and label tables")
    parser.add_argument("--json-out", help="default: bench/results/load-<device>.json")
    return parser


if __name__ == "__main__":
    main()
