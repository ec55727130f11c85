"""LoRAs on the smoke pipeline: tags read and taken out of the text, weights applied, sets kept apart, files
pinned by hash, LoRAs of another model refused, and the fused fast path giving the unfused images."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from i2p2i_bot.cli import main
from i2p2i_bot.config import GenerateSettings, GuideSettings, Settings
from i2p2i_bot.generate import Generator
from i2p2i_bot.guided import load_guide_models
from i2p2i_bot.guides import parse_guides
from i2p2i_bot.loras import Lora, LoraError, LoraLibrary, prompt_tags, strip_tags
from i2p2i_bot.models import resolve_models
from i2p2i_bot.prompt_syntax import parse
from i2p2i_bot.request import GenerationError, GenerationRequest, ImageSpec
from i2p2i_bot.smoke import SmokeModels, write_smoke_lora

# Batched or fused arithmetic may round differently: a level or two of 255, never more.
ROUNDING = 2
CPU = torch.device("cpu")
# The source the look guide keeps the look of, by its hash.
ASTRONAUT = hashlib.sha256(b"astronaut").hexdigest()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, smoke_models: SmokeModels) -> Path:
    """style (UNet and text encoder, tagged training data), ink (UNet only, a modelspec trigger phrase),
    words (text encoder only), and wide: for a UNet whose cross-attention is wider than the smoke one's."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("loras")
    tags = {"set": {"red fox": 7, "snow": 3, "winter": 5}}
    write_smoke_lora(
        smoke_models.generator,
        folder / "style.safetensors",
        seed=1,
        metadata={"ss_tag_frequency": json.dumps(tags)},
    )
    write_smoke_lora(
        smoke_models.generator,
        folder / "ink.safetensors",
        seed=2,
        text_encoder=False,
        metadata={
            "modelspec.trigger_phrase": "ink wash, sumi-e",
            "modelspec.architecture": "stable-diffusion-v1/lora",
        },
    )
    write_smoke_lora(smoke_models.generator, folder / "words.safetensors", seed=3, unet_layers=False)
    config = UNet2DConditionModel.load_config(smoke_models.generator / "unet")
    wider = UNet2DConditionModel.from_config({**config, "cross_attention_dim": 48})
    write_smoke_lora(
        smoke_models.generator, folder / "wide.safetensors", seed=4, text_encoder=False, unet=wider
    )
    return folder


def load(smoke_models: SmokeModels, settings: GenerateSettings, folder: Path) -> Generator:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(smoke_models.generator), dtype=torch.float32)
    return Generator(pipe, settings, "smoke", loras=LoraLibrary(folder))


@pytest.fixture(scope="module")
def generator(smoke_models: SmokeModels, base_settings: Settings, lora_dir: Path) -> Generator:
    """A pipeline of its own (LoRAs change its modules), with the defaults' fused projections."""
    made = load(smoke_models, dataclasses.replace(base_settings.generate, steps=3), lora_dir)
    assert made.fast_path == ["fused_qkv"]
    return made


def pixels(generator: Generator, prompt: str, count: int = 1) -> list[np.ndarray]:
    result = generator.generate(GenerationRequest(prompt, count=count, seed=40))
    return [np.asarray(item.image, dtype=np.int16) for item in result.images]


def largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return max(int(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def test_tags_are_read_in_order_and_taken_out_of_the_text() -> None:
    prompt = "a fox <lora:Style:0.8>, in snow <LORA:ink> (red:1.2)"
    assert prompt_tags(prompt) == (("Style", 0.8), ("ink", 1.0))
    assert strip_tags(prompt) == "a fox , in snow  (red:1.2)"
    for bad, sentence in (
        (
            "<lora:style:lots>",
            "The LoRA weight in “<lora:style:lots>” is not a number; write <lora:style:0.8>.",
        ),
        ("<lora:style:5>", "The LoRA “style” weighs 5; LoRA weights go from -3 to 3."),
        ("<lora:a> <lora:A:0.5>", "The prompt names the LoRA “A” twice; give it once, with one weight."),
        ("<lora::1>", "The prompt's “<lora::1>” names no LoRA; write <lora:NAME:WEIGHT>."),
    ):
        with pytest.raises(LoraError) as caught:
            prompt_tags(bad)
        assert str(caught.value) == sentence


def test_the_library_lists_each_lora_with_its_trigger_words(lora_dir: Path) -> None:
    offered = {lora.name: lora for lora in LoraLibrary(lora_dir).available()}
    assert sorted(offered) == ["ink", "style", "wide", "words"]
    assert offered["style"].trigger_words == ("red fox", "winter", "snow")
    assert offered["ink"].trigger_words == ("ink wash", "sumi-e") and offered["ink"].family == "sd1"
    assert offered["words"].trigger_words == () and offered["words"].family is None


def test_weight_0_is_no_lora_weight_1_another_image_and_off_is_as_before(generator: Generator) -> None:
    plain = pixels(generator, "a red fox in snow", 2)
    assert largest_difference(pixels(generator, "a red fox in snow <lora:style:0>", 2), plain) <= ROUNDING
    styled = pixels(generator, "a red fox in snow <lora:style:1>", 2)
    assert largest_difference(styled, plain) > 10
    # The tag is no text: where it stands in the prompt changes nothing.
    assert largest_difference(pixels(generator, "<lora:STYLE> a red fox in snow", 2), styled) <= ROUNDING
    assert largest_difference(pixels(generator, "a red fox in snow", 2), plain) == 0


def test_two_loras_at_once_make_another_image_than_either(generator: Generator) -> None:
    style = pixels(generator, "a red fox <lora:style:1>")
    ink = pixels(generator, "a red fox <lora:ink:1>")
    both = pixels(generator, "a red fox <lora:style:1> <lora:ink:0.7>")
    assert largest_difference(both, style) > 5 and largest_difference(both, ink) > 5
    assert largest_difference(pixels(generator, "a red fox <lora:ink:0.7> <lora:style:1>"), both) <= ROUNDING


def test_a_text_encoder_lora_moves_weighted_prompts_from_its_own_empty_prompt(generator: Generator) -> None:
    """compel weighs a word from the empty prompt's embedding: with a LoRA on the text encoder, that
    embedding must be the LoRA's too, not one kept from before it was switched on."""
    from compel.embeddings_provider import EmbeddingsProvider, SplitLongTextMode

    encoder, pipe = generator.prompts, generator.pipe
    spec = ImageSpec("a red fox, (snow:1.4)", "", 1)
    generator.loras.apply([])
    before = encoder.arguments(pipe, [spec])["prompt_embeds"]
    generator.loras.apply(generator.plan(GenerationRequest("x <lora:words:1>")).loras)
    try:
        after = encoder.arguments(pipe, [spec])["prompt_embeds"]
        fresh = EmbeddingsProvider(
            pipe.tokenizer, pipe.text_encoder, truncate=False, split_long_text_mode=SplitLongTextMode.PHRASES
        )
        fragments = parse(spec.prompt)
        expected = fresh.get_embeddings_for_weighted_prompt_fragments(
            [[f.text for f in fragments]], [[f.weight for f in fragments]], device=pipe.device
        )
        assert not torch.allclose(before, after, atol=1e-4)
        assert torch.allclose(after, expected, atol=1e-6)
    finally:
        generator.loras.apply([])
    assert torch.equal(encoder.arguments(pipe, [spec])["prompt_embeds"], before)


def test_the_batch_key_holds_the_lora_set(generator: Generator) -> None:
    plan = generator.plan
    styled = plan(GenerationRequest("a fox <lora:style:0.5>", seed=1)).params
    assert styled == plan(GenerationRequest("a cat <lora:Style:0.5>", seed=2)).params
    assert styled != plan(GenerationRequest("a fox <lora:style:0.6>", seed=1)).params
    assert styled != plan(GenerationRequest("a fox", seed=1)).params
    assert styled != plan(GenerationRequest("a fox <lora:style:0.5> <lora:ink:1>", seed=1)).params
    (lora,) = styled.loras
    assert lora == Lora("style", 0.5, generator.lora_library.sha256(lora_file(generator, "style")))


def lora_file(generator: Generator, name: str) -> Path:
    found = generator.lora_library.find(name)
    assert found is not None
    return found.path


def refusal(generator: Generator, prompt: str, negative: str | None = None) -> str:
    with pytest.raises(GenerationError) as caught:
        generator.generate(GenerationRequest(prompt, negative_prompt=negative, seed=1))
    return str(caught.value)


def test_unknown_loras_and_misplaced_tags_are_refused_with_one_sentence(generator: Generator) -> None:
    assert refusal(generator, "a fox <lora:oil>") == (
        "There is no LoRA “oil”; the LoRAs on offer are ink, style, wide, words."
    )
    assert refusal(generator, "a fox", "<lora:style>") == (
        "LoRAs go in the prompt, not the negative prompt; move the <lora:…> tag."
    )
    tags = " ".join(f"<lora:{name}>" for name in ("ink", "style", "words", "wide", "oil"))
    assert refusal(generator, tags) == "The prompt names 5 LoRAs; the limit is 4."


def test_a_lora_of_another_model_is_refused_and_leaves_the_pipeline_as_it_was(
    smoke_models: SmokeModels, generator: Generator, tmp_path: Path
) -> None:
    plain = pixels(generator, "a red fox")
    sentence = (
        "The LoRA “wide” was made for another model than this server's "
        "(its layers have other shapes than this model's); choose another."
    )
    assert refusal(generator, "a red fox <lora:wide:1>") == sentence
    adapters = {name for names in generator.pipe.get_list_adapters().values() for name in names}
    assert adapters == set(generator.loras.loaded)
    # Remembered: the next request is refused at planning, before it queues.
    with pytest.raises(GenerationError, match="was made for another model"):
        generator.plan(GenerationRequest("<lora:wide>"))
    assert largest_difference(pixels(generator, "a red fox"), plain) == 0
    # A LoRA whose metadata names another family is refused without loading it.
    library = LoraLibrary(tmp_path)
    metadata = {"ss_base_model_version": "sdxl_base_v1-0"}
    write_smoke_lora(smoke_models.generator, tmp_path / "xl.safetensors", seed=1, metadata=metadata)
    with pytest.raises(LoraError) as caught:
        library.resolve("<lora:xl>")
    assert str(caught.value) == (
        "The LoRA “xl” was made for another model than this server's (it was made for SDXL); choose another."
    )


def test_a_reroll_of_a_lora_that_changed_or_went_is_refused(
    smoke_models: SmokeModels, tmp_path: Path
) -> None:
    """A job's LoRA set pins its files: planned again after the file changed or was removed, it is refused
    with one sentence instead of being made with other weights."""
    folder = tmp_path / "loras"
    write_smoke_lora(smoke_models.generator, folder / "style.safetensors", seed=1, text_encoder=False)
    library = LoraLibrary(folder)
    prompt = "a fox <lora:style:0.7>"
    pinned = library.resolve(prompt)
    assert library.resolve(prompt, pinned=pinned) == pinned
    write_smoke_lora(smoke_models.generator, folder / "style.safetensors", seed=9, text_encoder=False)
    with pytest.raises(LoraError) as caught:
        library.resolve(prompt, pinned=pinned)
    assert str(caught.value) == (
        "The LoRA “style” has changed since this was made, so it cannot be made again the same; "
        "write the prompt anew to use the new file."
    )
    (folder / "style.safetensors").unlink()
    with pytest.raises(LoraError) as caught:
        library.resolve(prompt, pinned=pinned)
    assert str(caught.value) == (
        "The LoRA “style” this was made with is no longer on this server, so it cannot be made again."
    )


def test_fused_projections_are_set_aside_while_a_lora_runs(
    smoke_models: SmokeModels, base_settings: Settings, lora_dir: Path, generator: Generator
) -> None:
    """The fused attention reads fused weights a LoRA never reaches: with fusing on, a LoRA's images are
    the unfused pipeline's, and the fused processors come back for the batches without."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    unfused = load(
        smoke_models, dataclasses.replace(base_settings.generate, steps=3, fuse_qkv=False), lora_dir
    )
    prompt = "a red fox <lora:style:0.9> <lora:ink:0.4>"
    assert largest_difference(pixels(generator, prompt, 2), pixels(unfused, prompt, 2)) <= ROUNDING
    assert FusedAttnProcessor2_0 not in set(map(type, generator.pipe.unet.attn_processors.values()))
    pixels(generator, "a red fox")
    assert set(map(type, generator.pipe.unet.attn_processors.values())) == {FusedAttnProcessor2_0}


def test_the_cli_lists_loras_and_records_the_set_it_used(
    base_settings: Settings, lora_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[models]
preset = "smoke"
cache_dir = "{base_settings.models.cache_dir}"
device = "cpu"
lora_dir = "{lora_dir}"
[interrogate]
labels_dir = "{base_settings.interrogate.labels_dir}"
[generate]
steps = 2
width = 64
height = 64
min_side = 64
max_side = 128
""",
        encoding="utf-8",
    )
    assert main(["--config", str(config), "loras"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed == [
        "<lora:ink:1>  (sd1)  trigger words: ink wash, sumi-e",
        "<lora:style:1>  trigger words: red fox, winter, snow",
        "<lora:wide:1>",
        "<lora:words:1>",
    ]
    assert main(["--config", str(config), "generate", "a fox <lora:oil>", "--out", str(tmp_path / "o")]) == 2
    assert (
        "There is no LoRA “oil”; the LoRAs on offer are ink, style, wide, words." in capsys.readouterr().err
    )
    out = tmp_path / "out"
    assert (
        main(
            ["--config", str(config), "generate", "a fox <lora:style:0.5>", "--seed", "3", "--out", str(out)]
        )
        == 0
    )
    (record_file,) = out.glob("*.json")
    record = json.loads(record_file.read_text())
    sha = LoraLibrary(lora_dir).sha256(lora_dir / "style.safetensors")
    assert record["loras"] == [{"name": "style", "weight": 0.5, "sha256": sha}]
    assert record["prompt"] == "a fox <lora:style:0.5>"
    assert os.path.getsize(out / record["images"][0]["file"]) > 0


@pytest.mark.slow
def test_a_compiled_unet_runs_lora_batches_eager_and_the_others_compiled_as_before(
    smoke_models: SmokeModels,
    base_settings: Settings,
    lora_dir: Path,
    generator: Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The compiled UNet was traced without LoRA layers: a LoRA batch runs eager and makes the uncompiled
    pipeline's image; the next plain batch runs compiled again, on a UNet with the LoRA layers taken out."""
    from tests.test_acceleration import CountingBackend

    settings = dataclasses.replace(base_settings.generate, steps=3, compile="default", compile_buckets=[1])
    backend = CountingBackend()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(smoke_models.generator), dtype=torch.float32)
    compiled = Generator(pipe, settings, "smoke", loras=LoraLibrary(lora_dir), compile_backend=backend)
    buckets = compiled.buckets
    assert buckets is not None and buckets.failed is None
    calls: list[bool] = []
    original = compiled._pipeline_call

    def spy(params: Any, specs: Any, on_step: Any) -> Any:
        calls.append(compiled.pipe.unet is buckets.compiled)
        return original(params, specs, on_step)

    monkeypatch.setattr(compiled, "_pipeline_call", spy)
    try:
        plain = pixels(compiled, "a red fox")
        styled = pixels(compiled, "a red fox <lora:style:1>")
        again = pixels(compiled, "a red fox")
        assert calls == [True, False, True]
        assert largest_difference(styled, pixels(generator, "a red fox <lora:style:1>")) <= ROUNDING
        assert largest_difference(again, plain) == 0 and compiled.loras.loaded == ()
        assert backend.compiles == 1
    finally:
        torch._dynamo.reset()


def load_with_look(base_settings: Settings, lora_dir: Path, astronaut: Image.Image) -> Generator:
    """A fresh smoke generator with LoRAs and the look guide (its IP-Adapter), loaded as Engine.load does."""
    settings = dataclasses.replace(
        base_settings,
        generate=dataclasses.replace(base_settings.generate, steps=3),
        guides=GuideSettings(enabled=["look"]),
    )
    sources = resolve_models(settings)
    guides = load_guide_models(settings.guides, sources, CPU, torch.float32)
    made = Generator.load(
        sources.generator,
        settings.generate,
        CPU,
        dtype=torch.float32,
        guides=guides,
        loras=LoraLibrary(lora_dir),
    )
    assert made.offered_guides == ("look",) and made.fast_path == ["fused_qkv"]
    made.source_images.hold(ASTRONAUT, astronaut)
    return made


def made_with(generator: Generator, prompt: str, keep: str | None) -> list[np.ndarray]:
    request = GenerationRequest(
        prompt,
        count=2,
        seed=40,
        keep=parse_guides(keep) if keep else (),
        guide_source=ASTRONAUT if keep else None,
    )
    return [np.asarray(item.image, dtype=np.int16) for item in generator.generate(request).images]


def test_lora_and_look_compose_and_each_batch_is_made_as_in_a_fresh_engine(
    base_settings: Settings, lora_dir: Path, astronaut: Image.Image
) -> None:
    """LoRA and look both change the shared UNet's attention: a batch with both, then plain batches, then
    look alone, then the LoRA alone, then another LoRA first loaded with look, each makes the images a
    fresh engine makes of it alone; LoRA and look each act in the batch with both, and the fused
    processors are back, without the IP-Adapter's projection, for the plain batch at the end."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    cases = [
        ("a red fox <lora:style:0.9>", "look:0.8"),
        ("a red fox", None),
        ("a red fox", None),
        ("a red fox", "look:0.8"),
        ("a red fox <lora:style:0.9>", None),
        ("a red fox <lora:ink:0.7>", "look:0.8"),
        ("a red fox", None),
    ]
    alone = {case: made_with(load_with_look(base_settings, lora_dir, astronaut), *case) for case in cases}
    running = load_with_look(base_settings, lora_dir, astronaut)
    for case in cases:
        assert largest_difference(made_with(running, *case), alone[case]) <= ROUNDING, case
    both, plain, look, lora = (alone[cases[i]] for i in (0, 1, 3, 4))
    for other in (plain, look, lora):
        assert largest_difference(both, other) > 10 * ROUNDING
    unet = running.pipe.unet
    assert set(map(type, unet.attn_processors.values())) == {FusedAttnProcessor2_0}
    assert unet.encoder_hid_proj is None
