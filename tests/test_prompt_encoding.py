"""Weighted and long prompts through the smoke pipeline: each changes what it should and nothing else."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from i2p2i_bot.engine import Engine
from i2p2i_bot.generate import Generator
from i2p2i_bot.prompt_encoding import PromptEncoder
from i2p2i_bot.request import GenerationRequest, ImageSpec

# Batched or alone, an image may round differently by a level or two of 255 (tests/test_generate.py).
BATCH_ROUNDING = 2


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def changed(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two images differ at all: one spec made twice the same way is the same to the bit
    (tests/test_generate.py), and the tiny text encoder moves the smoke UNet's images by a few levels."""
    return not np.array_equal(a, b)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def made(engine: Engine, prompt: str, negative: str = "", guidance: float | None = None) -> np.ndarray:
    request = GenerationRequest(prompt, negative_prompt=negative, seed=5, guidance=guidance)
    result = engine.generate(request)
    return pixels(result.images[0].image)


def long_prompt(tokenizer: Any, tail: str, tokens: int = 120) -> tuple[str, str]:
    """A prompt of `tokens` tokens (start and end not counted) whose words past the window end in `tail`,
    and the same prompt cut where the window ends."""
    words = " ".join(f"word{i}" for i in range(tokens))
    encoded = tokenizer(words, truncation=False, verbose=False, return_offsets_mapping=True)
    # Token 76 is the first past the window (token 0 is the start token).
    cut = words[: encoded.offset_mapping[76][0]].strip()
    long = words[: encoded.offset_mapping[tokens - 4][0]] + tail
    assert len(tokenizer(long, truncation=False, verbose=False).input_ids) > 100
    assert len(tokenizer(cut, verbose=False).input_ids) == 77
    return long, cut


def test_weight_one_gives_the_plain_image_and_other_weights_change_it(engine: Engine) -> None:
    """(word:1.0) is the plain word to the bit; (word:1.5) changes the image, more the further the weight
    is from 1; (word) is (word:1.1) and [word] (word:0.9091); a weighted negative prompt changes it too."""
    plain = made(engine, "a lighthouse at dusk")
    assert np.array_equal(made(engine, "a (lighthouse:1.0) at dusk"), plain)
    assert changed(made(engine, "a (lighthouse:1.5) at dusk"), plain)
    assert np.array_equal(made(engine, "a (lighthouse) at dusk"), made(engine, "a (lighthouse:1.1) at dusk"))
    lowered = made(engine, "a [lighthouse] at dusk")
    assert np.array_equal(lowered, made(engine, "a (lighthouse:0.9091) at dusk"))
    assert changed(made(engine, "a lighthouse", "(fog:1.5)"), made(engine, "a lighthouse", "fog"))
    # High guidance magnifies the text's pull on the tiny UNet.
    strong = made(engine, "a lighthouse at dusk", guidance=30)
    moved = [
        distance(made(engine, f"a (lighthouse:{weight}) at dusk", guidance=30), strong)
        for weight in (1.1, 1.5, 2, 3)
    ]
    assert 0 < moved[0] < moved[1] < moved[2] < moved[3], moved
    assert distance(made(engine, "a (lighthouse:0) at dusk", guidance=30), strong) > moved[1]


def test_words_past_the_window_change_the_image(engine: Engine) -> None:
    """A 120-token prompt is read whole: changing its words past token 77 changes the image, and it is not
    the image of the prompt cut at the window; nothing is reported as ignored."""
    tokenizer = engine.generator.pipe.tokenizer
    long, cut = long_prompt(tokenizer, "red sails")
    other, _ = long_prompt(tokenizer, "blue sails")
    result = engine.generate(GenerationRequest(long, seed=5))
    assert result.warnings == ()
    image = pixels(result.images[0].image)
    assert changed(image, made(engine, other))
    assert changed(image, made(engine, cut))
    # A long negative prompt is read whole too.
    assert changed(made(engine, "a boat", long), made(engine, "a boat", other))


def test_plain_prompts_make_the_stock_pipelines_images(engine: Engine) -> None:
    """A plain prompt within the window goes to the pipeline as text: the images are the stock pipeline's
    for the same texts and seeds, to the bit."""
    generator: Generator = engine.generator
    params = engine.plan(GenerationRequest("x", steps=3)).params
    specs = [ImageSpec("a red car", "", 21), ImageSpec("a blue house", "blurry", 22)]
    ours = generator.generate_batch(params, specs)
    pipe = generator.pipe
    with torch.inference_mode():
        stock = pipe(
            prompt=[s.prompt for s in specs],
            negative_prompt=[s.negative_prompt for s in specs],
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            generator=[torch.Generator("cpu").manual_seed(s.seed) for s in specs],
            width=params.width,
            height=params.height,
        )
    pipe.decoded = None
    for item, image in zip(ours.images, stock.images, strict=True):
        assert np.array_equal(pixels(item.image), pixels(image))


def test_a_shared_batch_keeps_each_images_own_prompt_syntax(engine: Engine) -> None:
    """Weighted, long and plain prompts of several members in one batch: each image is the one its spec
    makes alone, and long prompts do not share a pipeline call with one-window ones (padding would change
    them)."""
    generator = engine.generator
    long, _ = long_prompt(generator.pipe.tokenizer, "red sails")
    params = engine.plan(GenerationRequest("x")).params
    specs = [
        ImageSpec("a (red:1.5) car", "", 21),
        ImageSpec(long, "blurry", 22),
        ImageSpec("a blue house", "[blurry]", 23),
        ImageSpec("a red car", "", 24),
    ]
    assert [generator.prompts.windows(s) for s in specs] == [1, 2, 1, 1]
    batch = engine.generate_batch(params, specs)
    assert [i.spec for i in batch.images] == specs
    for item in batch.images:
        alone = engine.generate_batch(params, [item.spec]).images[0]
        assert np.abs(pixels(item.image) - pixels(alone.image)).max() <= BATCH_ROUNDING
    plain_red = engine.generate_batch(params, [ImageSpec("a red car", "", 21)]).images[0]
    assert changed(pixels(batch.images[0].image), pixels(plain_red.image))


@pytest.mark.parametrize("chunks", [True, False])
def test_only_a_text_encoder_that_cuts_reports_the_cut(engine: Engine, chunks: bool) -> None:
    """Past the window, an encoder that reads in windows says nothing; one that cuts quotes the ignored
    words, counted without the emphasis brackets."""
    pipe = engine.generator.pipe
    encoder = PromptEncoder(pipe, chunks=chunks)
    long, _ = long_prompt(pipe.tokenizer, "red sails")
    warnings = encoder.warnings(f"({long})")
    if chunks:
        assert warnings == []
        return
    (warning,) = warnings
    assert "Stable Diffusion reads only 75" in warning and "red sails”" in warning and "word0 " not in warning
    assert encoder.warnings("(short:1.2)") == []
    assert encoder.windows(ImageSpec(long, "", 1)) == 1


@pytest.fixture(scope="module")
def xl_engine(engine: Engine) -> Engine:
    """The session's engine with the smoke SDXL preset loaded, in a copy that keeps the session's own."""
    shared = engine.sharing()
    shared.generator_for("sdxl")
    return shared


def made_xl(engine: Engine, prompt: str, negative: str = "") -> np.ndarray:
    request = GenerationRequest(prompt, negative_prompt=negative, seed=5, steps=2, guidance=30, preset="sdxl")
    result = engine.generate(request)
    assert result.warnings == ()
    return pixels(result.images[0].image)


def test_sdxl_reads_emphasis_and_words_past_the_window(xl_engine: Engine) -> None:
    """SDXL's two encoders read emphasis and windows too, with no warning: (word:1.0) is the plain word to
    the bit, (word:1.5) and a weighted negative change the image, and a 120-token prompt's words past
    token 77 change it."""
    plain = made_xl(xl_engine, "a lighthouse at dusk")
    assert np.array_equal(made_xl(xl_engine, "a (lighthouse:1.0) at dusk"), plain)
    assert changed(made_xl(xl_engine, "a (lighthouse:1.5) at dusk"), plain)
    assert changed(made_xl(xl_engine, "a lighthouse", "(fog:1.5)"), made_xl(xl_engine, "a lighthouse", "fog"))
    tokenizer = xl_engine.generator_for("sdxl").pipe.tokenizer
    long, cut = long_prompt(tokenizer, "red sails")
    other, _ = long_prompt(tokenizer, "blue sails")
    image = made_xl(xl_engine, long)
    assert changed(image, made_xl(xl_engine, other))
    assert changed(image, made_xl(xl_engine, cut))


def test_sdxl_plain_and_weighted_prompts_beside_each_other(xl_engine: Engine) -> None:
    """A plain SDXL prompt gives the stock pipeline's image to the bit, alone (as text) or beside a
    weighted one (encoded for the pipeline): compel's SDXL embeddings of unweighted words, pooled one
    included, are the pipeline's own."""
    generator = xl_engine.generator_for("sdxl")
    params = xl_engine.plan(GenerationRequest("x", steps=2, preset="sdxl")).params
    specs = [ImageSpec("a red car", "", 21), ImageSpec("a blue house", "blurry", 22)]
    pipe = generator.pipe
    with torch.inference_mode():
        stock = pipe(
            prompt=[s.prompt for s in specs],
            negative_prompt=[s.negative_prompt for s in specs],
            num_inference_steps=params.steps,
            guidance_scale=params.guidance,
            generator=[torch.Generator("cpu").manual_seed(s.seed) for s in specs],
            width=params.width,
            height=params.height,
        )
    ours = generator.generate_batch(params, specs)
    for item, image in zip(ours.images, stock.images, strict=True):
        assert np.array_equal(pixels(item.image), pixels(image))
    mixed = generator.generate_batch(params, [*specs, ImageSpec("a (red:1.5) car", "", 21)])
    for item, image in zip(mixed.images, stock.images, strict=False):
        assert np.abs(pixels(item.image) - pixels(image)).max() <= BATCH_ROUNDING
    # The pooled embedding compel makes of unweighted words is the pipeline's.
    provider = generator.prompts._provider()
    with torch.inference_mode():
        encoded = pipe.encode_prompt(["a red car"], device=pipe.device, do_classifier_free_guidance=False)
        pooled = encoded[2]
        assert torch.equal(provider.get_pooled_embeddings(["a red car"], device=pipe.device), pooled)
