"""How the benchmarks measure and report: synchronised timed runs, peak memory, tables, JSON, headline.

Every figure is the median of several timed runs after untimed warm-up runs; on CUDA the device is
synchronised around each run and peak memory is `torch.cuda.max_memory_allocated` over the timed runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "diffusers", "transformers", "open-clip-torch", "clip-interrogator")


@dataclass(frozen=True)
class Measurement:
    """Seconds of each timed run, and the peak device memory they reached (None off CUDA)."""

    runs_s: tuple[float, ...]
    peak_bytes: int | None

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def peak_gib(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 2**30


def count(text: str) -> int:
    """An argparse type for counts of runs, users, images: whole numbers from 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more (got {value})")
    return value


def count_or_zero(text: str) -> int:
    """An argparse type for warm-up runs: whole numbers from 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], T], device: torch.device, *, warmup: int, reps: int) -> tuple[Measurement, T]:
    """Run fn `warmup` times untimed, then `reps` times timed; return the timings and the last result."""
    if reps < 1:
        raise ValueError("at least one timed run is needed")
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    runs: list[float] = []
    for _ in range(reps):
        synchronize(device)
        started = time.perf_counter()
        result = fn()
        synchronize(device)
        runs.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Measurement(tuple(runs), peak), result


def device_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """How many times fn made the host wait for the device, by torch's sync debug mode; None off CUDA."""
    if device.type != "cuda":
        return None
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("called a synchronizing" in str(w.message) for w in caught)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Give cached device memory back, so the next model's peak is its own."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, load_at_start: tuple[float, float, float]) -> dict[str, Any]:
    """What a figure needs next to it to be reproduced: when, where and with which libraries.

    The host's load average when the run started tells whether other work shared the CPU.
    """
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in load_at_start],
        "python": platform.python_version(),
        "versions": versions,
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["device_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return env


def default_json_path(script: str, device: torch.device, models_kind: str) -> Path:
    """bench/results/<script>-<device>.json, with a suffix for the random-weights models."""
    slug = "cpu"
    if device.type != "cpu":
        slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    suffix = "" if models_kind == "smoke" else f"-{models_kind}"
    return RESULTS_DIR / f"{script}-{slug}{suffix}.json"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")


def fmt(value: float | None, digits: int = 2) -> str:
    """A figure for the table; None (not measured on this device) prints as n/a."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True)]
        parts = [f"{cells[0]:<{widths[0]}}", *rest]
        return "  ".join(parts).rstrip()

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def headline(figures: dict[str, float]) -> str:
    """The last line a benchmark prints: its headline figures as key=value pairs."""
    return " ".join(f"{key}={_short(value)}" for key, value in figures.items())


def _short(value: float) -> str:
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"
