"""Two model presets alternating on one GPU: what a swap costs, and images/s against one preset alone.

The engine as the bot runs it (Engine.load on the smoke presets, one generator on the device), each batch
made through Engine.generate_batch on the GPU thread. Three runs of the same batches: preset A alone; A and
B alternating with the generator swapped out kept in CPU RAM (models.max_offloaded = 1); the same with it
unloaded (models.max_offloaded = 0), so each swap loads from disk. A swap is timed on its own (bringing
the next preset's generator onto the device) before the batch that needs it.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from load import short_labels
from measure import environment, fmt, headline, print_table, synchronize, write_json

from i2p2i_bot.config import GenerateSettings, InterrogateSettings, ModelSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.gpu import GpuWorker
from i2p2i_bot.presets import UnknownPreset
from i2p2i_bot.request import GenerationParams, GenerationRequest, ImageSpec

T = TypeVar("T")


@dataclass(frozen=True)
class SwapRun:
    """One way of making the same batches, with its images/s and the median time of its swaps."""

    label: str
    images: int
    seconds: float
    swaps_s: tuple[float, ...]

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def swap_s(self) -> float | None:
        return sorted(self.swaps_s)[len(self.swaps_s) // 2] if self.swaps_s else None


def parse_presets(text: str) -> tuple[str, str]:
    """--presets A,B: two different preset names."""
    names = tuple(name.strip() for name in text.split(","))
    if len(names) != 2 or not all(names) or names[0] == names[1]:
        raise SystemExit(f"--presets takes two different preset names, as in sd-v1-4,sd2 (got {text!r})")
    return names[0], names[1]


def presets_main(
    presets: tuple[str, str],
    *,
    cache_dir: Path,
    labels: Path | None,
    device: torch.device,
    size: int,
    steps: int,
    batch: int,
    rounds: int,
    json_out: Path,
    load_at_start: tuple[float, float, float],
) -> dict[str, float]:
    """Run the three rows, print the table and headline, write the JSON; return the headline figures."""
    with tempfile.TemporaryDirectory(prefix="i2p2i-bench-presets-") as folder:
        settings = Settings(
            data_dir=str(Path(folder) / "data"),
            models=ModelSettings(
                preset="smoke", cache_dir=str(cache_dir), device=str(device), max_resident=1
            ),
            interrogate=InterrogateSettings(
                labels_dir=str(labels or short_labels(Path(folder) / "labels")), min_flavors=2, max_flavors=6
            ),
            generate=GenerateSettings(
                steps=steps, width=size, height=size, min_side=64, max_side=max(size, 128)
            ),
        )
        first, second = presets
        gpu = GpuWorker()
        try:
            engine = _on(gpu, Engine.load, settings)
            try:
                params = {name: _params(engine, name, size, steps) for name in presets}
            except UnknownPreset as exc:
                raise SystemExit(f"--presets: {exc}") from exc
            specs = [ImageSpec(f"a lighthouse, image {i}", "", 1000 + i) for i in range(batch)]
            for name in presets:  # each pipeline's first call pays for lazy set-up, not a swap
                _on(gpu, engine.generate_batch, params[name], specs)
            runs = []
            for label, order, offloaded in (
                (f"{first} alone", [first] * (2 * rounds), 1),
                (f"{first},{second} kept in RAM", [first, second] * rounds, 1),
                (f"{first},{second} unloaded", [first, second] * rounds, 0),
            ):
                models = dataclasses.replace(settings.models, max_offloaded=offloaded)
                variant = engine.sharing(settings=dataclasses.replace(settings, models=models))
                runs.append(_on(gpu, _run, variant, label, order, params, specs, device))
        finally:
            gpu.close()
    single = runs[0].images_per_s
    figures = {"single_images_per_s": single}
    for key, run in zip(("ram", "unloaded"), runs[1:], strict=True):
        figures[f"alternating_{key}_images_per_s"] = run.images_per_s
        figures[f"alternating_{key}_ratio"] = run.images_per_s / single
        if run.swap_s is not None:
            figures[f"swap_{key}_s"] = run.swap_s
    payload: dict[str, Any] = {
        "benchmark": "generate-presets",
        "environment": environment(device, load_at_start),
        "settings": {
            "presets": list(presets),
            "size": size,
            "steps": steps,
            "batch": batch,
            "rounds": rounds,
        },
        "rows": [
            {
                "run": run.label,
                "images": run.images,
                "seconds": run.seconds,
                "images_per_s": run.images_per_s,
                "ratio_to_single": run.images_per_s / single,
                "swaps": len(run.swaps_s),
                "swap_s": run.swap_s,
            }
            for run in runs
        ],
        "headline": figures,
    }
    write_json(json_out, payload)
    env = payload["environment"]
    print(f"presets {first} and {second} alternating, smoke models on {env['device_name']} [{env['device']}]")
    print(f"{size}x{size}, {steps} steps, batch {batch}, {2 * rounds} batches a run; max_resident 1")
    print()
    print_table(
        ["run", "images", "images/s", "x alone", "swaps", "s/swap"],
        [
            [
                r["run"],
                str(r["images"]),
                fmt(r["images_per_s"], 2),
                fmt(r["ratio_to_single"], 2),
                str(r["swaps"]),
                fmt(r["swap_s"], 3),
            ]
            for r in payload["rows"]
        ],
    )
    print()
    print(f"JSON: {json_out}")
    print(headline(figures))
    return figures


def _params(engine: Engine, preset: str, size: int, steps: int) -> GenerationParams:
    request = GenerationRequest("x", preset=preset, width=size, height=size, steps=steps)
    return engine.plan(request).params


def _run(
    engine: Engine,
    label: str,
    order: list[str],
    params: dict[str, GenerationParams],
    specs: list[ImageSpec],
    device: torch.device,
) -> SwapRun:
    """The batches in `order` on the GPU thread; each swap timed on its own, and inside the total."""
    engine.generator_for(order[0])  # the run starts with its first preset on the device
    swaps = []
    started = time.perf_counter()
    for name in order:
        if name not in engine.resident_presets:
            swap_started = time.perf_counter()
            engine.generator_for(name)
            synchronize(device)
            swaps.append(time.perf_counter() - swap_started)
        engine.generate_batch(params[name], specs)
    synchronize(device)
    return SwapRun(label, len(order) * len(specs), time.perf_counter() - started, tuple(swaps))


def _on(gpu: GpuWorker, fn: Callable[..., T], *args: Any) -> T:
    return gpu.submit(fn, *args).result()
