"""Stable Diffusion service: validated requests in, typed results out, one generator per image."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from i2p2i_bot.acceleration import (
    CompiledUnetFailed,
    UnetBuckets,
    apply_layout_and_fusion,
    compile_mode,
    drop_channels_last,
    pipeline_class,
    use_vae_slicing,
)
from i2p2i_bot.batches import BatchResult, GeneratedImage, StepCallback
from i2p2i_bot.config import BUILTIN_PRESET, GenerateSettings
from i2p2i_bot.fidelity import fidelity_scores
from i2p2i_bot.gpu import default_dtype, split_on_oom
from i2p2i_bot.guided import GuidedPipelines, GuideModels, compiles
from i2p2i_bot.guides import GuideName
from i2p2i_bot.lora_adapters import LoraAdapters, pipeline_family
from i2p2i_bot.loras import LoraLibrary
from i2p2i_bot.models import (
    ModelUnavailable,
    generator_file,
    generator_folder,
    single_file_config_folder,
)
from i2p2i_bot.presets import FAMILY_PIPELINE, SINGLE_FILE_SUFFIXES, Family
from i2p2i_bot.prompt_encoding import PromptEncoder
from i2p2i_bot.request import GenerationParams, GenerationRequest, ImageSpec, plan
from i2p2i_bot.server_settings import ServerSettings
from i2p2i_bot.source_images import SourceImages

log = logging.getLogger(__name__)

ImageEmbedder = Callable[[Sequence[Image.Image]], torch.Tensor]
# Embeds decoded images still on the device: [N, 3, H, W] in [0, 1] → [N, D].
PixelEmbedder = Callable[[torch.Tensor], torch.Tensor]
# What the pipeline gives for one image: the picture, its safety flag, its decoded pixels if kept.
_Made = tuple[Image.Image, bool, torch.Tensor | None]


class Generator:
    """A resident Stable Diffusion pipeline; every method runs on the GPU thread."""

    def __init__(
        self,
        pipe: Any,
        settings: GenerateSettings,
        model: str,
        *,
        embed_images: ImageEmbedder | None = None,
        embed_pixels: PixelEmbedder | None = None,
        compile_backend: str | Callable[..., Any] = "inductor",
        guides: GuideModels | None = None,
        source_images: SourceImages | None = None,
        loras: LoraLibrary | None = None,
        preset: str = BUILTIN_PRESET,
        family: Family = "sd1",
    ) -> None:
        from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

        self.pipe = pipe
        self.settings = settings
        self.model = model
        # The model preset this pipeline is, which its plans and batches name.
        self.preset = preset
        # Its model family (presets.Family): which guides' weights fit it.
        self.family = family
        self.embed_images = embed_images
        self.embed_pixels = embed_pixels
        self.device = pipe.device
        # The compiled UNet's buckets are captured for SD 1.x/2.x inputs; SDXL's extra conditioning runs
        # eager.
        mode = (
            "off"
            if getattr(pipe, "text_encoder_2", None) is not None
            else compile_mode(settings, self.device)
        )
        self.fast_path = apply_layout_and_fusion(pipe, settings, compiled=mode != "off")
        # Where the sources that guided images keep elements of are found, by hash.
        self.source_images = source_images or SourceImages()
        # Layout with the family's own image-to-image pipeline; the other guides where their weights fit.
        self.guided = GuidedPipelines(pipe, guides or GuideModels(), self.source_images, family=family)
        self.prompts = PromptEncoder(pipe)
        # The LoRAs prompts may name, and those loaded into this pipeline.
        self.lora_library = loras or LoraLibrary(None)
        self.lora_library.family = pipeline_family(pipe)
        self.loras = LoraAdapters(pipe, self.lora_library)
        self.buckets: UnetBuckets | None = None
        if mode != "off":
            self.buckets = UnetBuckets(
                pipe,
                mode,
                settings.compile_buckets,
                (settings.width, settings.height),
                backend=compile_backend,
            )
        config = pipe.scheduler.config
        self._schedulers = {
            "dpm": DPMSolverMultistepScheduler.from_config(config),
            "pndm": PNDMScheduler.from_config(config),
        }
        pipe.set_progress_bar_config(disable=True)
        if self.buckets is not None:
            self.buckets.warm(self._warm_bucket)
            if self.buckets.failed is None:
                self.fast_path.append(f"compiled:{mode}")
            elif settings.channels_last == "auto":
                drop_channels_last(pipe, self.fast_path)
        log.info("generator fast path: %s", ", ".join(self.fast_path) or "none")
        log.info("guides offered: %s", ", ".join(self.offered_guides) or "none")

    def move_to(self, device: torch.device) -> None:
        """Move the pipeline, with its loaded LoRAs, to `device` (CPU RAM while another preset runs)."""
        self.pipe.to(device)
        self.device = self.pipe.device

    def warm_up(self, source_embedding: tuple[float, ...] | None = None) -> None:
        """One image of two steps at the default size, through every stage a member's batch takes."""
        self.generate_batch(self._warm_up_params(), [ImageSpec("warm-up", "", 0, source_embedding)])

    def _warm_bucket(self, batch: int) -> None:
        specs = [ImageSpec("warm-up", "", seed) for seed in range(batch)]
        self._pipeline_call(self._warm_up_params(), specs, None)

    def _warm_up_params(self) -> GenerationParams:
        s = self.settings
        return GenerationParams(self.model, 2, s.guidance, s.width, s.height, s.scheduler, preset=self.preset)

    @classmethod
    def load(
        cls,
        source: str,
        settings: GenerateSettings,
        device: torch.device,
        *,
        embed_images: ImageEmbedder | None = None,
        embed_pixels: PixelEmbedder | None = None,
        dtype: torch.dtype | None = None,
        name: str | None = None,
        guides: GuideModels | None = None,
        source_images: SourceImages | None = None,
        loras: LoraLibrary | None = None,
        family: Family = "sd1",
        config: str = "",
        preset: str = BUILTIN_PRESET,
    ) -> Generator:
        """Load the pipeline from `source`; `name` is what jobs record as its model (default: the source).

        `guides` are the loaded guides' weights (guided.load_guide_models), in the same dtype and device;
        those that do not fit `family` are left out.
        `family` picks the pipeline class; a single file (.safetensors/.ckpt) is read with the configs of
        the diffusers folder or Hub id `config`, from this machine only.
        """
        dtype = dtype or default_dtype(device)
        try:
            if source.lower().endswith(SINGLE_FILE_SUFFIXES):
                pipe = _single_file_pipeline(source, config, family, settings, dtype)
            else:
                extra: dict[str, Any] = {}
                if family == "sdxl":
                    pass  # SDXL pipelines have no safety checker to leave out
                elif not settings.safety_checker or family == "sd2":
                    extra = {"safety_checker": None, "requires_safety_checker": False}
                folder = generator_folder(source, safety_checker=settings.safety_checker and family == "sd1")
                pipe = pipeline_class(FAMILY_PIPELINE[family]).from_pretrained(folder, dtype=dtype, **extra)
        except (OSError, ValueError) as exc:
            raise ModelUnavailable(
                f"Stable Diffusion model {source!r} could not be loaded ({exc}); run `i2p2i download-models` "
                "where there is internet, or use --models smoke to check the install"
            ) from exc
        pipe = pipe.to(device)
        return cls(
            pipe,
            settings,
            name or source,
            embed_images=embed_images,
            embed_pixels=embed_pixels,
            guides=guides,
            source_images=source_images,
            loras=loras,
            preset=preset,
            family=family,
        )

    @property
    def offered_guides(self) -> tuple[GuideName, ...]:
        """The guides this generator can keep: those enabled whose weights are here."""
        return self.guided.models.offered

    def plan(self, request: GenerationRequest, server: ServerSettings | None = None) -> GenerationRequest:
        """The request checked against this generator's settings, with a server's changes over them, its
        defaults and seed filled in."""
        settings = self.settings if server is None else server.generate(self.settings)
        return plan(request, settings, self.model, self.offered_guides, self.lora_library, self.preset)

    def generate(
        self,
        request: GenerationRequest,
        *,
        source_embedding: tuple[float, ...] | None = None,
        on_step: StepCallback | None = None,
        batch_size: int = 8,
    ) -> BatchResult:
        """Plan a request and run it in batches of at most batch_size images."""
        planned = self.plan(request)
        params, specs = planned.params, planned.specs(source_embedding)
        images: list[GeneratedImage] = []
        timings: dict[str, float] = {}
        warnings: list[str] = []
        for start in range(0, len(specs), batch_size):
            result = self.generate_batch(params, specs[start : start + batch_size], on_step=on_step)
            images.extend(result.images)
            for key, value in result.timings_s.items():
                timings[key] = timings.get(key, 0.0) + value
            warnings.extend(w for w in result.warnings if w not in warnings)
        return BatchResult(tuple(images), timings, tuple(warnings))

    def generate_batch(
        self,
        params: GenerationParams,
        specs: Sequence[ImageSpec],
        on_step: StepCallback | None = None,
    ) -> BatchResult:
        """Make one image per spec, in order; on CUDA out-of-memory the batch is split and retried."""
        if params.model != self.model:
            raise ValueError(f"batch is for model {params.model!r}, this generator holds {self.model!r}")
        started = time.perf_counter()
        warnings: list[str] = []
        for prompt in dict.fromkeys(s.prompt for s in specs):
            warnings += self.prompts.warnings(prompt)
        for negative in dict.fromkeys(s.negative_prompt for s in specs if s.negative_prompt):
            warnings += self.prompts.warnings(negative, "negative prompt")
        self._switch_loras(params)
        outputs = split_on_oom(lambda chunk: self._run_pipeline(params, chunk, on_step), list(specs))
        pipeline_s = time.perf_counter() - started
        fidelities = self._fidelities(outputs, specs)
        images = tuple(
            GeneratedImage(spec, img, nsfw, fid)
            for spec, (img, nsfw, _), fid in zip(specs, outputs, fidelities, strict=True)
        )
        timings = {
            "pipeline_s": pipeline_s,
            "fidelity_s": time.perf_counter() - started - pipeline_s,
            "total_s": time.perf_counter() - started,
        }
        return BatchResult(images, timings, tuple(warnings))

    def _switch_loras(self, params: GenerationParams) -> None:
        """The batch's LoRAs on, and only them; without any, the model as loaded, the compiled UNet's too."""
        if params.loras:
            self.loras.apply(params.loras)
        elif self.buckets is not None and self.buckets.failed is None:
            self.loras.unload()
        else:
            self.loras.off()

    def _run_pipeline(
        self,
        params: GenerationParams,
        specs: Sequence[ImageSpec],
        on_step: StepCallback | None,
    ) -> list[_Made]:
        # Images whose prompts take more windows of tokens run apart: padding a prompt to another's
        # length would change its image.
        groups: dict[int, list[int]] = {}
        for index, spec in enumerate(specs):
            groups.setdefault(self.prompts.windows(spec), []).append(index)
        made: list[_Made | None] = [None] * len(specs)
        for windows, indices in groups.items():
            outputs = self._run_group(params, [specs[i] for i in indices], on_step, windows)
            for index, output in zip(indices, outputs, strict=True):
                made[index] = output
        return [output for output in made if output is not None]

    def _run_group(
        self,
        params: GenerationParams,
        specs: Sequence[ImageSpec],
        on_step: StepCallback | None,
        windows: int,
    ) -> list[_Made]:
        buckets = self.buckets
        bucket = None
        # The UNet was compiled for one window of prompt tokens and without LoRA layers; a longer prompt,
        # or a LoRA, runs eager.
        if buckets is not None and compiles(params.keep) and windows == 1 and not params.loras:
            # The pipeline's own rule: classifier-free guidance runs each image's UNet input twice.
            guided = params.guidance > 1 and self.pipe.unet.config.time_cond_proj_dim is None
            bucket = buckets.bucket_for(len(specs), params.width, params.height, 2 if guided else 1)
        if buckets is None or bucket is None:
            return self._pipeline_call(params, specs, on_step)
        padded = [*specs, *[specs[-1]] * (bucket - len(specs))]
        try:
            with buckets.selected(True, self._pipeline(params)):
                return self._pipeline_call(params, padded, on_step)[: len(specs)]
        except CompiledUnetFailed as exc:
            buckets.give_up(exc)
        except torch.OutOfMemoryError:
            if bucket == len(specs):
                raise  # the GPU thread splits the batch, and each part finds its own bucket
            # The padding did not fit: its halves would be padded up again, so this batch runs at its size.
            log.info("a batch of %d padded to %d ran out of memory; it runs uncompiled", len(specs), bucket)
        # Made again outside the handler, whose traceback still holds the failed attempt's tensors.
        return self._pipeline_call(params, specs, on_step)

    def _pipeline_call(
        self,
        params: GenerationParams,
        specs: Sequence[ImageSpec],
        on_step: StepCallback | None,
    ) -> list[_Made]:
        pipe = self._pipeline(params)
        pipe.scheduler = self._schedulers[params.scheduler]
        use_vae_slicing(pipe, self.settings, len(specs))
        # One CPU generator per image: its latents depend on its seed alone, whatever the batch.
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in specs]

        def step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                # Counted in the steps asked for: PNDM makes one UNet pass more than its steps.
                on_step(-(-(step + 1) * params.steps // pipe.num_timesteps), params.steps)
            return kwargs

        if params.keep:
            # Each image's own init or control image (image-to-image takes its size from the init image).
            inputs = self.guided.inputs(params, specs)
        else:
            inputs = {"width": params.width, "height": params.height}
        with torch.inference_mode(), self.guided.engaged(params):
            out = pipe(
                **self.prompts.arguments(pipe, specs),
                num_inference_steps=params.steps,
                guidance_scale=params.guidance,
                generator=generators,
                callback_on_step_end=step_end,
                **inputs,
            )
        # SDXL's output has no safety flags at all; a pipeline without a checker gives None.
        flags = getattr(out, "nsfw_content_detected", None) or [False] * len(specs)
        decoded = getattr(pipe, "decoded", None)
        rows: list[torch.Tensor | None] = [None] * len(specs)
        if decoded is not None:
            pipe.decoded = None
            rows = list(decoded)
        images = list(out.images)
        for i, (spec, flag, row) in enumerate(zip(specs, flags, rows, strict=True)):
            if flag and spec.keep_flagged:
                images[i] = _unfiltered(row, images[i])
        return [(img, bool(flag), row) for img, flag, row in zip(images, flags, rows, strict=True)]

    def _pipeline(self, params: GenerationParams) -> Any:
        """The pipeline a batch runs on: the resident one, or the guided one sharing its weights."""
        return self.guided.pipeline(params.keep) if params.keep else self.pipe

    def _fidelities(self, outputs: Sequence[_Made], specs: Sequence[ImageSpec]) -> list[float | None]:
        wanted = [i for i, s in enumerate(specs) if s.source_embedding is not None]
        scores: list[float | None] = [None] * len(specs)
        if not wanted:
            return scores
        pixels = [px for i in wanted if (px := outputs[i][2]) is not None]
        if self.embed_pixels is not None and len(pixels) == len(wanted):
            embeds = self.embed_pixels(torch.stack(pixels))
        elif self.embed_images is not None:
            embeds = self.embed_images([outputs[i][0] for i in wanted])
        else:
            return scores
        # A source described with another preset's CLIP has no comparable embedding: no score for it.
        comparable = [
            (row, i, source)
            for row, i in enumerate(wanted)
            if (source := specs[i].source_embedding) is not None and len(source) == embeds.shape[-1]
        ]
        if comparable:
            rows = embeds[[row for row, _, _ in comparable]]
            found = fidelity_scores(rows, [source for _, _, source in comparable])
            for (_, i, _), score in zip(comparable, found, strict=True):
                scores[i] = score
        return scores


def _single_file_pipeline(
    source: str, config: str, family: Family, settings: GenerateSettings, dtype: torch.dtype
) -> Any:
    """A checkpoint in the original layout, read with a diffusers folder's configs so nothing is fetched;
    an SD 1.x one gets that folder's safety checker, as from_single_file would fetch it."""
    checker = settings.safety_checker and family == "sd1"
    folder = Path(single_file_config_folder(config, safety_checker=checker))
    extra: dict[str, Any] = {}
    if family != "sdxl":
        extra = {"safety_checker": None, "requires_safety_checker": False}
        if checker and (folder / "safety_checker").is_dir():
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
            from transformers import CLIPImageProcessor

            extra = {
                "safety_checker": StableDiffusionSafetyChecker.from_pretrained(
                    folder / "safety_checker", dtype=dtype
                ),
                "feature_extractor": CLIPImageProcessor.from_pretrained(folder / "feature_extractor"),
            }
    return pipeline_class(FAMILY_PIPELINE[family]).from_single_file(
        generator_file(source), config=str(folder), local_files_only=True, torch_dtype=dtype, **extra
    )


def _unfiltered(pixels: torch.Tensor | None, blacked_out: Image.Image) -> Image.Image:
    """A flagged image as it was made, from its decoded pixels (in [0, 1], kept before the safety checker
    blacked it out), converted as the pipeline converts the others."""
    if pixels is None:  # a pipeline that keeps no decoded pixels: the black image is all there is
        log.warning("a flagged image's pixels were not kept; it stays blacked out")
        return blacked_out
    array = (pixels.detach().permute(1, 2, 0).float().cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)
