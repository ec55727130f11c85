"""Stable Diffusion service with the tiny pipeline: validation, seeds, safety, fidelity, OOM splitting."""

from __future__ import annotations

import collections
import copy
import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from i2p2i_bot.config import GenerateSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.generate import Generator
from i2p2i_bot.guides import Guide
from i2p2i_bot.i18n import translate
from i2p2i_bot.request import (
    GenerationError,
    GenerationRequest,
    ImageSpec,
    plan,
    upscale_fits,
    upscale_of,
)
from i2p2i_bot.smoke import SmokeModels
from tests.safety import flagging_everything

# What the engine promises for one seed across batch sizes: a pixel level or two of 255.
BATCH_ROUNDING = 2


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"prompt": "   "}, "The prompt is empty"),
        ({"count": 0}, "The number of images must be between 1 and 8 (got 0)"),
        ({"count": 9}, "The number of images must be between 1 and 8 (got 9)"),
        ({"width": 100}, "The width must be a multiple of 8 between 64 and 128 (got 100)"),
        ({"height": 256}, "The height must be a multiple of 8 between 64 and 128 (got 256)"),
        ({"steps": 0}, "Steps must be between 1 and 100 (got 0)"),
        ({"guidance": 31.0}, "Guidance must be between 0 and 30"),
        ({"seed": -1}, "The seed must be a whole number from 0 to 4294967295 (got -1)"),
        ({"scheduler": "euler"}, "The scheduler must be one of dpm, pndm"),
        ({"prompt": "x" * 4001}, "The prompt is 4001 characters; the limit is 4000."),
    ],
)
def test_invalid_requests_are_refused_before_running(
    base_settings: Settings, changes: dict, needle: str
) -> None:
    """Each invalid request raises GenerationError with one sentence naming the problem."""
    request = dataclasses.replace(GenerationRequest("a red bicycle"), **changes)
    with pytest.raises(GenerationError) as info:
        plan(request, base_settings.generate, "model")
    assert needle in str(info.value)


def test_plan_fills_defaults_and_consecutive_seeds(base_settings: Settings) -> None:
    """Unset settings take the server's defaults, the negative prompt too; image k gets seed + k."""
    settings = dataclasses.replace(base_settings.generate, negative_prompt="blurry, watermark")
    planned = plan(GenerationRequest("a cat", count=3, seed=4294967294), settings, "m")
    assert planned.planned and planned.negative_prompt == "blurry, watermark" and planned.model == "m"
    params, specs = planned.params, planned.specs()
    assert (params.steps, params.width, params.height, params.scheduler) == (3, 64, 64, "dpm")
    assert [s.seed for s in specs] == [4294967294, 4294967295, 0]
    assert {(s.prompt, s.negative_prompt) for s in specs} == {("a cat", "blurry, watermark")}
    random_specs = plan(GenerationRequest("a cat", count=2), settings, "m").specs()
    assert random_specs[1].seed == (random_specs[0].seed + 1) % 2**32
    # An empty negative prompt is a choice, not a gap: the default does not replace it.
    assert plan(GenerationRequest("a cat", negative_prompt=""), settings, "m").negative_prompt == ""


def test_a_planned_request_plans_to_itself_and_keeps_its_settings(base_settings: Settings) -> None:
    """Planning again (a reroll, after the defaults changed) keeps every setting a job was made with."""
    first = plan(GenerationRequest("a cat", steps=5, guidance=4.0, width=128), base_settings.generate, "m")
    changed = dataclasses.replace(
        base_settings.generate, steps=9, guidance=9.0, width=96, negative_prompt="x"
    )
    assert plan(first, changed, "m") == first
    reroll = plan(dataclasses.replace(first, seed=None), changed, "m")
    assert dataclasses.replace(reroll, seed=first.seed) == first
    # The generator is recorded as the preset names it now (the admin may have replaced its weights).
    assert plan(dataclasses.replace(first, model="other"), changed, "m").model == "m"
    with pytest.raises(ValueError, match="planned"):
        _ = GenerationRequest("not planned").params


def test_same_seed_same_pixels_and_different_seeds_differ(engine: Engine) -> None:
    """An image is reproducible from its seed alone; other seeds give other images."""
    first = engine.generate(GenerationRequest("a lighthouse at dusk", count=2, seed=1234))
    again = engine.generate(GenerationRequest("a lighthouse at dusk", count=1, seed=1234))
    alone = engine.generate(GenerationRequest("a lighthouse at dusk", count=1, seed=1235))
    assert [i.spec.seed for i in first.images] == [1234, 1235]
    a, b = first.images
    assert a.image.size == (64, 64) and a.image.mode == "RGB"
    # Batched or alone, an image depends on its seed only, up to float rounding across batch sizes (which
    # differs between CPUs); the same batch made twice is the same to the bit.
    assert np.abs(pixels(a.image) - pixels(again.images[0].image)).max() <= BATCH_ROUNDING
    repeat = engine.generate(GenerationRequest("a lighthouse at dusk", count=2, seed=1234))
    for x, y in zip(first.images, repeat.images, strict=True):
        assert np.array_equal(pixels(x.image), pixels(y.image))
    assert np.abs(pixels(a.image) - pixels(b.image)).mean() > 5
    assert np.abs(pixels(b.image) - pixels(alone.images[0].image)).max() <= BATCH_ROUNDING


def test_schedulers_are_selectable(engine: Engine) -> None:
    """DPM-Solver++ is the default; PNDM, the original scheduler, gives a different image."""
    dpm = engine.generate(GenerationRequest("a forest", seed=7))
    assert type(engine.generator.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    pndm = engine.generate(GenerationRequest("a forest", seed=7, scheduler="pndm"))
    assert type(engine.generator.pipe.scheduler).__name__ == "PNDMScheduler"
    assert not np.array_equal(pixels(dpm.images[0].image), pixels(pndm.images[0].image))


def test_steps_are_reported(engine: Engine) -> None:
    """The step callback sees every denoising step of every batch, counted in the steps asked for."""
    seen: list[tuple[int, int]] = []
    engine.generate(GenerationRequest("a boat", count=2, steps=4), on_step=lambda k, n: seen.append((k, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # PNDM runs the UNet once more than its steps (its first step twice); progress still ends at 4 of 4.
    seen.clear()
    pndm = GenerationRequest("a boat", steps=4, scheduler="pndm")
    engine.generate(pndm, on_step=lambda k, n: seen.append((k, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4), (4, 4)]


def test_fidelity_is_the_clip_cosine_to_the_source(engine: Engine, astronaut: Image.Image) -> None:
    """Fidelity is None without a source, 1.0 against itself, and the CLIP cosine otherwise."""
    plain = engine.generate(GenerationRequest("a portrait", seed=3))
    assert plain.images[0].fidelity is None
    own = engine.interrogator.embed_images([plain.images[0].image])[0]
    same = engine.generate(GenerationRequest("a portrait", seed=3), source_embedding=tuple(own.tolist()))
    assert same.images[0].fidelity == pytest.approx(1.0, abs=1e-4)
    source = engine.interrogator.embed_images([astronaut])[0]
    scored = engine.generate(GenerationRequest("a portrait", seed=3), source_embedding=tuple(source.tolist()))
    assert scored.images[0].fidelity == pytest.approx(float(own @ source), abs=1e-4)


def test_safety_checker_flags_are_reported(engine: Engine) -> None:
    """Images the safety checker flags are reported as nsfw and blacked out; others are not."""
    clean = engine.generate(GenerationRequest("a meadow", seed=11))
    assert [i.nsfw for i in clean.images] == [False]
    with flagging_everything(engine.generator.pipe):
        flagged = engine.generate(GenerationRequest("a meadow", count=2, seed=11))
    assert [i.nsfw for i in flagged.images] == [True, True]
    assert pixels(flagged.images[0].image).max() == 0


def test_a_flagged_image_keeps_its_pixels_only_where_its_spec_asks(engine: Engine) -> None:
    """In one batch, a flagged image whose spec keeps flagged pixels is the image as made (the same as
    unflagged), and its neighbour that does not is blacked out."""
    generator = engine.generator
    planned = generator.plan(GenerationRequest("a meadow", count=2, seed=11))
    kept, filtered = planned.spec(0, keep_flagged=True), planned.spec(1)
    as_made = generator.generate_batch(planned.params, [kept, filtered]).images
    assert [i.nsfw for i in as_made] == [False, False]
    with flagging_everything(generator.pipe):
        made = generator.generate_batch(planned.params, [kept, filtered]).images
    assert [i.nsfw for i in made] == [True, True]
    assert pixels(made[0].image).max() > 0
    assert np.abs(pixels(made[0].image) - pixels(as_made[0].image)).max() == 0
    assert pixels(made[1].image).max() == 0


def test_safety_checker_can_be_switched_off(base_settings: Settings, smoke_models: SmokeModels) -> None:
    """With safety_checker = false the pipeline loads without it and flags nothing."""
    settings = dataclasses.replace(base_settings.generate, safety_checker=False)
    generator = Generator.load(str(smoke_models.generator), settings, torch.device("cpu"))
    assert generator.pipe.safety_checker is None
    result = generator.generate(GenerationRequest("a meadow", seed=11))
    assert [i.nsfw for i in result.images] == [False]


def test_cross_prompt_batches_keep_each_spec(engine: Engine) -> None:
    """One batch may hold several users' prompts; each image matches its own spec run alone."""
    params = engine.plan(GenerationRequest("x")).params
    specs = [ImageSpec("a red car", "", 21), ImageSpec("a blue house", "blurry", 22)]
    batch = engine.generate_batch(params, specs)
    assert [i.spec for i in batch.images] == specs
    for item in batch.images:
        alone = engine.generate_batch(params, [item.spec]).images[0]
        assert np.abs(pixels(item.image) - pixels(alone.image)).max() <= 2


def test_out_of_memory_splits_the_batch(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """When a batch of 4 runs out of CUDA memory, it is split and every image still comes back, in order."""
    pipe = engine.generator.pipe
    reference = engine.generate(GenerationRequest("a tower", count=4, seed=50))
    original_call = type(pipe).__call__
    sizes: list[int] = []

    def tight_memory(self: object, *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(kwargs["prompt"]))
        if len(kwargs["prompt"]) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", tight_memory)
    result = engine.generate(GenerationRequest("a tower", count=4, seed=50))
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    assert [i.spec.seed for i in result.images] == [50, 51, 52, 53]
    for got, want in zip(result.images, reference.images, strict=True):
        assert np.abs(pixels(got.image) - pixels(want.image)).max() <= 2


def test_batches_follow_max_batch_images(engine: Engine) -> None:
    """A request larger than max_batch_images runs as several batches with the right seeds."""
    queue = dataclasses.replace(engine.settings.queue, max_batch_images=2)
    small = engine.sharing(settings=dataclasses.replace(engine.settings, queue=queue))
    seen: list[tuple[int, int]] = []
    result = small.generate(
        GenerationRequest("a kite", count=5, seed=90, steps=1), on_step=lambda k, n: seen.append((k, n))
    )
    assert [i.spec.seed for i in result.images] == [90, 91, 92, 93, 94]
    assert len(seen) == 3  # three batches of one step each: 2 + 2 + 1


def test_settings_bound_the_sizes(base_settings: Settings) -> None:
    """Generation settings reject sizes outside their own bounds."""
    with pytest.raises(GenerationError):
        plan(GenerationRequest("a", width=136), base_settings.generate, "m")
    roomy = GenerateSettings(min_side=64, max_side=1024)
    params = plan(GenerationRequest("a", width=1024, height=64), roomy, "m").params
    assert (params.width, params.height) == (1024, 64)


def test_an_upscale_doubles_one_image_within_its_own_cap(base_settings: Settings) -> None:
    """Upscale (2×) of image #2: one image, that image's seed, prompt and negative, twice the size, kept
    from it with layout at the strength; plan() bounds it by upscale_max_side instead of max_side, and a
    doubling past that cap is one sentence (which upscale_fits foresees, so it is never offered)."""
    settings = dataclasses.replace(base_settings.generate, max_side=64, upscale_max_side=128)
    job = plan(GenerationRequest("a cat", count=3, seed=10, negative_prompt="blurry"), settings, "m")
    source = "ab" * 32
    upscale = plan(upscale_of(job, seed=11, source=source, strength=0.4), settings, "m", ("layout",))
    assert (upscale.prompt, upscale.negative_prompt) == ("a cat", "blurry")
    assert (upscale.count, upscale.seed) == (1, 11)
    assert (upscale.width, upscale.height, upscale.steps) == (128, 128, job.steps)
    assert (upscale.keep, upscale.guide_source, upscale.upscale) == ((Guide("layout", 0.4),), source, True)
    assert upscale.params.upscale and upscale.specs()[0].guide_source == source
    # The same size asked for plainly is over max_side.
    with pytest.raises(GenerationError, match=r"between 64 and 64 \(got 128\)"):
        plan(dataclasses.replace(upscale, upscale=False), settings, "m", ("layout",))
    assert upscale_fits(64, 64, settings) and not upscale_fits(128, 128, settings)
    with pytest.raises(GenerationError) as info:
        plan(upscale_of(upscale, seed=11, source=source, strength=0.4), settings, "m", ("layout",))
    said = "Upscaled, the image would be 256×256 pixels; an upscale may be at most 128 pixels on a side."
    assert str(info.value) == said
    assert translate(said, "zh-CN") == "放大后图片将为 256×256 像素；放大的图片每边最多 128 像素。"


def test_the_smoke_engine_makes_an_upscale_at_twice_the_size(engine: Engine, tmp_path: Any) -> None:
    """The layout guide fits the stored source to the doubled size: a 64-pixel result upscaled is a
    128-pixel image, and which image it upscales changes its pixels (the smoke VAE is random, so closeness
    to the source means nothing here)."""
    from i2p2i_bot.guided import GuidedPipelines, GuideModels
    from i2p2i_bot.source_images import SourceImages

    sources = SourceImages(tmp_path)
    for seed, name in ((5, "cd"), (6, "ef")):
        small = engine.generate(GenerationRequest("a lighthouse at dusk", seed=seed)).images[0].image
        sources.save(name * 32, small)
    generator = copy.copy(engine.generator)
    generator.source_images = sources
    generator.guided = GuidedPipelines(generator.pipe, GuideModels(layout=True), sources)
    guided = engine.sharing(generator=generator)
    settings = dataclasses.replace(engine.settings.generate, upscale_max_side=128)
    job = plan(GenerationRequest("a lighthouse at dusk", seed=5), settings, "m")
    made = {}
    for name in ("cd", "ef"):
        request = plan(upscale_of(job, seed=5, source=name * 32, strength=0.4), settings, "m", ("layout",))
        made[name] = guided.generate(request).images[0].image
    assert made["cd"].size == made["ef"].size == (128, 128)
    assert float(np.abs(pixels(made["cd"]) - pixels(made["ef"])).mean()) > 1.0


class _HostReads(TorchDispatchMode):
    """Counts the operators whose result the host must wait for on a GPU (a value or a shape read back)."""

    READS = frozenset(
        {"_local_scalar_dense", "is_nonzero", "nonzero", "equal", "masked_select", "unique_dim"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.name().split("::")[-1].split(".")[0]
        if name in self.READS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_the_denoising_loop_reads_nothing_back_per_step(engine: Engine, guidance: float) -> None:
    """With the default scheduler and progress reporting on, a batch reads values back from the device a
    fixed number of times, whatever its steps: no step waits for the GPU to finish the one before."""
    request = GenerationRequest("a lighthouse", count=2, seed=5, guidance=guidance)
    planned = engine.generator.plan(request)
    params, specs = planned.params, planned.specs()
    assert params.scheduler == "dpm"
    reads = []
    for steps in (3, 6):
        seen: list[tuple[int, int]] = []
        with _HostReads() as counter:
            engine.generate_batch(dataclasses.replace(params, steps=steps), specs, _recorder(seen))
        assert seen == [(k, steps) for k in range(1, steps + 1)]
        reads.append(counter.calls)
    assert reads[0] == reads[1]
    assert sum(reads[0].values()) <= 2  # DPM-Solver finding its first step in the schedule


def _recorder(seen: list[tuple[int, int]]) -> Any:
    return lambda step, total: seen.append((step, total))
