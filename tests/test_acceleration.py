"""The generator's fast path: each step is taken on the smoke pipeline and changes images only by rounding."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from i2p2i_bot.acceleration import compile_mode
from i2p2i_bot.config import GenerateSettings, Settings
from i2p2i_bot.generate import Generator
from i2p2i_bot.request import GenerationRequest, ImageSpec
from i2p2i_bot.smoke import SmokeModels

CPU = torch.device("cpu")
# Batched, fused or compiled arithmetic may round differently: a level or two of 255, never more.
ROUNDING = 2


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    yield
    torch._dynamo.reset()


class CountingBackend:
    """The "aot_eager" backend, counting compilations and calls of what it compiled; chosen calls raise.

    "aot_eager" traces and partitions the UNet exactly as torch.compile does, without generating kernels,
    so this runs on any CPU; inductor's code generation is the benchmark's business.
    """

    def __init__(self) -> None:
        self.compiles = 0
        self.calls = 0
        self.failures: dict[int, Exception] = {}  # call number → what that call raises

    def fail(self, nth_call_from_now: int, error: Exception) -> None:
        self.failures[self.calls + nth_call_from_now] = error

    def __call__(self, graph: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        from torch._dynamo.backends.registry import lookup_backend

        self.compiles += 1
        compiled = lookup_backend("aot_eager")(graph, inputs)

        def run(*args: Any) -> Any:
            self.calls += 1
            if self.calls in self.failures:
                raise self.failures.pop(self.calls)
            return compiled(*args)

        # Called as dynamo calls what the backend made (boxed: one list of inputs), whichever it is.
        run._boxed_call = getattr(compiled, "_boxed_call", False)  # type: ignore[attr-defined]
        return run


class StaticOutputBackend(CountingBackend):
    """Returns every output in one buffer per shape that the next call overwrites, as CUDA graphs do."""

    def __init__(self) -> None:
        super().__init__()
        self.buffers: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, graph: torch.fx.GraphModule, inputs: list[Any]) -> Any:
        run = super().__call__(graph, inputs)

        def static(*args: Any) -> Any:
            return [self._into_buffer(out) for out in run(*args)]

        static._boxed_call = run._boxed_call  # type: ignore[attr-defined]
        return static

    def _into_buffer(self, out: Any) -> Any:
        if not torch.is_tensor(out) or out.dim() != 4:
            return out
        buffer = self.buffers.setdefault(tuple(out.shape), torch.empty_like(out))
        return buffer.copy_(out)


def load(smoke_models: SmokeModels, settings: GenerateSettings, **options: Any) -> Generator:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(smoke_models.generator), dtype=torch.float32)
    return Generator(pipe, settings, "smoke", **options)


def settings_for(base: Settings, **changes: Any) -> GenerateSettings:
    return dataclasses.replace(base.generate, steps=4, **changes)


def pixels(generator: Generator, count: int, **request: Any) -> list[np.ndarray]:
    result = generator.generate(GenerationRequest("a red fox in snow", count=count, seed=40, **request))
    return [np.asarray(item.image, dtype=np.int16) for item in result.images]


def largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    assert len(a) == len(b)
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def plain_generator(smoke_models: SmokeModels, base_settings: Settings) -> Generator:
    """The pipeline with every fast-path step off: the reference."""
    generator = load(smoke_models, settings_for(base_settings, channels_last="off", fuse_qkv=False))
    assert generator.fast_path == []
    return generator


@pytest.fixture(scope="module")
def plain_images(plain_generator: Generator) -> list[np.ndarray]:
    """Three images from the reference pipeline."""
    return pixels(plain_generator, 3)


def test_compile_auto_is_cuda_graphs_on_cuda_and_off_elsewhere(smoke_models: SmokeModels) -> None:
    """The default compiles on CUDA only; a mode set by hand is used on any device."""
    auto = GenerateSettings()
    assert auto.compile == "auto"
    assert compile_mode(auto, torch.device("cuda", 0)) == "reduce-overhead"
    assert compile_mode(auto, torch.device("cpu")) == "off"
    chosen = dataclasses.replace(auto, compile="max-autotune-no-cudagraphs")
    assert compile_mode(chosen, torch.device("cpu")) == "max-autotune-no-cudagraphs"
    assert compile_mode(dataclasses.replace(auto, compile="off"), torch.device("cuda")) == "off"
    # Loaded on the CPU with the defaults, nothing is compiled.
    generator = load(smoke_models, GenerateSettings(steps=4))
    assert generator.buckets is None and generator.fast_path == ["fused_qkv"]


def test_layout_and_fused_projections(
    smoke_models: SmokeModels, base_settings: Settings, plain_images: list[np.ndarray]
) -> None:
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    generator = load(smoke_models, settings_for(base_settings, channels_last="on", fuse_qkv=True))
    assert generator.fast_path == ["channels_last", "fused_qkv"]
    unet = generator.pipe.unet
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    processors = set(map(type, unet.attn_processors.values()))
    assert processors == {FusedAttnProcessor2_0}
    assert largest_difference(pixels(generator, 3), plain_images) <= ROUNDING


def test_vae_slicing_decodes_one_image_at_a_time_from_its_threshold(
    smoke_models: SmokeModels,
    base_settings: Settings,
    plain_images: list[np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = load(smoke_models, settings_for(base_settings, vae_slicing_from=3))
    vae = generator.pipe.vae
    decoded: list[int] = []
    original = vae._decode

    def spy(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        decoded.append(z.shape[0])
        return original(z, *args, **kwargs)

    monkeypatch.setattr(vae, "_decode", spy)
    two = pixels(generator, 2)
    assert decoded == [2]
    decoded.clear()
    three = pixels(generator, 3)
    assert decoded == [1, 1, 1]
    assert largest_difference(three, plain_images) <= ROUNDING
    assert largest_difference(two, plain_images[:2]) <= ROUNDING


@pytest.mark.slow
def test_compiled_buckets_pad_batches_and_keep_every_image(
    smoke_models: SmokeModels,
    base_settings: Settings,
    plain_generator: Generator,
    plain_images: list[np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Buckets 1, 2 and 4 compile at load; 3 images run as a padded 4; with guidance off (one UNet row per
    image, not two) 1 image runs as a padded 2; another size or an unforeseen shape runs uncompiled, and
    nothing compiles after load."""
    settings = settings_for(base_settings, compile="default", compile_buckets=[1, 2, 4])
    backend = CountingBackend()
    generator = load(smoke_models, settings, compile_backend=backend)
    buckets = generator.buckets
    assert buckets is not None and buckets.failed is None
    assert sorted(buckets.warmup_s) == [1, 2, 4]
    assert buckets.warm_rows == {2, 4, 8} and backend.compiles == 3
    # channels_last "auto" follows compiling: on here, off in every uncompiled generator above.
    assert generator.fast_path == ["channels_last", "fused_qkv", "compiled:default"]
    assert generator.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    calls: list[tuple[int, bool]] = []
    original = generator._pipeline_call

    def spy(params: Any, specs: Any, on_step: Any) -> Any:
        calls.append((len(specs), generator.pipe.unet is buckets.compiled))
        return original(params, specs, on_step)

    monkeypatch.setattr(generator, "_pipeline_call", spy)
    compiled = pixels(generator, 3)
    assert calls == [(4, True)]
    assert largest_difference(compiled, plain_images) <= ROUNDING
    assert generator.pipe.unet is buckets.eager

    calls.clear()
    unguided = pixels(generator, 1, guidance=1.0) + pixels(generator, 3, guidance=1.0)
    assert calls == [(2, True), (4, True)]
    reference = pixels(plain_generator, 1, guidance=1.0) + pixels(plain_generator, 3, guidance=1.0)
    assert largest_difference(unguided, reference) <= ROUNDING

    calls.clear()
    side = settings.width + 8
    other = generator.generate(GenerationRequest("a red fox in snow", count=1, seed=40, width=side))
    assert calls == [(1, False)]
    assert other.images[0].image.size == (side, settings.height)

    # Even selected, the compiled UNet runs a shape it was not compiled for (3 guided images: 6 rows) eager.
    planned = generator.plan(GenerationRequest("a red fox in snow", count=3, seed=40))
    params, specs = planned.params, planned.specs()
    graph_calls = backend.calls
    with buckets.selected(True):
        odd = generator._pipeline_call(params, specs, None)
    assert backend.calls == graph_calls
    assert largest_difference([np.asarray(made[0], dtype=np.int16) for made in odd], plain_images) <= ROUNDING
    assert backend.compiles == 3


@pytest.mark.slow
def test_guided_batches_with_compiling_on_make_the_uncompiled_images(
    smoke_models: SmokeModels,
    base_settings: Settings,
    astronaut: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """layout (image-to-image: the UNet's usual inputs) runs on the compiled buckets; edges and depth,
    whose UNet also takes ControlNet residuals, and look, whose UNet runs IP-Adapter attention, run eager;
    all make the images of a generator without any fast path (fused projections included), to rounding,
    and layout is compiled again after a look batch."""
    import hashlib

    from i2p2i_bot.config import GuideSettings
    from i2p2i_bot.guided import load_guide_models
    from i2p2i_bot.guides import parse_guides
    from i2p2i_bot.models import resolve_models

    every = GuideSettings(enabled=["layout", "edges", "depth", "look"])
    both = dataclasses.replace(base_settings, guides=every)
    guides = load_guide_models(both.guides, resolve_models(both), CPU, torch.float32)
    backend = CountingBackend()
    settings = settings_for(base_settings, compile="default", compile_buckets=[1, 2])
    generator = load(smoke_models, settings, compile_backend=backend, guides=guides)
    reference = load(
        smoke_models, settings_for(base_settings, channels_last="off", fuse_qkv=False), guides=guides
    )
    buckets = generator.buckets
    assert buckets is not None and buckets.failed is None
    source = hashlib.sha256(b"astronaut").hexdigest()
    for made in (generator, reference):
        made.source_images.hold(source, astronaut)

    calls: list[tuple[int, bool]] = []
    original = generator._pipeline_call

    def spy(params: Any, specs: Any, on_step: Any) -> Any:
        calls.append((len(specs), generator._pipeline(params).unet is buckets.compiled))
        return original(params, specs, on_step)

    monkeypatch.setattr(generator, "_pipeline_call", spy)
    for keep, compiled in (
        ("layout", True),
        ("edges", False),
        ("edges,layout", False),
        ("depth", False),
        ("edges,depth,layout", False),
        ("look,layout", False),
        ("layout", True),
    ):
        calls.clear()
        graph_calls = backend.calls
        guided = {"keep": parse_guides(keep), "guide_source": source}
        images = pixels(generator, 2, **guided)
        assert calls == [(2, compiled)], keep
        assert (backend.calls > graph_calls) is compiled, keep
        assert largest_difference(images, pixels(reference, 2, **guided)) <= ROUNDING, keep
    assert backend.compiles == 2


def test_a_scheduler_that_keeps_unet_outputs_is_safe_from_static_output_buffers(
    smoke_models: SmokeModels, base_settings: Settings, plain_generator: Generator
) -> None:
    """PNDM without guidance keeps the UNet's raw outputs across steps; a compiled UNet whose outputs live
    in buffers that the next call overwrites (CUDA graphs) still gives PNDM's images."""
    settings = settings_for(base_settings, compile="reduce-overhead", compile_buckets=[1, 2])
    backend = StaticOutputBackend()
    generator = load(smoke_models, settings, compile_backend=backend)
    assert generator.buckets is not None and generator.buckets.failed is None
    calls = backend.calls
    request = {"guidance": 1.0, "scheduler": "pndm"}
    compiled = pixels(generator, 2, **request)
    assert backend.calls > calls and backend.buffers  # the compiled UNet ran, from static buffers
    assert largest_difference(compiled, pixels(plain_generator, 2, **request)) <= ROUNDING


@pytest.mark.slow
def test_a_compiled_unet_that_fails_during_a_batch_makes_it_again_uncompiled_and_stays_uncompiled(
    smoke_models: SmokeModels,
    base_settings: Settings,
    plain_images: list[np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A recompile, CUDA graph or kernel error in the compiled UNet mid-batch: the batch is made again
    uncompiled, with the same images, and later batches never call the compiled UNet. Out-of-memory is
    still split by the GPU thread, and a CUDA fault still fails the batch: neither turns compilation off."""
    settings = settings_for(base_settings, compile="default", compile_buckets=[2])
    backend = CountingBackend()
    generator = load(smoke_models, settings, compile_backend=backend)
    buckets = generator.buckets
    assert buckets is not None and buckets.failed is None

    backend.fail(2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    split = pixels(generator, 2)  # 2 fails, then 1 + 1, each padded to 2
    assert largest_difference(split, plain_images[:2]) <= ROUNDING
    # One image padded to 2 that runs out of memory is made at its own size, uncompiled (padding its
    # halves up to 2 again would never fit); the compiled UNet stays on.
    graph_calls = backend.calls
    backend.fail(1, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    alone = pixels(generator, 1)
    assert backend.calls == graph_calls + 1 and not backend.failures
    assert largest_difference(alone, plain_images[:1]) <= ROUNDING
    assert buckets.failed is None
    backend.fail(1, RuntimeError("CUDA error: an illegal memory access was encountered"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        pixels(generator, 2)
    assert buckets.failed is None

    backend.fail(2, RuntimeError("CUDA graph replay found a freed input"))
    with caplog.at_level(logging.WARNING, logger="i2p2i_bot.acceleration"):
        made_again = pixels(generator, 2)
        assert not backend.failures  # the second compiled call of that batch raised
        assert "CUDA graph replay found a freed input" in (buckets.failed or "")
        graph_calls = backend.calls
        eager = pixels(generator, 2)
    assert backend.calls == graph_calls
    assert largest_difference(made_again, eager) == 0
    assert largest_difference(eager, plain_images[:2]) <= ROUNDING
    [warning] = [r for r in caplog.records if "failed during a batch" in r.getMessage()]
    assert warning.exc_info is not None  # once, with the traceback


def test_a_unet_that_fails_to_compile_runs_uncompiled(
    smoke_models: SmokeModels,
    base_settings: Settings,
    plain_images: list[np.ndarray],
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken_backend(graph: Any, inputs: Any) -> Any:
        raise RuntimeError("no compiler on this machine")

    settings = settings_for(base_settings, compile="default", compile_buckets=[1, 2])
    with caplog.at_level(logging.WARNING, logger="i2p2i_bot.acceleration"):
        generator = load(smoke_models, settings, compile_backend=broken_backend)
    assert generator.buckets is not None
    assert "no compiler on this machine" in (generator.buckets.failed or "")
    assert any("could not be compiled" in r.getMessage() for r in caplog.records)
    # Channels-last came with compiling ("auto"), so it went with it.
    assert generator.fast_path == ["fused_qkv"]
    assert generator.pipe.unet.conv_in.weight.is_contiguous()
    assert generator.buckets.bucket_for(1, settings.width, settings.height) is None
    assert largest_difference(pixels(generator, 3), plain_images) <= ROUNDING


@pytest.mark.parametrize("shape", [(512, 512), (512, 768), (600, 400)])
def test_device_clip_input_matches_the_clip_image_processor(shape: tuple[int, int]) -> None:
    """Resize, crop and normalise on the device agree with transformers' PIL path to pixel rounding."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    from i2p2i_bot.clip_pixels import clip_input

    extractor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    noise = torch.rand(1, 3, shape[0] // 16, shape[1] // 16, generator=torch.Generator().manual_seed(0))
    pixels = torch.nn.functional.interpolate(noise, size=shape, mode="bilinear")
    picture = Image.fromarray((pixels[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    stock = extractor(picture, return_tensors="pt").pixel_values
    ours = clip_input(
        pixels, shortest_edge=224, crop=(224, 224), mean=extractor.image_mean, std=extractor.image_std
    )
    assert ours.shape == stock.shape == (1, 3, 224, 224)
    # One level of 255 is 0.0146 after CLIP's normalisation: allow about two.
    assert float((ours - stock).abs().max()) < 0.03
    assert float((ours - stock).abs().mean()) < 0.01


def test_device_postprocessing_keeps_stock_pixels_flags_and_fidelity(
    smoke_models: SmokeModels, base_settings: Settings, engine: Any
) -> None:
    """Ours and stock StableDiffusionPipeline make identical pixels; safety and fidelity inputs agree."""
    from diffusers import StableDiffusionPipeline

    from i2p2i_bot.acceleration import pipeline_class

    kwargs = {"num_inference_steps": 3, "width": 64, "height": 64, "output_type": "pil"}
    prompts = ["a red fox in snow", "a lighthouse at dusk"]
    stock = StableDiffusionPipeline.from_pretrained(str(smoke_models.generator), dtype=torch.float32)
    ours = pipeline_class().from_pretrained(str(smoke_models.generator), dtype=torch.float32)
    outputs = []
    for pipe in (stock, ours):
        generators = [torch.Generator().manual_seed(seed) for seed in (5, 6)]
        outputs.append(pipe(prompt=prompts, generator=generators, **kwargs))
    for a, b in zip(outputs[0].images, outputs[1].images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert outputs[0].nsfw_content_detected == outputs[1].nsfw_content_detected
    assert ours.decoded is not None and ours.decoded.shape == (2, 3, 64, 64)
    # The decoded pixels are the images before rounding to 8 bits.
    rounded = (ours.decoded.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(rounded[0], np.asarray(outputs[1].images[0]))

    # Fidelity from the device tensor agrees with fidelity from the PIL images.
    interrogator = engine.interrogator
    from_pixels = interrogator.embed_pixels(ours.decoded)
    from_pil = interrogator.embed_images(outputs[1].images)
    cosines = (from_pixels * from_pil).sum(dim=-1)
    assert float(cosines.min()) > 0.999


def test_the_engine_scores_fidelity_without_a_trip_through_pil(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(images: Any) -> Any:
        raise AssertionError("fidelity went through PIL")

    monkeypatch.setattr(engine.generator, "embed_images", refuse)
    source = tuple(torch.nn.functional.normalize(torch.ones(32), dim=0).tolist())
    result = engine.generate(GenerationRequest("a meadow", count=2, seed=3), source_embedding=source)
    assert all(item.fidelity is not None and -1.0 <= item.fidelity <= 1.0 for item in result.images)


@pytest.mark.slow
def test_long_prompts_run_eager_beside_a_compiled_batch(
    smoke_models: SmokeModels,
    base_settings: Settings,
    plain_generator: Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A prompt past the window makes a UNet input of 154 tokens, which nothing compiled at start fits: its
    image runs eager, the others of its batch compiled, and every image is the uncompiled generator's."""
    settings = settings_for(base_settings, compile="default", compile_buckets=[2])
    backend = CountingBackend()
    generator = load(smoke_models, settings, compile_backend=backend)
    buckets = generator.buckets
    assert buckets is not None and buckets.failed is None
    calls: list[tuple[list[str], bool]] = []
    original = generator._pipeline_call

    def spy(params: Any, specs: Any, on_step: Any) -> Any:
        calls.append(([s.prompt[:12] for s in specs], generator.pipe.unet is buckets.compiled))
        return original(params, specs, on_step)

    monkeypatch.setattr(generator, "_pipeline_call", spy)
    words = " ".join(f"word{i}" for i in range(40))
    specs = [ImageSpec("a (red:1.3) fox", "", 40), ImageSpec(words, "", 41), ImageSpec("a fox", "", 42)]
    params = generator.plan(GenerationRequest("x")).params
    graph_calls = backend.calls
    made = generator.generate_batch(params, specs).images
    assert calls == [(["a (red:1.3) ", "a fox"], True), (["word0 word1 "], False)]
    assert backend.calls > graph_calls and backend.compiles == 1
    reference = plain_generator.generate_batch(params, specs).images
    assert (
        largest_difference(
            [np.asarray(m.image, dtype=np.int16) for m in made],
            [np.asarray(r.image, dtype=np.int16) for r in reference],
        )
        <= ROUNDING
    )
