"""The engine: interrogator and generator loaded together, sharing one device and one CLIP."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from i2p2i_bot.batches import BatchResult, StepCallback
from i2p2i_bot.config import Settings
from i2p2i_bot.generate import Generator
from i2p2i_bot.gpu import cuda_context_lost, out_of_memory_as, resolve_device, resolve_dtype
from i2p2i_bot.guided import load_guide_models
from i2p2i_bot.guides import GuideName
from i2p2i_bot.interrogate import ClipEncoder, Interrogator
from i2p2i_bot.interrogation import Interrogation
from i2p2i_bot.loras import LoraLibrary
from i2p2i_bot.models import ModelSources, check_downloaded, quick_gelu_name, resolve_models
from i2p2i_bot.request import GenerationParams, GenerationRequest, ImageSpec
from i2p2i_bot.server_settings import ServerSettings
from i2p2i_bot.source_images import SourceImages

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """Every model the product uses, resident (an ImageEngine); only `plan` may run off the GPU thread."""

    settings: Settings
    sources: ModelSources
    interrogator: Interrogator
    generator: Generator
    load_s: float
    warm_up_s: float | None = None

    @classmethod
    def load(cls, settings: Settings, *, progress: bool = False) -> Engine:
        started = time.perf_counter()
        sources = resolve_models(settings)
        check_downloaded(sources, safety_checker=settings.generate.safety_checker)
        device = resolve_device(settings.models.device)
        dtype = resolve_dtype(settings.models.precision, device)
        log.info("loading models on %s in %s: %s", device, dtype, sources.as_dict())
        interrogator = _interrogator(settings, sources, device, dtype, progress)
        guides = load_guide_models(settings.guides, sources, device, dtype)
        generator = Generator.load(
            sources.generator,
            settings.generate,
            device,
            embed_images=interrogator.embed_images,
            embed_pixels=interrogator.embed_pixels,
            dtype=dtype,
            name=sources.recorded()["generator"],
            guides=guides,
            source_images=SourceImages(settings.sources_path),
            loras=LoraLibrary(settings.models.lora_dir, max_per_prompt=settings.models.max_loras),
        )
        load_s = time.perf_counter() - started
        log.info("models loaded in %.1f s", load_s)
        engine = cls(settings, sources, interrogator, generator, load_s)
        warm_up = settings.models.warm_up
        if warm_up == "on" or (warm_up == "auto" and device.type == "cuda"):
            try:
                engine.warm_up()
            except Exception as exc:
                if cuda_context_lost(exc):
                    raise
                # Whatever broke here breaks a member's request too, and is reported there.
                log.warning("the warm-up failed; the first request pays for it", exc_info=True)
        return engine

    def warm_up(self) -> float:
        """Interrogate a blank picture in the default mode and make one image from it, timed by nobody.

        On CUDA the first call of each model pays for lazy kernel loading, cuBLAS and cuDNN set-up and the
        caption decoder's graph capture; this moves that cost from the first member's request to start-up.
        """
        started = time.perf_counter()
        blank = Image.new("RGB", (512, 512), (128, 128, 128))
        described = self.interrogator.interrogate(blank, self.settings.interrogate.mode)
        self.generator.warm_up(described.image_embedding)
        self.warm_up_s = time.perf_counter() - started
        log.info("models warmed up in %.1f s", self.warm_up_s)
        return self.warm_up_s

    @property
    def models(self) -> dict[str, str]:
        """Model names as they should be recorded next to results."""
        return {"generator": self.generator.model, **self.interrogator.models}

    @property
    def offered_guides(self) -> tuple[GuideName, ...]:
        return self.generator.offered_guides

    def plan(self, request: GenerationRequest, server: ServerSettings | None = None) -> GenerationRequest:
        return self.generator.plan(request, server)

    def interrogate(self, image: Image.Image, mode: str, key: str | None = None) -> Interrogation:
        return out_of_memory_as(
            "The GPU ran out of memory while describing this image; try again in a moment.",
            lambda: self.interrogator.interrogate(image, mode, key=key),
        )

    def generate(
        self,
        request: GenerationRequest,
        *,
        source_embedding: tuple[float, ...] | None = None,
        on_step: StepCallback | None = None,
    ) -> BatchResult:
        return self.generator.generate(
            request,
            source_embedding=source_embedding,
            on_step=on_step,
            batch_size=self.settings.queue.max_batch_images,
        )

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: StepCallback | None = None
    ) -> BatchResult:
        return self.generator.generate_batch(params, specs, on_step=on_step)


def load_interrogator(settings: Settings, *, progress: bool = False) -> Interrogator:
    """The interrogator alone, for work that makes no images: no Stable Diffusion in memory."""
    sources = resolve_models(settings)
    check_downloaded(sources, generator=False)
    device = resolve_device(settings.models.device)
    log.info(
        "loading the interrogation models on %s: clip %s, caption %s", device, sources.clip, sources.caption
    )
    return _interrogator(
        settings, sources, device, resolve_dtype(settings.models.precision, device), progress
    )


def _interrogator(
    settings: Settings, sources: ModelSources, device: torch.device, dtype: torch.dtype, progress: bool
) -> Interrogator:
    interrogator = Interrogator.load(
        sources.clip,
        sources.caption,
        settings.interrogate,
        device,
        settings.cache_path,
        dtype=dtype,
        progress=progress,
    )
    recorded = {k: v for k, v in sources.recorded().items() if k != "generator"}
    recorded["clip"] = _recorded_clip(sources, interrogator.clip)
    interrogator.models = recorded
    return interrogator


def load_clip(settings: Settings) -> tuple[ClipEncoder, str]:
    """The interrogation CLIP alone, loaded as the engine loads it, and its name as results record it:
    for scoring images made earlier (bench/fidelity.py)."""
    sources = resolve_models(settings)
    device = resolve_device(settings.models.device)
    clip = ClipEncoder.load(sources.clip, device, resolve_dtype(settings.models.precision, device))
    return clip, _recorded_clip(sources, clip)


def _recorded_clip(sources: ModelSources, clip: ClipEncoder) -> str:
    name = sources.recorded()["clip"]
    return quick_gelu_name(name) if clip.quick_gelu else name
