"""The generator's fast path: each step is taken on the smoke pipeline and changes images only by rounding."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from i2p2i_bot.config import GenerateSettings, Settings
from i2p2i_bot.generate import GenerationRequest, Generator
from i2p2i_bot.smoke import SmokeModels

CPU = torch.device("cpu")
# Batched, fused or compiled arithmetic may round differently: a level or two of 255, never more.
ROUNDING = 2


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    yield
    torch._dynamo.reset()


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
def plain_images(smoke_models: SmokeModels, base_settings: Settings) -> list[np.ndarray]:
    """Three images from the pipeline with every fast-path step off: the reference."""
    plain = settings_for(base_settings, channels_last=False, fuse_qkv=False)
    generator = load(smoke_models, plain)
    assert generator.fast_path == []
    return pixels(generator, 3)


def test_layout_and_fused_projections(
    smoke_models: SmokeModels, base_settings: Settings, plain_images: list[np.ndarray]
) -> None:
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    generator = load(smoke_models, settings_for(base_settings))
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
    plain_images: list[np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Buckets 1, 2 and 4 compile at load; 3 images run as a padded 4; another size runs uncompiled.

    The "aot_eager" backend traces and partitions the UNet exactly as torch.compile does, without
    generating kernels, so this runs on any CPU; inductor's code generation is the benchmark's business.
    """
    settings = settings_for(base_settings, compile="default", compile_buckets=[1, 2, 4])
    generator = load(smoke_models, settings, compile_backend="aot_eager")
    buckets = generator.buckets
    assert buckets is not None and buckets.failed is None
    assert sorted(buckets.warmup_s) == [1, 2, 4]
    assert generator.fast_path == ["channels_last", "fused_qkv", "compiled:default"]

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
    side = settings.width + 8
    other = generator.generate(GenerationRequest("a red fox in snow", count=1, seed=40, width=side))
    assert calls == [(1, False)]
    assert other.images[0].image.size == (side, settings.height)


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
    assert generator.fast_path == ["channels_last", "fused_qkv"]
    assert generator.buckets.bucket_for(1, settings.width, settings.height) is None
    assert largest_difference(pixels(generator, 3), plain_images) <= ROUNDING
