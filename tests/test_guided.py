"""Guided generation with the smoke models: each guide and weight has an effect, each image its own source."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from i2p2i_bot.config import GuideSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.generate import Generator
from i2p2i_bot.guided import GuidedPipelines, GuideModels, canny_edges, fit, load_guide_models
from i2p2i_bot.guides import parse_guides
from i2p2i_bot.models import resolve_models
from i2p2i_bot.request import GenerationError, GenerationRequest
from i2p2i_bot.smoke import SmokeModels
from i2p2i_bot.source_images import SourceImages

CPU = torch.device("cpu")
# Batched or alone, an image may round differently by a level or two of 255 (tests/test_generate.py).
BATCH_ROUNDING = 2
# A guide counts as having changed an image when the mean pixel moved by more than this (levels of 255).
CHANGED = 2.0
ALL = GuideSettings(enabled=["layout", "edges", "depth", "look"])


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


ASTRONAUT, CAT = sha("astronaut"), sha("cat")


@pytest.fixture(scope="module")
def guided(smoke_models: SmokeModels, base_settings: Settings, astronaut: Image.Image) -> Generator:
    """The smoke generator with every guide, loaded as Engine.load loads them, holding two sources."""
    import skimage.data

    settings = dataclasses.replace(base_settings, guides=ALL)
    sources = resolve_models(settings)
    guides = load_guide_models(settings.guides, sources, CPU, torch.float32)
    generator = Generator.load(sources.generator, settings.generate, CPU, dtype=torch.float32, guides=guides)
    generator.source_images.hold(ASTRONAUT, astronaut)
    generator.source_images.hold(CAT, Image.fromarray(skimage.data.chelsea()))
    return generator


def image(
    generator: Generator,
    keep: str | None,
    source: str = ASTRONAUT,
    prompt: str = "a red fox in snow",
    **options: Any,
) -> np.ndarray:
    request = GenerationRequest(
        prompt,
        seed=21,
        keep=parse_guides(keep) if keep else (),
        guide_source=source if keep else None,
        **options,
    )
    (made,) = generator.generate(request).images
    return np.asarray(made.image, dtype=np.int16)


def moved(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_the_guided_pipelines_share_the_resident_weights(guided: Generator) -> None:
    """Image-to-image and the ControlNet pipelines run the resident UNet, VAE and text encoder themselves:
    the only weights added are the ControlNets'; edges and depth together run both, in one
    MultiControlNetModel."""
    from diffusers.models import MultiControlNetModel

    assert guided.offered_guides == ("layout", "edges", "depth", "look")
    keeps = ("layout", "edges", "layout,edges", "depth", "depth,layout", "edges,depth", "edges,depth,layout")
    pipes = {keep: guided.guided.pipeline(parse_guides(keep)) for keep in keeps}
    assert [type(p).__mro__[1].__name__ for p in pipes.values()] == [
        "StableDiffusionImg2ImgPipeline",
        *["StableDiffusionControlNetPipeline", "StableDiffusionControlNetImg2ImgPipeline"] * 3,
    ]
    for pipe in pipes.values():
        for name in ("unet", "vae", "text_encoder", "tokenizer", "safety_checker"):
            assert getattr(pipe, name) is getattr(guided.pipe, name), name
    models = guided.guided.models
    assert pipes["edges"].controlnet is pipes["layout,edges"].controlnet is models.edges
    assert pipes["depth"].controlnet is pipes["depth,layout"].controlnet is models.depth
    assert models.depth is not models.edges
    for keep in ("edges,depth", "edges,depth,layout"):
        multi = pipes[keep].controlnet
        assert isinstance(multi, MultiControlNetModel)
        assert list(multi.nets) == [models.edges, models.depth]
    # Look with each of them: the same class, the same modules, and the IP-Adapter's image encoder.
    assert models.look is not None
    for keep, pipe in pipes.items():
        with_look = guided.guided.pipeline(parse_guides(f"{keep},look"))
        assert type(with_look) is type(pipe) and with_look.unet is guided.pipe.unet
        assert with_look.image_encoder is models.look.image_encoder and pipe.image_encoder is None
    assert type(guided.guided.pipeline(parse_guides("look"))).__mro__[1].__name__ == "StableDiffusionPipeline"


def test_each_guide_and_each_weight_changes_the_image(guided: Generator) -> None:
    """With one seed and prompt, each guide and each combination makes another image than the prompt
    alone, and two weights of a guide make two images."""
    plain = image(guided, None)
    singles = ("layout", "layout:0.9", "edges", "edges:1.6", "depth", "depth:1.6", "look", "look:1")
    made = {keep: image(guided, keep) for keep in singles}
    for keep in ("edges,layout", "depth,layout", "edges,depth", "edges,depth,layout"):
        made[keep] = image(guided, keep)
    for keep, pixels in made.items():
        assert moved(pixels, plain) > CHANGED, keep
    assert moved(made["layout"], made["layout:0.9"]) > CHANGED
    assert moved(made["edges"], made["edges:1.6"]) > CHANGED
    assert moved(made["depth"], made["depth:1.6"]) > CHANGED
    assert moved(made["look"], made["look:1"]) > CHANGED
    assert moved(made["edges,layout"], made["layout"]) > CHANGED
    assert moved(made["depth,layout"], made["layout"]) > CHANGED
    # Both ControlNets count: together they are neither one alone.
    assert moved(made["edges,depth"], made["edges"]) > CHANGED
    assert moved(made["edges,depth"], made["depth"]) > CHANGED
    assert moved(made["edges,depth,layout"], made["edges,layout"]) > CHANGED
    for keep in ("layout", "edges", "edges,depth,layout"):
        made[f"{keep},look"] = image(guided, f"{keep},look")
        assert moved(made[f"{keep},look"], made[keep]) > CHANGED, keep
    # The same request again is the same image: the guides add no randomness of their own.
    assert np.array_equal(image(guided, "edges,layout"), made["edges,layout"])
    assert np.array_equal(image(guided, "edges,depth"), made["edges,depth"])


@pytest.mark.parametrize("keep", ["edges:0", "depth:0", "edges:0,depth:0", "look:0", "depth:0,look:0"])
def test_a_guide_at_weight_zero_is_the_prompt_alone(guided: Generator, keep: str) -> None:
    """A ControlNet or look guide of weight 0 adds nothing: the image is the one the prompt alone makes
    (to the rounding a batch may differ by), while the same guide at its default is another image."""
    plain = image(guided, None)
    assert np.abs(image(guided, keep) - plain).max() <= BATCH_ROUNDING
    assert moved(image(guided, keep.replace(":0", "")), plain) > CHANGED


@pytest.mark.parametrize("keep", ["layout", "edges", "edges,layout"])
def test_guided_pipelines_read_weights_and_long_prompts(guided: Generator, keep: str) -> None:
    """Each guided pipeline takes the prompt embeddings: (word:1.0) is the plain image, (word:1.5) another,
    and the words of a long prompt past token 77 change the image."""
    plain = image(guided, keep)
    assert np.array_equal(image(guided, keep, prompt="a red (fox:1.0) in snow"), plain)
    assert not np.array_equal(image(guided, keep, prompt="a red (fox:1.5) in snow"), plain)
    words = " ".join(f"word{i}" for i in range(40))
    assert len(guided.pipe.tokenizer(words, verbose=False).input_ids) > 100
    red, blue = (image(guided, keep, prompt=f"{words} {tail}") for tail in ("red sails", "blue sails"))
    assert not np.array_equal(red, blue)


def test_layout_keeps_the_source_more_as_its_weight_falls(guided: Generator, astronaut: Image.Image) -> None:
    """Image-to-image starts from the source: the less may change, the closer the image is to it."""
    source = np.asarray(fit(astronaut, 64, 64), dtype=np.int16)
    distances = [moved(image(guided, f"layout:{w}", steps=10), source) for w in (0.2, 0.6, 1.0)]
    assert distances[0] < distances[1] < distances[2]


@pytest.mark.parametrize(
    "keep",
    [
        "layout",
        "edges",
        "edges:1.2,layout:0.7",
        "depth",
        "edges,depth",
        "edges,depth:1.4,layout",
        "look",
        "look:0.9,layout,edges",
    ],
)
def test_a_shared_batch_keeps_each_images_own_source(guided: Generator, keep: str) -> None:
    """Two members' images in one batch, from two sources: each is its own source's image made alone (to
    rounding), and not the other source's."""
    planned = [
        guided.plan(
            GenerationRequest("a red fox in snow", seed=21, keep=parse_guides(keep), guide_source=source)
        )
        for source in (ASTRONAUT, CAT)
    ]
    params = planned[0].params
    assert planned[1].params == params
    specs = [planned[0].spec(0), dataclasses.replace(planned[1].spec(0), prompt="a cat on a sofa")]
    together = guided.generate_batch(params, specs).images
    alone = [guided.generate_batch(params, [spec]).images[0] for spec in specs]
    swapped = [
        guided.generate_batch(params, [dataclasses.replace(spec, guide_source=other)]).images[0]
        for spec, other in zip(specs, (CAT, ASTRONAUT), strict=True)
    ]
    for batched, single, wrong in zip(together, alone, swapped, strict=True):
        pixels = np.asarray(batched.image, dtype=np.int16)
        assert np.abs(pixels - np.asarray(single.image, dtype=np.int16)).max() <= BATCH_ROUNDING
        # The other source's image is further off than any rounding.
        assert np.abs(pixels - np.asarray(wrong.image, dtype=np.int16)).max() > 4 * BATCH_ROUNDING


def test_the_control_image_is_the_canny_map_of_the_fitted_source(
    guided: Generator, astronaut: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ControlNet sees OpenCV's Canny edges (ControlNet's own annotator thresholds) of the source scaled
    to cover the image and centre-cropped; it is made once per source and size."""
    import cv2

    pipe = guided.guided.pipeline(parse_guides("edges"))
    seen: list[Any] = []
    original = type(pipe).__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["image"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    image(guided, "edges", width=128)
    image(guided, "edges", width=128)
    [[first], [second]] = seen
    assert first is second  # prepared once
    expected = cv2.Canny(np.asarray(fit(astronaut, 128, 64)), 100, 200)
    control = np.asarray(first)
    assert control.shape == (64, 128, 3) and set(np.unique(control)) <= {0, 255}
    assert np.array_equal(control[..., 0], expected) and np.array_equal(control[..., 2], expected)
    assert np.array_equal(np.asarray(canny_edges(fit(astronaut, 128, 64))), control)


def test_the_depth_map_is_the_estimators_depth_of_the_fitted_source(
    guided: Generator, astronaut: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The depth ControlNet sees the estimator's depth of the source scaled to cover the image and
    centre-cropped, brought to the image's size as transformers' own post-processing does and stretched
    over 0-255 (near bright), as ControlNet's MiDaS annotator does; it is made once per source and size,
    and another source has another map."""
    pipe = guided.guided.pipeline(parse_guides("depth"))
    seen: list[Any] = []
    original = type(pipe).__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["image"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    image(guided, "depth", width=128)
    image(guided, "depth", width=128)
    image(guided, "depth", source=CAT, width=128)
    [[first], [second], [cat]] = seen
    assert first is second  # prepared once

    estimator = guided.guided.models.depth_estimator
    assert estimator is not None
    fitted = fit(astronaut, 128, 64)
    with torch.inference_mode():
        outputs = estimator.model(**estimator.processor(images=fitted, return_tensors="pt"))
    [found] = estimator.processor.post_process_depth_estimation(outputs, target_sizes=[(64, 128)])
    depth = found["predicted_depth"].numpy().astype(np.float64)
    expected = np.round((depth - depth.min()) / (depth.max() - depth.min()) * 255)
    control = np.asarray(first, dtype=np.int16)
    assert control.shape == (64, 128, 3)
    assert np.array_equal(control[..., 0], control[..., 2])
    assert np.abs(control[..., 0] - expected).max() <= 1
    assert control.min() == 0 and control.max() == 255 and control.std() > 10
    assert moved(np.asarray(cat, dtype=np.int16), control) > 10


def test_a_source_no_longer_stored_is_one_sentence(guided: Generator) -> None:
    with pytest.raises(GenerationError) as info:
        image(guided, "layout", source=sha("gone"))
    assert str(info.value) == (
        "The source image these guides keep elements of is no longer stored; upload it again."
    )


def test_a_guide_whose_weights_are_missing_is_not_offered(
    base_settings: Settings, smoke_models: SmokeModels, caplog: pytest.LogCaptureFixture
) -> None:
    """An enabled ControlNet that is not on this machine: one log line, the other guides still offered,
    and a request for it refused in one sentence."""
    settings = dataclasses.replace(
        base_settings, guides=GuideSettings(enabled=["layout", "edges"], edges_model="someone/no-such-net")
    )
    sources = resolve_models(settings)
    assert sources.edges == str(smoke_models.edges)  # the smoke preset brings its own
    sources = dataclasses.replace(sources, edges="someone/no-such-net")
    with caplog.at_level(logging.WARNING, logger="i2p2i_bot.guided"):
        models = load_guide_models(settings.guides, sources, CPU, torch.float32)
    assert models.offered == ("layout",) and models.edges is None
    [line] = [r.getMessage() for r in caplog.records if r.name == "i2p2i_bot.guided"]
    assert line.startswith("the edges guide is not offered") and "someone/no-such-net" in line
    generator = Generator.load(sources.generator, settings.generate, CPU, guides=models)
    request = GenerationRequest("x", keep=parse_guides("edges"), guide_source=ASTRONAUT)
    with pytest.raises(GenerationError, match=r"does not offer the edges guide \(available: layout\)"):
        generator.plan(request)
    assert Generator.load(sources.generator, settings.generate, CPU).offered_guides == ()
    assert GuideModels().offered == ()


def test_depth_without_its_estimator_is_not_offered(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Depth needs its ControlNet and its depth estimator: with the estimator missing, one log line, depth
    not offered, its ControlNet not kept, and edges and layout still offered."""
    settings = dataclasses.replace(base_settings, guides=ALL)
    sources = dataclasses.replace(resolve_models(settings), depth_estimator="someone/no-such-estimator")
    with caplog.at_level(logging.WARNING, logger="i2p2i_bot.guided"):
        models = load_guide_models(settings.guides, sources, CPU, torch.float32)
    assert models.offered == ("layout", "edges", "look")
    assert models.depth is None and models.depth_estimator is None and "depth" not in models.recorded
    [line] = [r.getMessage() for r in caplog.records if r.name == "i2p2i_bot.guided"]
    assert line.startswith("the depth guide is not offered: its depth estimator could not be loaded")
    assert "someone/no-such-estimator" in line


def test_look_leaves_the_other_batches_as_they_were(guided: Generator) -> None:
    """The IP-Adapter is in the shared UNet only while a look batch runs: before and after one, the UNet
    has its own (fused) attention and no image projection, and a prompt-only or layout image is the one
    made before any look batch."""
    unet = guided.pipe.unet
    own = dict(unet.attn_processors)
    before = {keep: image(guided, keep) for keep in (None, "layout")}
    image(guided, "look:1,edges")
    assert dict(unet.attn_processors) == own and unet.encoder_hid_proj is None
    assert unet.config.encoder_hid_dim_type is None
    for keep, pixels in before.items():
        assert np.array_equal(image(guided, keep), pixels), keep


def test_look_feeds_each_image_its_own_sources_embedding(
    guided: Generator, astronaut: Image.Image, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look pipeline gets the image encoder's embedding of each image's own source (unconditional
    zeros first, as diffusers' encode_image makes them), made once per source, at the guide's weight as
    the IP-Adapter's scale."""
    pipe = guided.guided.pipeline(parse_guides("look"))
    seen: list[Any] = []
    original = type(pipe).__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        scales = {p.scale[0] for p in self.unet.attn_processors.values() if hasattr(p, "scale")}
        seen.append((kwargs["ip_adapter_image_embeds"], scales))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    planned = [
        guided.plan(GenerationRequest("a fox", seed=3, keep=parse_guides("look:0.7"), guide_source=source))
        for source in (ASTRONAUT, CAT, ASTRONAUT)
    ]
    guided.generate_batch(planned[0].params, [p.spec(0) for p in planned])
    [([embeds], scales)] = seen
    assert scales == {0.7}
    look = guided.guided.models.look
    assert look is not None
    pixels = look.processor(images=astronaut, return_tensors="pt").pixel_values
    with torch.inference_mode():
        expected = look.image_encoder(pixels).image_embeds[0]
    assert embeds.shape == (6, 1, expected.shape[0])
    assert torch.equal(embeds[:3], torch.zeros_like(embeds[:3]))
    assert torch.allclose(embeds[3, 0], expected) and torch.allclose(embeds[5, 0], expected)
    assert not torch.allclose(embeds[4, 0], expected)
    assert embeds[3, 0].data_ptr() == embeds[5, 0].data_ptr() or torch.equal(embeds[3], embeds[5])


def test_look_without_its_weights_is_not_offered(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """An IP-Adapter not on this machine: one log line, look not offered, the others still offered."""
    settings = dataclasses.replace(base_settings, guides=ALL)
    sources = dataclasses.replace(resolve_models(settings), look="someone/no-such-adapter")
    with caplog.at_level(logging.WARNING, logger="i2p2i_bot.guided"):
        models = load_guide_models(settings.guides, sources, CPU, torch.float32)
    assert models.offered == ("layout", "edges", "depth") and "look" not in models.recorded
    [line] = [r.getMessage() for r in caplog.records if r.name == "i2p2i_bot.guided"]
    assert line.startswith("the look guide is not offered: its IP-Adapter could not be loaded")
    assert "someone/no-such-adapter" in line


@pytest.fixture(scope="module")
def families(engine: Engine) -> Engine:
    """The session's engine in a copy (its sd2 and sdxl generators take turns there), whose generators
    read two sources held in memory."""
    import skimage.data

    shared = engine.sharing()
    shared.source_images = SourceImages()
    shared.source_images.hold(ASTRONAUT, Image.fromarray(skimage.data.astronaut()))
    shared.source_images.hold(CAT, Image.fromarray(skimage.data.chelsea()))
    return shared


def family_image(
    engine: Engine, preset: str, keep: str | None, source: str = ASTRONAUT, prompt: str = "a red fox in snow"
) -> np.ndarray:
    request = GenerationRequest(
        prompt,
        seed=21,
        steps=4,
        keep=parse_guides(keep) if keep else (),
        guide_source=source if keep else None,
        preset=preset,
    )
    (made,) = engine.generate(request).images
    return np.asarray(made.image, dtype=np.int16)


@pytest.mark.parametrize(
    ("preset", "stock"),
    [("sd2", "StableDiffusionImg2ImgPipeline"), ("sdxl", "StableDiffusionXLImg2ImgPipeline")],
)
def test_sd2_and_sdxl_keep_layout_with_their_own_image_to_image_pipeline(
    families: Engine, guided: Generator, preset: str, stock: str
) -> None:
    """SD 2.x and SDXL presets offer layout alone (edges, depth and look are SD 1.x weights, left out even
    where loaded), through their family's image-to-image pipeline over the resident modules, SD 2.x's
    v-prediction kept; a layout image is another than the prompt's alone at the same seed, each source
    makes its own, and two members' images in one batch keep their own sources."""
    assert families.guides_for(preset) == ("layout",)
    generator = families.generator_for(preset)
    assert generator.offered_guides == ("layout",)
    every = GuidedPipelines(generator.pipe, guided.guided.models, generator.source_images, family=preset)
    assert guided.offered_guides == ("layout", "edges", "depth", "look")
    assert every.models.offered == ("layout",) and every.models.recorded == {}
    pipe = generator.guided.pipeline(parse_guides("layout"))
    assert type(pipe).__mro__[1].__name__ == stock
    for name in ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        assert getattr(pipe, name, None) is getattr(generator.pipe, name, None), name

    plain = family_image(families, preset, None)
    kept = family_image(families, preset, "layout")
    assert moved(kept, plain) > CHANGED
    assert moved(kept, family_image(families, preset, "layout", CAT)) > CHANGED
    assert np.array_equal(family_image(families, preset, "layout"), kept)
    wanted = "v_prediction" if preset == "sd2" else "epsilon"
    assert pipe.scheduler.config.prediction_type == wanted  # the scheduler the batch ran

    planned = [
        families.plan(
            GenerationRequest(
                "a red fox", seed=21, keep=parse_guides("layout"), guide_source=s, preset=preset
            )
        )
        for s in (ASTRONAUT, CAT)
    ]
    params = planned[0].params
    assert planned[1].params == params
    specs = [planned[0].spec(0), planned[1].spec(0)]
    together = families.generate_batch(params, specs).images
    for spec, batched in zip(specs, together, strict=True):
        (single,) = families.generate_batch(params, [spec]).images
        difference = np.asarray(batched.image, dtype=np.int16) - np.asarray(single.image, dtype=np.int16)
        assert np.abs(difference).max() <= BATCH_ROUNDING
    assert moved(np.asarray(together[0].image, np.int16), np.asarray(together[1].image, np.int16)) > CHANGED


def test_an_sdxl_layout_batch_reads_prompt_weights(families: Engine) -> None:
    """SDXL's image-to-image takes the two-encoder prompt embeddings (pooled one included): (word:1.0) is
    the plain image, (word:1.5) another, and a weighted negative prompt runs too."""
    plain = family_image(families, "sdxl", "layout")
    assert np.array_equal(family_image(families, "sdxl", "layout", prompt="a red (fox:1.0) in snow"), plain)
    weighted = family_image(families, "sdxl", "layout", prompt="a red (fox:1.5) in snow")
    assert moved(weighted, plain) > 0
    request = GenerationRequest(
        "a (red:1.3) fox",
        negative_prompt="(blurry:1.4)",
        seed=21,
        keep=parse_guides("layout"),
        guide_source=CAT,
        preset="sdxl",
    )
    (made,) = families.generate(request).images
    assert made.image.size == (64, 64)


def test_a_bot_whose_default_model_is_sd2_loads_the_guides_with_its_first_sd1_generator(
    base_settings: Settings,
) -> None:
    """The edges ControlNet fits SD 1.x: a bot that loads an sd2 generator first does not load it then,
    yet offers edges to its SD 1.x preset from the start (its weights are on this machine), and loads it
    with the first SD 1.x generator, whose guided pipelines keep it; sd2 keeps layout alone."""
    models = dataclasses.replace(base_settings.models, default_preset="sd2")
    guides = GuideSettings(enabled=["layout", "edges"])
    sd2_first = Engine.load(dataclasses.replace(base_settings, models=models, guides=guides))
    assert sd2_first.resident_presets == ("sd2",)
    assert sd2_first.guides.edges is None
    assert sd2_first.guides_for("sd-v1-4") == ("layout", "edges")
    assert sd2_first.guides_for(None) == sd2_first.guides_for("sdxl") == ("layout",)
    sd1 = sd2_first.generator_for("sd-v1-4")
    assert sd1.offered_guides == ("layout", "edges") and sd2_first.guides.edges is not None
    assert sd2_first.guides.recorded == {"edges": "smoke:edges"}
    assert sd2_first.guides_for("sd-v1-4") == ("layout", "edges")
    edges = parse_guides("edges")
    request = GenerationRequest("a red fox", keep=edges, guide_source=CAT, preset="sd-v1-4")
    assert sd2_first.plan(request).keep == edges
