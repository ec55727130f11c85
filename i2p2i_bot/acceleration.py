"""The generator's fast path: each step switchable in [generate], none of them changing what an image shows.

- channels-last activations for the UNet and VAE (tensor-core convolutions without layout transposes);
- fused query/key/value projections (one matmul per attention layer instead of three);
- VAE slicing from a batch size up (one image's decode at a time: less memory for big batches);
- a compiled UNet for a few batch sizes ("buckets") at the default image size, compiled and warmed at
  start. A batch is padded up to the next bucket with copies of its last image, which are thrown away;
  every image has its own seed and noise, so padding cannot change the others beyond float rounding.
  Nothing is compiled after start: a UNet input of a shape not warmed (another size, guidance off) runs
  uncompiled, and so does a batch whose UNet takes ControlNet residuals (edges, depth). A UNet that
  fails to compile, or whose compiled code fails during a batch, runs uncompiled from then on, with a
  warning; that batch is made again uncompiled.
- the safety checker's and the fidelity score's CLIP input made from the decoded tensor on the device,
  instead of a round trip through PIL on the CPU (`pipeline_class`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from i2p2i_bot.clip_pixels import clip_input
from i2p2i_bot.config import GenerateSettings
from i2p2i_bot.gpu import cuda_context_lost

log = logging.getLogger(__name__)


def apply_layout_and_fusion(pipe: Any, settings: GenerateSettings, *, compiled: bool) -> list[str]:
    """Channels-last and fused projections, in place; returns the steps that took.

    Channels-last pays only compiled: on an H200 in fp16 it made the eager batch of 8 7 % slower, and the
    compiled one 3 % faster (batch 4: 8 %; 4 members: 5 %; docs/benchmarks.md), so "auto" follows compiling.
    """
    applied = []
    if settings.channels_last == "on" or (settings.channels_last == "auto" and compiled):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("channels_last")
    if settings.fuse_qkv:
        try:
            pipe.fuse_qkv_projections()
        except (ValueError, AttributeError, RuntimeError) as exc:  # a UNet or VAE diffusers cannot fuse
            log.warning("attention projections left unfused: %s", exc)
        else:
            applied.append("fused_qkv")
    return applied


def drop_channels_last(pipe: Any, applied: list[str]) -> None:
    """Back to the default layout, for an "auto" channels-last whose UNet did not compile after all."""
    if "channels_last" in applied:
        pipe.unet.to(memory_format=torch.contiguous_format)
        pipe.vae.to(memory_format=torch.contiguous_format)
        applied.remove("channels_last")


def compile_mode(settings: GenerateSettings, device: torch.device) -> str:
    """The torch.compile mode to use, or "off"; "auto" is CUDA graphs on CUDA and off elsewhere.

    On an H200, "reduce-overhead" made batches of 8 images 45 % faster than eager after about 45 s of
    compiling per bucket (docs/benchmarks.md); on a CPU compiling costs minutes and gains little.
    """
    if settings.compile != "auto":
        return settings.compile
    return "reduce-overhead" if device.type == "cuda" else "off"


def use_vae_slicing(pipe: Any, settings: GenerateSettings, batch: int) -> None:
    """Decode one image at a time for batches of at least `vae_slicing_from` images."""
    pipe.vae.use_slicing = bool(settings.vae_slicing_from) and batch >= settings.vae_slicing_from


class CompiledUnetFailed(Exception):
    """The compiled UNet raised during a batch (a recompile, a CUDA graph, a kernel); the eager one works."""


class UnetBuckets:
    """The compiled UNet for the bucket batch sizes at one image size; the eager UNet otherwise."""

    def __init__(
        self,
        pipe: Any,
        mode: str,
        buckets: list[int],
        size: tuple[int, int],
        *,
        backend: str | Callable[..., Any] = "inductor",
    ) -> None:
        self.pipe = pipe
        self.eager = pipe.unet
        self.buckets = sorted(buckets)
        self.size = size
        self.mode = mode
        options: dict[str, Any] = {"backend": backend, "fullgraph": False, "dynamic": False}
        if backend == "inductor":
            options["mode"] = mode
        compiled: Any = torch.compile(self.eager, **options)
        self._compiled_forward = compiled.forward
        compiled.forward = self._forward
        self.compiled: Any = compiled
        self.failed: str | None = None
        self.warmup_s: dict[int, float] = {}
        # UNet batch sizes compiled at start, in rows: two per image with classifier-free guidance, else one.
        self.warm_rows: set[int] = set()
        self._warming = False

    def bucket_for(self, batch: int, width: int, height: int, rows_per_image: int = 2) -> int | None:
        """The padded batch size a request runs at compiled, or None to run it eager.

        rows_per_image is the UNet batch per image: 2 with classifier-free guidance, 1 without.
        """
        if self.failed is not None or (width, height) != self.size:
            return None
        return next((b for b in self.buckets if b >= batch and b * rows_per_image in self.warm_rows), None)

    @contextlib.contextmanager
    def selected(self, compiled: bool, pipe: Any | None = None) -> Iterator[None]:
        """Run `pipe` (default: the resident pipeline; or one sharing its UNet) with the chosen UNet."""
        pipe = self.pipe if pipe is None else pipe
        pipe.unet = self.compiled if compiled else self.eager
        try:
            yield
        finally:
            pipe.unet = self.eager

    def warm(self, run: Callable[[int], None]) -> None:
        """Compile every bucket now (run(n) makes a batch of n); on any failure fall back to eager."""
        self._warming = True
        try:
            for bucket in self.buckets:
                started = time.perf_counter()
                try:
                    with self.selected(True):
                        run(bucket)
                except Exception as exc:  # torch.compile raises many kinds; the eager UNet still works
                    self.failed = f"{type(exc).__name__}: {exc}"
                    log.warning("the UNet could not be compiled (%s); it runs uncompiled", self.failed)
                    return
                self.warmup_s[bucket] = time.perf_counter() - started
                log.info("compiled UNet warmed for batch %d in %.1f s", bucket, self.warmup_s[bucket])
        finally:
            self._warming = False

    def give_up(self, exc: CompiledUnetFailed) -> None:
        """Run uncompiled from now on, after the compiled UNet failed during a batch."""
        self.failed = str(exc)
        log.warning(
            "the compiled UNet failed during a batch (%s); it runs uncompiled from now on",
            self.failed,
            exc_info=exc,
        )

    def _forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # The code is compiled for the strides of the warm-up's latents; image-to-image (layout) makes
        # its latents through a channels-last VAE, whose strides would send it down the eager path. The
        # copy is of the latents alone (8 images at 512 px: 256 KB in fp16).
        sample = sample.contiguous()
        if self._warming:
            self.warm_rows.add(sample.shape[0])
            return _owned(self._compiled_forward(sample, *args, **kwargs))
        try:
            # Compiling takes minutes on the GPU thread, with requests waiting: an input that no code
            # compiled at start fits (a new shape, any other changed guard) runs eager instead.
            with torch.compiler.set_stance("eager_on_recompile"):
                return _owned(self._compiled_forward(sample, *args, **kwargs))
        except torch.OutOfMemoryError:
            raise  # the GPU thread splits the batch
        except Exception as exc:
            if cuda_context_lost(exc):
                raise  # the eager UNet cannot run either
            raise CompiledUnetFailed(f"{type(exc).__name__}: {exc}") from exc


def _owned(output: Any) -> Any:
    """The compiled UNet's output, copied: the CUDA-graph modes return one static buffer per shape that the
    next call overwrites, and a scheduler may keep an output across steps (PNDM does without guidance)."""
    if isinstance(output, tuple):
        return tuple(t.clone() if torch.is_tensor(t) else t for t in output)
    return type(output)(sample=output.sample.clone())


@functools.cache
def pipeline_class(stock_name: str = "StableDiffusionPipeline") -> type[Any]:
    """A Stable Diffusion pipeline of diffusers' (text-to-image by default; the guides' image-to-image and
    ControlNet ones too) whose safety checker input is prepared on the device.

    It also keeps the decoded pixels (in [0, 1], on the device) of its last call in `decoded`, so the
    fidelity score needs no trip through PIL either, and it takes IP-Adapter image embeddings with a row
    per image of the batch. Everything else is the stock pipeline.
    """
    import diffusers

    stock: Any = getattr(diffusers, stock_name)

    class DevicePostprocessPipeline(stock):
        decoded: torch.Tensor | None = None

        def run_safety_checker(self, image: Any, device: torch.device, dtype: torch.dtype) -> Any:
            if not torch.is_tensor(image):
                return super().run_safety_checker(image, device, dtype)
            pixels = (image / 2 + 0.5).clamp(0, 1)
            self.decoded = pixels
            if self.safety_checker is None:
                return image, None
            extractor = self.feature_extractor
            crop = extractor.crop_size
            clip = clip_input(
                pixels,
                shortest_edge=int(extractor.size["shortest_edge"]),
                crop=(int(crop["height"]), int(crop["width"])),
                mean=extractor.image_mean,
                std=extractor.image_std,
            )
            return self.safety_checker(images=image, clip_input=clip.to(dtype))

        def prepare_ip_adapter_image_embeds(
            self,
            ip_adapter_image: Any,
            ip_adapter_image_embeds: list[torch.Tensor] | None,
            device: torch.device,
            num_images_per_prompt: int,
            do_classifier_free_guidance: bool,
        ) -> list[torch.Tensor]:
            # The stock pipelines repeat the embeddings for every image of the batch: one picture for
            # all of them. Here each image has its own source, so the embeddings come with a row per
            # image (the unconditional rows first when guiding) and are used as they are.
            if ip_adapter_image_embeds is None:
                raise ValueError("this pipeline takes ip_adapter_image_embeds, a row per image")
            return [embeds.to(device) for embeds in ip_adapter_image_embeds]

    return DevicePostprocessPipeline
