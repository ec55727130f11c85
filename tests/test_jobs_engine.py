"""The job system with the real engine (tiny models): queue → GPU thread → store, pixels checked."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_parameter_registration_hook,
)

from i2p2i_bot.config import (
    DEFAULT_CAPTION,
    DEFAULT_CLIP,
    DEFAULT_GENERATOR,
    GuideSettings,
    ModelSettings,
    QueueSettings,
    Settings,
    WarmUp,
)
from i2p2i_bot.engine import Engine
from i2p2i_bot.generate import Generator
from i2p2i_bot.gpu import GpuOutOfMemory, GpuWorker
from i2p2i_bot.guides import Guide
from i2p2i_bot.interrogate import MODES, Captioner, ClipEncoder
from i2p2i_bot.models import ModelUnavailable
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.replies import user_message
from i2p2i_bot.request import GenerationError, GenerationRequest
from i2p2i_bot.runner import JobRunner
from i2p2i_bot.smoke import SmokeModels, write_smoke_lora
from i2p2i_bot.store import Store
from tests.requests import job_request


async def test_jobs_run_on_the_real_engine(
    settings: Settings, engine: Engine, astronaut: Image.Image
) -> None:
    """Two members' jobs share batches, finish, and each stored PNG equals the image its seed makes alone."""
    store = await Store.from_settings(settings)
    gpu = GpuWorker()
    try:
        queue = await JobQueue.open(store, QueueSettings(max_batch_images=3))
        runner = JobRunner(queue, engine, gpu, timeout_s=120)
        runner.start()
        source = engine.interrogate(astronaut, "fast")
        stored = await store.add_interrogation(
            source, source_sha256="a" * 64, models=engine.models, user_id=1, guild_id=None, channel_id=None
        )
        params = engine.plan(GenerationRequest("x")).params
        first = await queue.submit(
            job_request(1, "a red kite", params, count=2, seed=10, interrogation_id=stored.id)
        )
        second = await queue.submit(job_request(2, "a blue boat", params, count=2, seed=20))
        await queue.join()
        await runner.stop(5)
        for job, prompt in ((first, "a red kite"), (second, "a blue boat")):
            record = await store.job_record(job.id)
            assert record is not None and record.job.status == "complete"
            assert [m.seed for m in record.images] == list(job.request.seeds)
            for meta in record.images:
                with Image.open(store.image_path(job.id, meta.index)) as png:
                    stored_pixels = np.asarray(png.convert("RGB"), dtype=np.int16)
                alone = engine.generate(GenerationRequest(prompt, seed=meta.seed)).images[0].image
                assert np.abs(stored_pixels - np.asarray(alone, dtype=np.int16)).max() <= 2
                if job is first:
                    assert meta.fidelity is not None and -1.0 <= meta.fidelity <= 1.0
                else:
                    assert meta.fidelity is None
    finally:
        gpu.close()
        await store.close()


def test_warm_up_runs_each_model_at_load_and_changes_no_result(
    base_settings: Settings, engine: Engine, astronaut: Image.Image
) -> None:
    """models.warm_up = "on" runs the caption model, CLIP's image tower and the UNet while loading ("auto"
    does on CUDA only, so not here); the warmed engine's prompt and pixels equal the cold engine's."""
    assert base_settings.models.warm_up == "auto" and engine.warm_up_s is None

    def load(warm_up: WarmUp) -> tuple[Engine, set[str]]:
        called: set[str] = set()
        hook = register_module_forward_hook(lambda module, args, output: called.add(type(module).__name__))
        try:
            models = dataclasses.replace(base_settings.models, warm_up=warm_up)
            return Engine.load(dataclasses.replace(base_settings, models=models)), called
        finally:
            hook.remove()

    cold, cold_calls = load("off")
    warm, warm_calls = load("on")
    assert cold.warm_up_s is None and warm.warm_up_s is not None and warm.warm_up_s > 0
    assert {"BlipVisionModel", "VisionTransformer", "UNet2DConditionModel"} <= (warm_calls - cold_calls)
    assert warm.interrogator._features == {}  # the blank picture is not remembered as anyone's image
    assert warm.interrogate(astronaut, "fast").prompt == cold.interrogate(astronaut, "fast").prompt
    request = GenerationRequest("a red kite", seed=7)
    warm_pixels = np.asarray(warm.generate(request).images[0].image)
    assert np.array_equal(warm_pixels, np.asarray(cold.generate(request).images[0].image))


def test_a_failed_warm_up_leaves_a_working_engine_unless_it_broke_the_gpu(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error in the warm-up is logged and loading goes on (a request would meet it again and say so);
    a CUDA fault stops the load, since the GPU is lost for the whole process."""
    settings = dataclasses.replace(
        base_settings, models=dataclasses.replace(base_settings.models, warm_up="on")
    )
    errors = iter([ValueError("odd shape"), RuntimeError("CUDA error: an illegal memory access")])

    def broken(self: Generator, source_embedding: object = None) -> None:
        raise next(errors)

    monkeypatch.setattr(Generator, "warm_up", broken)
    with caplog.at_level(logging.WARNING, logger="i2p2i_bot.engine"):
        engine = Engine.load(settings)
    assert engine.warm_up_s is None
    said = [r.getMessage() for r in caplog.records if r.name == "i2p2i_bot.engine"]
    assert [m for m in said if "safety checker" not in m] == [
        "the warm-up failed; the first request pays for it"
    ]
    assert engine.interrogate(Image.new("RGB", (64, 64)), "fast").prompt
    with pytest.raises(RuntimeError, match="illegal memory access"):
        Engine.load(settings)


@pytest.mark.parametrize("safety_checker", [True, False])
def test_missing_models_are_named_at_once_before_any_is_loaded(
    base_settings: Settings, safety_checker: bool, no_network: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bot's Engine.load with the default models and an empty cache, HF_HUB_OFFLINE unset: one short line
    names all three and `i2p2i download-models`, before any model is built and without a connection."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded")

    for loader in (ClipEncoder, Captioner, Generator):
        monkeypatch.setattr(loader, "load", refuse)
    settings = dataclasses.replace(
        base_settings,
        models=ModelSettings(device="cpu"),
        generate=dataclasses.replace(base_settings.generate, safety_checker=safety_checker),
    )
    with pytest.raises(ModelUnavailable) as raised:
        Engine.load(settings)
    line = str(raised.value)
    assert line == (
        f"Not downloaded: Stable Diffusion {DEFAULT_GENERATOR}, CLIP {DEFAULT_CLIP}, BLIP {DEFAULT_CAPTION}; "
        "run `i2p2i download-models`"
    )
    assert len(line) < 200


def test_the_engine_runs_in_half_precision_as_on_cuda(
    base_settings: Settings, engine: Engine, astronaut: Image.Image
) -> None:
    """models.precision = "fp16" loads every model in fp16 (CUDA's default, here on the CPU): each mode
    interrogates, images are made and scored, and they match the fp32 engine's within half precision."""
    models = dataclasses.replace(base_settings.models, precision="fp16", warm_up="on")
    half = Engine.load(dataclasses.replace(base_settings, models=models))
    assert half.warm_up_s is not None  # the warm-up ran every stage without an error
    interrogator, pipe = half.interrogator, half.generator.pipe
    assert interrogator.clip.model.visual.conv1.weight.dtype == torch.float16
    assert interrogator.clip.dtype == interrogator.captioner.dtype == torch.float16
    assert interrogator.bank.embeds.dtype == torch.float16
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16
    caption = interrogator.features(astronaut).caption
    prompts = {mode: half.interrogate(astronaut, mode).prompt for mode in MODES}
    assert all(prompts.values()), prompts
    for mode in ("best", "fast", "classic", "candidates"):
        assert prompts[mode].startswith(caption + ", "), (mode, prompts[mode])
    assert set(prompts["fast"].removeprefix(caption + ", ").split(", ")) <= set(interrogator.bank.labels)
    source = tuple(interrogator.embed_images([astronaut])[0].float().tolist())
    request = GenerationRequest("a red kite", count=2, seed=7)
    made = half.generate(request, source_embedding=source).images
    reference = engine.generate(request, source_embedding=source).images
    for got, want in zip(made, reference, strict=True):
        assert got.fidelity is not None and want.fidelity is not None
        assert got.fidelity == pytest.approx(want.fidelity, abs=0.01)
        assert np.abs(np.asarray(got.image, np.int16) - np.asarray(want.image, np.int16)).max() <= 8


def test_running_out_of_gpu_memory_while_describing_is_one_sentence_and_the_next_call_works(
    engine: Engine, astronaut: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    captioner = engine.interrogator.captioner
    caption = captioner.caption

    def full(image: Image.Image) -> str:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(captioner, "caption", full)
    with pytest.raises(GpuOutOfMemory) as info:
        engine.interrogate(astronaut, "fast")
    assert str(info.value) == "The GPU ran out of memory while describing this image; try again in a moment."
    assert user_message(info.value) == str(info.value)
    monkeypatch.setattr(captioner, "caption", caption)
    assert engine.interrogate(astronaut, "fast").prompt


# What a generator and the guides are built of: none of it may be built where GPU workers make the images.
GENERATOR_MODULES = {
    "UNet2DConditionModel",
    "AutoencoderKL",
    "CLIPTextModel",
    "StableDiffusionSafetyChecker",
    "ControlNetModel",
}


@contextlib.contextmanager
def modules_built() -> Iterator[set[str]]:
    """The class names of the torch modules that register a parameter meanwhile (any thread)."""
    built: set[str] = set()
    hook = register_module_parameter_registration_hook(lambda module, *_: built.add(type(module).__name__))
    try:
        yield built
    finally:
        hook.remove()


def test_an_engine_that_only_describes_builds_no_generator_and_checks_requests_against_the_config(
    base_settings: Settings,
    engine: Engine,
    describing_cache: Path,
    smoke_models: SmokeModels,
    astronaut: Image.Image,
    tmp_path: Path,
) -> None:
    """generate=False (the bot of queue.backend = "redis") starts over models with no UNet, VAE or safety
    checker: it builds no generator module, warms up and describes as the full engine does, offers every
    preset and the guides enabled in [guides], plans as strictly (steps, size, guides, LoRA family) and
    records the same model names."""
    lora = tmp_path / "loras" / "ink.safetensors"
    write_smoke_lora(
        smoke_models.generator, lora, seed=3, text_encoder=False, metadata={"ss_base_model_version": "sd_v1"}
    )
    settings = dataclasses.replace(
        base_settings,
        models=dataclasses.replace(
            base_settings.models, cache_dir=str(describing_cache), lora_dir=str(lora.parent), warm_up="on"
        ),
        guides=GuideSettings(enabled=["edges", "layout"]),
    )
    with pytest.raises(ModelUnavailable, match="Stable Diffusion"):
        Engine.load(settings)  # the generator's weights are not on this machine
    with modules_built() as built:
        only = Engine.load(settings, generate=False)
    assert {"VisionTransformer", "BlipVisionEmbeddings"} <= built  # CLIP's and BLIP's image towers
    assert built & GENERATOR_MODULES == set()
    assert only.resident_presets == () and only.offloaded_presets == ()
    assert only.warm_up_s is not None  # the interrogator's alone
    with pytest.raises(RuntimeError, match="only describes"):
        only.generate(GenerationRequest("a red kite", seed=1))
    assert only.interrogate(astronaut, "fast").prompt == engine.interrogate(astronaut, "fast").prompt

    assert only.available_presets() == ("sd-v1-4", "sd2", "sdxl", "sd1-file")
    assert only.guides_for(None) == ("layout", "edges")  # in canonical order, none of their weights loaded
    assert only.guides_for("sd1-file") == ("layout", "edges")
    # Layout fits every family; edges is an SD 1.x ControlNet.
    assert only.guides_for("sd2") == only.guides_for("sdxl") == ("layout",)
    assert only.guides_for("gone") == ()
    for preset in only.presets.names:
        assert only.models_for(preset) == engine.models_for(preset)
        plain = GenerationRequest("a red kite", seed=7, preset=preset)
        assert only.plan(plain) == engine.plan(plain)  # sdxl's too, though its UNet is not here
    source = "a" * 64
    edges = GenerationRequest("a red kite", keep=(Guide("edges", 0.8),), guide_source=source)
    assert only.plan(edges).keep == (Guide("edges", 0.8),)
    styled = only.plan(GenerationRequest("a red kite <lora:ink:0.5>"))
    assert [(lora.name, lora.weight) for lora in styled.loras] == [("ink", 0.5)]
    refused = {
        "Steps must be between 1 and": GenerationRequest("a red kite", steps=10_000),
        "The width must be a multiple of 8": GenerationRequest("a red kite", width=100),
        "This bot does not offer the look guide (available: layout, edges).": GenerationRequest(
            "a red kite", keep=(Guide("look", 0.5),), guide_source=source
        ),
        "This bot does not offer the edges guide (available: layout).": dataclasses.replace(
            edges, preset="sdxl"
        ),
        "The LoRA “ink” was made for another model than this server's": GenerationRequest(
            "a red kite <lora:ink:0.5>", preset="sdxl"
        ),
    }
    for said, request in refused.items():
        with pytest.raises(GenerationError) as raised:
            only.plan(request)
        assert str(raised.value).startswith(said)
