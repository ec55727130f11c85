"""The engine: interrogator and generator loaded together, sharing one device and one CLIP; or, where GPU
workers on other machines make every image, the interrogators alone."""

from __future__ import annotations

import collections
import copy
import gc
import logging
import time
from collections.abc import Sequence

import torch
from PIL import Image

from i2p2i_bot.batches import BatchResult, StepCallback
from i2p2i_bot.config import Settings
from i2p2i_bot.generate import Generator
from i2p2i_bot.gpu import (
    cuda_context_lost,
    out_of_memory_as,
    resolve_device,
    resolve_dtype,
    resolve_max_resident,
)
from i2p2i_bot.guided import GuideModels, load_guide_models
from i2p2i_bot.guides import GUIDE_NAMES, GuideName, fitting
from i2p2i_bot.interrogate import Captioner, ClipEncoder, Interrogator
from i2p2i_bot.interrogation import Interrogation
from i2p2i_bot.loras import LoraLibrary
from i2p2i_bot.models import (
    ModelSources,
    ModelUnavailable,
    check_downloaded,
    check_preset,
    clip_files,
    guide_weights_here,
    preset_sources,
    quick_gelu_name,
    resolve_models,
    resolve_presets,
)
from i2p2i_bot.presets import Preset, Presets, UnknownPreset
from i2p2i_bot.request import GenerationError, GenerationParams, GenerationRequest, ImageSpec, plan
from i2p2i_bot.server_settings import ServerSettings
from i2p2i_bot.source_images import SourceImages

log = logging.getLogger(__name__)


class Engine:
    """Every model the product uses (an ImageEngine): an interrogator per CLIP, sharing one caption model,
    and a generator per model preset, loaded on first use. Past models.max_resident the least recently used
    generator moves to CPU RAM (up to models.max_offloaded of them there, the oldest unloaded past that), from
    where it comes back much faster than from disk. Only `plan`, `models_for` and `resident_presets` may
    run off the GPU thread.

    With generates=False it only describes (the bot of `queue.backend = "redis"`, whose images GPU workers
    make): no generator and no guide weights are loaded, and what a request may ask for is checked against
    the configuration (every preset, the guides enabled in [guides]); each worker checks it again against
    what it has loaded, and a job no live worker can make waits for one."""

    def __init__(
        self,
        settings: Settings,
        presets: Presets,
        device: torch.device,
        dtype: torch.dtype,
        guides: GuideModels,
        *,
        progress: bool = False,
        generates: bool = True,
    ) -> None:
        self.settings = settings
        self.generates = generates
        self.presets = presets
        self.sources = preset_sources(settings, presets.get(None))
        self.device = device
        self.dtype = dtype
        self.guides = guides
        # Whether the guides' own weights (edges, depth, look: SD 1.x's) were loaded, or looked for and found
        # missing: with the first generator they fit, whichever preset loads first.
        self._guide_weights_loaded = False
        # Until then, the guides whose weights are on this machine (looked up once).
        self._guide_weights_here: tuple[GuideName, ...] | None = None
        self.source_images = SourceImages(settings.sources_path)
        # The LoRAs prompts may name, as each family of generator reads them (a LoRA fits one family).
        self._loras: dict[str, LoraLibrary] = {}
        self.progress = progress
        self.load_s = 0.0
        self.warm_up_s: float | None = None
        # The preset loaded first and warmed up (None: the default one).
        self.first: str | None = None
        self._interrogators: dict[str, Interrogator] = {}
        # On the device, the most recently used last; then those moved to CPU RAM, the same way.
        self._generators: collections.OrderedDict[str, Generator] = collections.OrderedDict()
        self._offloaded: collections.OrderedDict[str, Generator] = collections.OrderedDict()
        self._resident: tuple[str, ...] = ()
        self.max_resident = resolve_max_resident(settings.models.max_resident, device)
        # Why each preset looked up so far cannot be loaded (None: it can).
        self._missing: dict[str, str | None] = {}

    @classmethod
    def load(
        cls,
        settings: Settings,
        *,
        progress: bool = False,
        preset: str | None = None,
        generate: bool = True,
    ) -> Engine:
        """Load the interrogation models and the generator of `preset` (None: the default one), for
        which the warm-up runs too; other presets load on first use. generate=False loads the
        interrogation models alone, for a bot whose images GPU workers make."""
        started = time.perf_counter()
        presets = resolve_presets(settings)
        first = presets.get(preset)  # an unknown preset costs no model load
        sources = preset_sources(settings, first)
        if not generate or first.single_file:
            check_downloaded(sources, generator=False)
        else:
            check_downloaded(sources, safety_checker=first.safety_checker)
        if generate and first.single_file:
            check_preset(first, safety_checker=first.generate.safety_checker)
        device = resolve_device(settings.models.device)
        dtype = resolve_dtype(settings.models.precision, device)
        if generate:
            log.info("loading models on %s in %s: %s", device, dtype, sources.as_dict())
            # Layout needs no weights of its own; the others load with the first generator they fit.
            guides = GuideModels(layout="layout" in settings.guides.enabled)
        else:
            log.info(
                "loading the interrogation models on %s in %s (GPU workers make the images): clip %s, "
                "caption %s",
                device,
                dtype,
                sources.clip,
                sources.caption,
            )
            guides = GuideModels()
        engine = cls(settings, presets, device, dtype, guides, progress=progress, generates=generate)
        engine.interrogator_for(preset)
        engine.first = preset
        if generate:
            engine.generator_for(preset)
        notice = presets.safety_notice()
        if notice:
            log.warning(notice)
        engine.load_s = time.perf_counter() - started
        log.info("models loaded in %.1f s", engine.load_s)
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

    def sharing(self, *, settings: Settings | None = None, generator: Generator | None = None) -> Engine:
        """An engine sharing these loaded models, with other settings or another generator (and its
        guides and LoRAs) for the preset loaded first (for tests and benchmarks that vary one thing)."""
        other = copy.copy(self)
        if settings is not None:
            other.settings = settings
            other.presets = resolve_presets(settings)
            other._loras = {}
            other._missing = {}  # its presets are looked up anew: they may name other files
        other._interrogators = dict(self._interrogators)
        other._generators = collections.OrderedDict(self._generators)
        other._offloaded = collections.OrderedDict(self._offloaded)
        other.max_resident = resolve_max_resident(other.settings.models.max_resident, self.device)
        if generator is not None:
            other._generators[self.presets.get(self.first).name] = generator
            other._resident = tuple(other._generators)
            other.guides = generator.guided.models
            other._guide_weights_loaded = True
            other._loras = {**other._loras, generator.lora_library.family: generator.lora_library}
        return other

    @property
    def interrogator(self) -> Interrogator:
        """The default preset's interrogator."""
        return self.interrogator_for(None)

    @property
    def generator(self) -> Generator:
        """The default preset's generator (loaded again if another preset took its place)."""
        return self.generator_for(None)

    def interrogator_for(self, preset: str | None) -> Interrogator:
        """The interrogator with a preset's CLIP, loaded on first use; GPU thread only."""
        chosen = self.presets.get(preset)
        found = self._interrogators.get(chosen.clip)
        if found is None:
            sources = preset_sources(self.settings, chosen)
            shared = next(iter(self._interrogators.values()), None)
            if shared is None:
                check_downloaded(sources, generator=False)
            else:
                clip_files(sources.clip)  # says what to download before anything is loaded
            found = _interrogator(
                self.settings,
                sources,
                self.device,
                self.dtype,
                self.progress,
                captioner=None if shared is None else shared.captioner,
            )
            self._interrogators[chosen.clip] = found
        return found

    def generator_for(self, preset: str | None) -> Generator:
        """A preset's generator, loaded on first use or brought back from CPU RAM; the least recently used
        one makes room. GPU thread."""
        if not self.generates:
            # The runner of queue.backend = "redis" sends every batch to the workers: reaching here is a bug.
            raise RuntimeError("this engine only describes images: GPU workers make them")
        chosen = self.presets.get(preset)
        found = self._generators.get(chosen.name)
        if found is not None:
            self._generators.move_to_end(chosen.name)
            self._resident = tuple(self._generators)
            return found
        offloaded = self._offloaded.pop(chosen.name, None)
        if offloaded is None:
            check_preset(chosen, safety_checker=chosen.generate.safety_checker)
        self._make_room(chosen.name)
        if offloaded is not None:
            started = time.perf_counter()
            offloaded.move_to(self.device)
            log.info(
                "brought preset %s back from CPU RAM in %.1f s", chosen.name, time.perf_counter() - started
            )
            found = offloaded
        else:
            found = self._load_generator(chosen)
        self._generators[chosen.name] = found
        self._resident = tuple(self._generators)
        return found

    def _make_room(self, loading: str) -> None:
        """Move the least recently used generators off the device until one more fits: to CPU RAM while
        models.max_offloaded allows (a compiled one is unloaded: its captured graphs hold device memory),
        the oldest there unloaded."""
        keep = self.settings.models.max_offloaded
        unloaded = False
        while len(self._generators) >= self.max_resident:
            name, generator = self._generators.popitem(last=False)
            if keep and generator.buckets is None:
                log.info("moving the generator of preset %s to CPU RAM to load %s", name, loading)
                generator.move_to(torch.device("cpu"))
                self._offloaded[name] = generator
            else:
                log.info("unloading the generator of preset %s to load %s", name, loading)
                unloaded = True
        while len(self._offloaded) > keep:
            name, _ = self._offloaded.popitem(last=False)
            log.info("unloading the generator of preset %s from CPU RAM", name)
            unloaded = True
        self._resident = tuple(self._generators)
        if unloaded:  # a full collection costs a good part of a second: only when weights were let go
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _load_generator(self, chosen: Preset) -> Generator:
        started = time.perf_counter()
        self._load_guide_weights(chosen)
        generator = Generator.load(
            chosen.generator,
            chosen.generate,
            self.device,
            embed_images=lambda images: self.interrogator_for(chosen.name).embed_images(images),
            embed_pixels=lambda pixels: self.interrogator_for(chosen.name).embed_pixels(pixels),
            dtype=self.dtype,
            name=chosen.recorded_generator,
            guides=self.guides,
            source_images=self.source_images,
            loras=self.loras_for(chosen.family),
            family=chosen.family,
            config=chosen.config,
            preset=chosen.name,
        )
        log.info(
            "loaded preset %s (%s, %s) in %.1f s",
            chosen.name,
            chosen.family,
            chosen.generator,
            time.perf_counter() - started,
        )
        return generator

    def _load_guide_weights(self, chosen: Preset) -> None:
        """Load the enabled guides' weights with the first generator they fit (SD 1.x), so a bot whose
        default preset is SD 2.x or SDXL offers them on its SD 1.x cards too; once, whether or not they
        are all here."""
        if self._guide_weights_loaded:
            return
        sources = preset_sources(self.settings, chosen)
        if sources.edges is None and sources.depth is None and sources.look is None:
            return  # none enabled, or none fits this preset's family
        self.guides = load_guide_models(self.settings.guides, sources, self.device, self.dtype)
        self._guide_weights_loaded = True

    def loras_for(self, family: str) -> LoraLibrary:
        """The LoRA library as generators of `family` read it: a LoRA made for another is refused."""
        found = self._loras.get(family)
        if found is None:
            models = self.settings.models
            made = LoraLibrary(models.lora_dir, max_per_prompt=models.max_loras, family=family)
            # Planning threads and the GPU thread may both get here first: one library wins, so the LoRAs
            # the GPU side refuses are the ones planning refuses.
            found = self._loras.setdefault(family, made)
        return found

    def available_presets(self) -> tuple[str, ...]:
        """The presets whose weights are here, looking again for those that were missing: a worker asks
        between batches, so a preset downloaded meanwhile counts without a restart."""
        return tuple(preset.name for preset in self.presets if self._present(preset, again=True))

    def _present(self, preset: Preset, *, again: bool = False) -> bool:
        """Whether a preset's weights are on this machine (looked up once per preset, or again when
        `again` and it was missing); every preset for an engine that only describes: the workers have them."""
        if not self.generates:
            return True
        if preset.name in self._generators or preset.name in self._offloaded:
            return True
        looked_up = preset.name in self._missing
        if looked_up and (self._missing[preset.name] is None or not again):
            return self._missing[preset.name] is None
        try:
            check_preset(preset, safety_checker=preset.generate.safety_checker)
            missing = None
        except ModelUnavailable as exc:
            missing = str(exc)
        if missing is not None and (not looked_up or missing != self._missing[preset.name]):
            log.warning("preset %s cannot be loaded: %s", preset.name, missing)  # once, not at every look
        elif missing is None and looked_up:
            log.info("preset %s is on this machine now", preset.name)
        self._missing[preset.name] = missing
        return missing is None

    def _check_present(self, preset: Preset) -> None:
        """Refuse a preset whose weights are not on this machine, before a job waits for it."""
        if not self._present(preset):
            raise GenerationError(
                f"The model preset “{preset.name}” is not on this machine yet; an admin can run "
                "`i2p2i download-models`."
            )

    @property
    def resident_presets(self) -> tuple[str, ...]:
        """The presets whose generators are on the device, the most recently used last (a snapshot the
        GPU thread takes, so any thread may read it)."""
        return self._resident

    @property
    def offloaded_presets(self) -> tuple[str, ...]:
        """The presets whose generators wait in CPU RAM, the most recently used last; GPU thread."""
        return tuple(self._offloaded)

    def warm_up(self) -> float:
        """Interrogate a blank picture in the default mode and make one image from it, timed by nobody.

        On CUDA the first call of each model pays for lazy kernel loading, cuBLAS and cuDNN set-up and the
        caption decoder's graph capture; this moves that cost from the first member's request to start-up.
        """
        started = time.perf_counter()
        blank = Image.new("RGB", (512, 512), (128, 128, 128))
        described = self.interrogator_for(self.first).interrogate(blank, self.settings.interrogate.mode)
        if self.generates:
            self.generator_for(self.first).warm_up(described.image_embedding)
        self.warm_up_s = time.perf_counter() - started
        log.info("models warmed up in %.1f s", self.warm_up_s)
        return self.warm_up_s

    @property
    def models(self) -> dict[str, str]:
        """Model names as they should be recorded next to results, for the default preset."""
        return self.models_for(None)

    def models_for(self, preset: str | None) -> dict[str, str]:
        """A preset's model names as results record them: its generator and its interrogation models."""
        chosen = self.presets.get(preset)
        recorded = preset_sources(self.settings, chosen).recorded()
        loaded = self._interrogators.get(chosen.clip)
        if loaded is not None:
            return {"generator": chosen.recorded_generator, **loaded.models}
        interrogation = _recorded_interrogation(recorded)
        try:
            # As the interrogator will record it once loaded, so the cache key stays the same.
            if clip_files(chosen.clip).quick_gelu:
                interrogation["clip"] = quick_gelu_name(interrogation["clip"])
        except ModelUnavailable:
            pass  # not here yet: loading it says so
        return {"generator": chosen.recorded_generator, **interrogation}

    def guides_for(self, preset: str | None) -> tuple[GuideName, ...]:
        try:
            chosen = self.presets.get(preset)
        except UnknownPreset:
            return ()
        return self._guides_for(chosen)

    def _guides_for(self, preset: Preset) -> tuple[GuideName, ...]:
        """The guides a request of `preset` may keep: those that fit its family (layout every one, the
        others SD 1.x alone), of those loaded here, or for an engine that only describes, of those enabled
        in [guides] (each worker says which it has, and a job waits for one that has them)."""
        if self.generates and self._guide_weights_loaded:
            return fitting(self.guides.offered, preset.family)
        if self.generates:
            # No generator the weights fit has loaded yet: those on this machine, which it will load.
            if self._guide_weights_here is None:
                self._guide_weights_here = guide_weights_here(self.settings, self.presets)
            return fitting(self._guide_weights_here, preset.family)
        enabled = self.settings.guides.enabled
        return fitting((name for name in GUIDE_NAMES if name in enabled), preset.family)

    def plan(self, request: GenerationRequest, server: ServerSettings | None = None) -> GenerationRequest:
        preset = self.presets.get(request.preset)
        self._check_present(preset)
        settings = self.presets.settings_for(preset.name, server, self.settings.generate)
        offered = self._guides_for(preset)
        loras = self.loras_for(preset.family)
        return plan(request, settings, preset.recorded_generator, offered, loras, preset.name)

    def interrogate(
        self, image: Image.Image, mode: str, key: str | None = None, preset: str | None = None
    ) -> Interrogation:
        return out_of_memory_as(
            "The GPU ran out of memory while describing this image; try again in a moment.",
            lambda: self.interrogator_for(preset).interrogate(image, mode, key=key),
        )

    def generate(
        self,
        request: GenerationRequest,
        *,
        source_embedding: tuple[float, ...] | None = None,
        on_step: StepCallback | None = None,
    ) -> BatchResult:
        return self.generator_for(request.preset).generate(
            request,
            source_embedding=source_embedding,
            on_step=on_step,
            batch_size=self.settings.queue.max_batch_images,
        )

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: StepCallback | None = None
    ) -> BatchResult:
        return self.generator_for(params.preset).generate_batch(params, specs, on_step=on_step)


def load_interrogator(
    settings: Settings, *, progress: bool = False, preset: str | None = None
) -> Interrogator:
    """A preset's interrogator alone, for work that makes no images: no Stable Diffusion in memory."""
    sources = preset_sources(settings, resolve_presets(settings).get(preset))
    check_downloaded(sources, generator=False)
    device = resolve_device(settings.models.device)
    log.info(
        "loading the interrogation models on %s: clip %s, caption %s", device, sources.clip, sources.caption
    )
    return _interrogator(
        settings, sources, device, resolve_dtype(settings.models.precision, device), progress
    )


def _interrogator(
    settings: Settings,
    sources: ModelSources,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    *,
    captioner: Captioner | None = None,
) -> Interrogator:
    interrogator = Interrogator.load(
        sources.clip,
        sources.caption,
        settings.interrogate,
        device,
        settings.cache_path,
        dtype=dtype,
        progress=progress,
        captioner=captioner,
    )
    recorded = _recorded_interrogation(sources.recorded())
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


def _recorded_interrogation(recorded: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in recorded.items() if k != "generator"}
