"""A zero-cost stand-in for the Stable Diffusion service: tiny solid images whose colour encodes the seed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from PIL import Image

from i2p2i_bot.batches import BatchResult, GeneratedImage, StepCallback
from i2p2i_bot.config import BUILTIN_PRESET, GenerateSettings
from i2p2i_bot.guides import GuideName, fitting
from i2p2i_bot.interrogation import Candidate, Interrogation
from i2p2i_bot.presets import Preset, Presets
from i2p2i_bot.request import GenerationParams, GenerationRequest, ImageSpec, plan
from i2p2i_bot.server_settings import ServerSettings


def seed_colour(seed: int) -> tuple[int, int, int]:
    return (seed & 0xFF, (seed >> 8) & 0xFF, (seed >> 16) & 0xFF)


class FakeEngine:
    """Records every batch it is given; can fail, block on a gate, or call a hook when a batch starts.

    An ImageEngine: it plans with the product's own plan() and describes every image the same way.
    """

    settings = GenerateSettings(steps=2, width=64, height=64, min_side=64, max_side=128)
    # The guides it offers (those that fit a preset's family); its images keep nothing of a source, so
    # none by default.
    offered: tuple[GuideName, ...] = ()

    @property
    def presets(self) -> Presets:
        """Two presets with its settings, whose batches must never mix: the built-in one and "other"."""
        return Presets(
            {
                name: Preset(name, f"fake-{name}", "sd1", f"fake-clip-{name}", self.settings)
                for name in (BUILTIN_PRESET, "other")
            }
        )

    @property
    def models(self) -> dict[str, str]:
        return self.models_for(None)

    def available_presets(self) -> tuple[str, ...]:
        return self.presets.names

    def models_for(self, preset: str | None) -> dict[str, str]:
        chosen = self.presets.get(preset)
        # The built-in preset keeps the names recorded before presets.
        if chosen.name == BUILTIN_PRESET:
            return {"generator": "fake", "clip": "fake", "caption": "fake"}
        return {"generator": chosen.generator, "clip": chosen.clip, "caption": "fake"}

    def guides_for(self, preset: str | None) -> tuple[GuideName, ...]:
        found = self.presets.by_name.get(self.presets.default if preset is None else preset)
        return fitting(self.offered, found.family) if found is not None else ()

    def plan(self, request: GenerationRequest, server: ServerSettings | None = None) -> GenerationRequest:
        preset = self.presets.get(request.preset)
        settings = self.presets.settings_for(preset.name, server, self.settings)
        generator = self.models_for(preset.name)["generator"]
        return plan(request, settings, generator, self.guides_for(preset.name), preset=preset.name)

    def interrogate(
        self, image: Image.Image, mode: str, key: str | None = None, preset: str | None = None
    ) -> Interrogation:
        prompt = f"a {image.width}x{image.height} picture"
        return Interrogation(
            mode=mode,
            prompt=prompt,
            score=0.25,
            caption=prompt,
            negative=None,
            candidates=(Candidate(mode, prompt, 0.25),),
            image_embedding=(1.0, 0.0),
            models={k: v for k, v in self.models_for(preset).items() if k != "generator"},
        )

    def __init__(
        self,
        *,
        side: int = 8,
        fail: Callable[[GenerationParams, Sequence[ImageSpec]], Exception | None] | None = None,
        on_batch: Callable[[int, GenerationParams, Sequence[ImageSpec]], None] | None = None,
    ) -> None:
        self.side = side
        self.fail = fail
        self.on_batch = on_batch
        self.batches: list[tuple[GenerationParams, tuple[ImageSpec, ...]]] = []
        self.step_threads: set[threading.Thread] = set()
        # While cleared, a batch waits here after it started (tests release it); set by default.
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: StepCallback | None = None
    ) -> BatchResult:
        self.batches.append((params, tuple(specs)))
        if self.on_batch is not None:
            self.on_batch(len(self.batches), params, specs)
        self.entered.set()
        self.gate.wait()
        for step in range(1, params.steps + 1):
            if on_step is not None:
                self.step_threads.add(threading.current_thread())
                on_step(step, params.steps)
        if self.fail is not None:
            error = self.fail(params, specs)
            if error is not None:
                raise error
        images = tuple(
            GeneratedImage(
                spec,
                Image.new("RGB", (self.side, self.side), seed_colour(spec.seed)),
                nsfw=False,
                fidelity=0.5 if spec.source_embedding is not None else None,
            )
            for spec in specs
        )
        return BatchResult(images, {"total": 0.0})

    def owners_by_batch(self, owner_of_prompt: Callable[[str], str]) -> list[list[str]]:
        """For each recorded batch, who each image was for, read from its prompt."""
        return [[owner_of_prompt(spec.prompt) for spec in specs] for _, specs in self.batches]


class OneModelEngine(FakeEngine):
    """Holds one model preset on its GPU at a time, as a GPU with room for one generator does."""

    def __init__(self) -> None:
        super().__init__()
        self._resident: tuple[str, ...] = (BUILTIN_PRESET,)

    @property
    def resident_presets(self) -> tuple[str, ...]:
        return self._resident

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: StepCallback | None = None
    ) -> BatchResult:
        self._resident = (params.preset,)
        return super().generate_batch(params, specs, on_step)
