"""An engine for worker processes in tests and the scale benchmark: FakeEngine's images, a sleep per step.

Selected with I2P2I_TEST_ENGINE=tests.stub_engine:load. I2P2I_STUB_STEP_S sets the sleep per denoising
step; I2P2I_STUB_LOG names a file that gets one JSON line per batch the worker starts (its pid and seeds),
so a test can tell when a batch is on a worker and which one, and whether its process imported torch.
I2P2I_STUB_GUIDES lists the guides it offers (comma-separated); a guided batch reads each image's source
from the worker's own data folder, as the real engine does, and logs the sha256 of the bytes it read.
I2P2I_STUB_PRESETS lists the presets whose weights it has (unset: all of FakeEngine's). A
[[models.presets]] entry of its config gives the FakeEngine preset of that name its generator and family,
as the real engine's config does. It plans LoRAs against the files of its own models.lora_dir, as the real
engine does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from i2p2i_bot.batches import BatchResult, StepCallback
from i2p2i_bot.config import GenerateSettings, PresetSettings, Settings
from i2p2i_bot.guides import GUIDE_NAMES, GuideName
from i2p2i_bot.loras import LoraLibrary
from i2p2i_bot.presets import Presets, detect_family
from i2p2i_bot.request import GenerationParams, GenerationRequest, ImageSpec, plan
from i2p2i_bot.server_settings import ServerSettings
from i2p2i_bot.source_images import SourceImages
from tests.fake_engine import FakeEngine


class StubEngine(FakeEngine):
    settings = GenerateSettings(steps=2, max_steps=50, width=64, height=64, min_side=64, max_side=128)

    def __init__(
        self,
        step_s: float,
        log_path: str | None,
        guides: Sequence[GuideName] = (),
        sources_dir: Path | None = None,
        presets: Sequence[str] | None = None,
        lora_dir: str = "",
        configured: Sequence[PresetSettings] = (),
    ) -> None:
        super().__init__()
        self.configured = {entry.name: entry for entry in configured}
        self.step_s = step_s
        self.log_path = log_path
        self.offered = tuple(guides)
        self.sources = SourceImages(sources_dir)
        self.have_presets = self.presets.names if presets is None else tuple(presets)
        self.loras = LoraLibrary(lora_dir)

    @property
    def presets(self) -> Presets:
        """FakeEngine's presets, with the generator and family its config gives any of them."""
        found = super().presets
        by_name = dict(found.by_name)
        for name, entry in self.configured.items():
            if name in by_name:
                family = entry.family or detect_family(entry.generator)
                by_name[name] = dataclasses.replace(by_name[name], generator=entry.generator, family=family)
        return Presets(by_name, found.default)

    def available_presets(self) -> tuple[str, ...]:
        return self.have_presets

    def plan(self, request: GenerationRequest, server: ServerSettings | None = None) -> GenerationRequest:
        preset = self.presets.get(request.preset)
        settings = self.presets.settings_for(preset.name, server, self.settings)
        generator = self.models_for(preset.name)["generator"]
        offered = self.guides_for(preset.name)
        return plan(request, settings, generator, offered, self.loras, preset=preset.name)

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: StepCallback | None = None
    ) -> BatchResult:
        read = []
        for spec in specs:
            if spec.guide_source is not None:
                self.sources.open(spec.guide_source)  # as the real engine does: GenerationError if gone
                path = self.sources.path(spec.guide_source)
                assert path is not None
                read.append(hashlib.sha256(path.read_bytes()).hexdigest())
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as log:
                line = {
                    "pid": os.getpid(),
                    "seeds": [s.seed for s in specs],
                    "torch": "torch" in sys.modules,
                    "guides": [g.name for g in params.keep],
                    "preset": params.preset,
                    "loras": [lora.name for lora in params.loras],
                    "sources": read,
                }
                log.write(json.dumps(line) + "\n")

        def slow_step(step: int, total: int) -> None:
            time.sleep(self.step_s)
            if on_step is not None:
                on_step(step, total)

        return super().generate_batch(params, specs, slow_step)


def load(settings: Settings) -> StubEngine:
    offered = os.environ.get("I2P2I_STUB_GUIDES", "").split(",")
    presets = os.environ.get("I2P2I_STUB_PRESETS")
    return StubEngine(
        float(os.environ.get("I2P2I_STUB_STEP_S", "0.05")),
        os.environ.get("I2P2I_STUB_LOG"),
        [name for name in GUIDE_NAMES if name in offered],
        settings.sources_path,
        None if presets is None else [name for name in presets.split(",") if name],
        settings.models.lora_dir,
        settings.models.presets,
    )
