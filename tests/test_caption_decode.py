"""The fixed-shape greedy caption decoder gives transformers' generate() tokens, and steps aside where it
cannot."""

from __future__ import annotations

import contextlib
import random
from typing import Any

import pytest
import torch
from PIL import Image

from i2p2i_bot.caption_decode import GreedyCaptionDecoder, unsupported_caption_model
from i2p2i_bot.interrogate import Captioner
from i2p2i_bot.smoke import SmokeModels


def _pictures(count: int, size: int = 96) -> list[Image.Image]:
    """Rectangles of random colours on random backgrounds: different captions from a random model."""
    pictures = []
    for seed in range(count):
        rnd = random.Random(seed)
        image = Image.new("RGB", (size, size), tuple(rnd.randrange(256) for _ in range(3)))
        for _ in range(12):
            x, y = rnd.randrange(size), rnd.randrange(size)
            image.paste(tuple(rnd.randrange(256) for _ in range(3)), (x, y, x + size // 4, y + size // 4))
        pictures.append(image)
    return pictures


def _stock_tokens(captioner: Captioner, image: Image.Image, max_new_tokens: int) -> list[int]:
    inputs = captioner.processor(images=image, return_tensors="pt")
    with torch.inference_mode():
        out = captioner.model.generate(pixel_values=inputs["pixel_values"], max_new_tokens=max_new_tokens)
    return [int(t) for t in out[0]]


def _embeds(captioner: Captioner, image: Image.Image) -> torch.Tensor:
    inputs = captioner.processor(images=image, return_tensors="pt")
    with torch.inference_mode():
        return captioner.model.vision_model(pixel_values=inputs["pixel_values"])[0]


@pytest.fixture(scope="module")
def smoke_captioner(smoke_models: SmokeModels) -> Captioner:
    return Captioner.load(str(smoke_models.caption), torch.device("cpu"))


def _wider_blip() -> Any:
    """A BLIP whose decoder differs from the smoke one in every dimension the decoder reshapes by."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(0)
    config = BlipConfig(
        text_config={
            "vocab_size": 90,
            "hidden_size": 24,
            "intermediate_size": 40,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "encoder_hidden_size": 48,
            "max_position_embeddings": 64,
            "bos_token_id": 5,
            "pad_token_id": 0,
            "sep_token_id": 3,
            "eos_token_id": 3,
            "initializer_range": 0.3,
        },
        vision_config={
            "hidden_size": 48,
            "intermediate_size": 50,
            "num_hidden_layers": 2,
            "num_attention_heads": 3,
            "image_size": 32,
            "patch_size": 8,
            "initializer_range": 0.5,  # so the image, through cross-attention, steers the caption
        },
        projection_dim=16,
    )
    return BlipForConditionalGeneration(config).eval()


@pytest.mark.parametrize("max_new_tokens", [32, 5])
def test_tokens_equal_generate_on_the_smoke_blip(smoke_captioner: Captioner, max_new_tokens: int) -> None:
    decoder = GreedyCaptionDecoder(smoke_captioner.model, max_new_tokens)
    lengths = set()
    for image in _pictures(8):
        ours = decoder.decode(_embeds(smoke_captioner, image))
        assert ours == _stock_tokens(smoke_captioner, image, max_new_tokens)
        lengths.add(len(ours))
    if max_new_tokens == 5:
        assert lengths == {6}  # cut at the limit, as generate() cuts
    else:
        assert max(lengths) < 33  # these captions end with [SEP] before the limit


def test_tokens_equal_generate_on_another_shape_of_blip() -> None:
    model = _wider_blip()
    assert unsupported_caption_model(model) is None
    decoder = GreedyCaptionDecoder(model, 12)
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        pixels = torch.randn(1, 3, 32, 32)
        with torch.inference_mode():
            stock = [int(t) for t in model.generate(pixel_values=pixels, max_new_tokens=12)[0]]
            ours = decoder.decode(model.vision_model(pixel_values=pixels)[0])
        assert ours == stock
        seen.add(tuple(ours))
    assert len(seen) > 1  # the images led to different captions, so the comparison says something


def test_buffers_from_one_caption_do_not_leak_into_the_next() -> None:
    """One decoder, two images with different captions, in turn twice: each time each image's own tokens."""
    model = _wider_blip()
    decoder = GreedyCaptionDecoder(model, 12)
    images: dict[tuple[int, ...], torch.Tensor] = {}
    for seed in range(32):  # random weights caption many inputs alike: find two that differ
        torch.manual_seed(seed)
        pixels = torch.randn(1, 3, 32, 32)
        with torch.inference_mode():
            stock = tuple(int(t) for t in model.generate(pixel_values=pixels, max_new_tokens=12)[0])
            images.setdefault(stock, model.vision_model(pixel_values=pixels)[0])
        if len(images) == 2:
            break
    assert len(images) == 2, "no two inputs gave different captions"
    for _ in range(2):
        for tokens, embeds in images.items():
            assert decoder.decode(embeds) == list(tokens)


def test_the_captioner_uses_it_by_default_and_says_the_same(smoke_models: SmokeModels) -> None:
    fast = Captioner.load(str(smoke_models.caption), torch.device("cpu"))
    slow = Captioner.load(str(smoke_models.caption), torch.device("cpu"), fast=False)
    assert fast.decoder is not None and slow.decoder is None
    captions = [fast.caption(image) for image in _pictures(4)]
    assert captions == [slow.caption(image) for image in _pictures(4)]
    assert all(captions)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("num_beams", 3), ("repetition_penalty", 1.3), ("do_sample", True), ("min_length", 5)],
)
def test_a_generation_config_beyond_greedy_keeps_generate(
    smoke_models: SmokeModels, setting: str, value: object
) -> None:
    captioner = Captioner.load(str(smoke_models.caption), torch.device("cpu"))
    setattr(captioner.model.generation_config, setting, value)
    assert unsupported_caption_model(captioner.model) == f"its generation config sets {setting}={value!r}"
    again = Captioner(captioner.model, captioner.processor, torch.device("cpu"))
    assert again.decoder is None
    with pytest.raises(ValueError, match=setting):
        GreedyCaptionDecoder(captioner.model, 32)
    if setting != "do_sample":  # sampling differs per run; the others are deterministic
        image = _pictures(1)[0]
        expected = captioner.processor.batch_decode(
            [_stock_tokens(captioner, image, 32)], skip_special_tokens=True
        )[0]
        assert again.caption(image) == expected.strip()


def test_a_model_that_is_not_blip_is_refused() -> None:
    assert unsupported_caption_model(torch.nn.Linear(2, 2)) == "Linear is not BLIP"


class _StandInStream:
    """torch.cuda's streams on a CPU: work runs at once, so waiting for a stream is nothing."""

    def __init__(self, device: Any = None) -> None:
        self.waits = 0

    def wait_stream(self, other: Any) -> None:
        self.waits += 1


def _cpu_stand_ins_for_graph_capture(
    monkeypatch: pytest.MonkeyPatch, graph_error: Exception
) -> _StandInStream:
    """Streams that run on the CPU; a graph capture that raises graph_error."""
    current = _StandInStream()
    monkeypatch.setattr(torch.cuda, "Stream", _StandInStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: None)

    def refuse(graph: Any) -> Any:
        raise graph_error

    monkeypatch.setattr(torch.cuda, "graph", refuse)
    return current


@pytest.mark.parametrize("failing_warm_up_step", [None, 2])
def test_a_failed_graph_capture_leaves_the_caption_as_generate_makes_it(
    smoke_captioner: Captioner, monkeypatch: pytest.MonkeyPatch, failing_warm_up_step: int | None
) -> None:
    """A capture refused by the driver, or a warm-up step that raises in the middle, falls back to eager
    steps on buffers restored as they were: the caption equals generate()'s and graphs stay off."""
    current = _cpu_stand_ins_for_graph_capture(monkeypatch, RuntimeError("CUDA graphs are not supported"))
    decoder = GreedyCaptionDecoder(smoke_captioner.model, 32)
    decoder.graphs = True  # as on CUDA
    steps = 0
    step = decoder._step

    def counted(b: Any) -> None:
        nonlocal steps
        steps += 1
        step(b)  # the step runs, then (if chosen) the error comes, as from a kernel launched asynchronously
        if steps == failing_warm_up_step:
            raise RuntimeError("CUDA error: operation failed on the side stream")

    monkeypatch.setattr(decoder, "_step", counted)
    image = _pictures(1)[0]
    assert decoder.decode(_embeds(smoke_captioner, image)) == _stock_tokens(smoke_captioner, image, 32)
    assert decoder.graphs is False and current.waits == 1  # the current stream waited for the side stream


def test_out_of_memory_during_the_capture_fails_that_caption_and_the_next_one_tries_again(
    smoke_captioner: Captioner, monkeypatch: pytest.MonkeyPatch
) -> None:
    _cpu_stand_ins_for_graph_capture(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    decoder = GreedyCaptionDecoder(smoke_captioner.model, 32)
    decoder.graphs = True
    embeds = _embeds(smoke_captioner, _pictures(1)[0])
    with pytest.raises(torch.OutOfMemoryError):
        decoder.decode(embeds)
    assert decoder.graphs is True  # not given up for good: memory may be free next time
