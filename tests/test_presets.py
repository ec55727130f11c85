"""Model presets: config, families, the single-file layout, and each family's pipeline on the smoke models."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from i2p2i_bot.config import ConfigError, PresetSettings, Settings, load_settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.gpu import resolve_max_resident
from i2p2i_bot.models import resolve_presets
from i2p2i_bot.presets import UnknownPreset, detect_family
from i2p2i_bot.request import GenerationError, GenerationRequest, upscale_fits
from i2p2i_bot.smoke import SmokeModels


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_config_without_presets_keeps_its_one_generator(tmp_path: Path) -> None:
    """An existing config names no preset: sd-v1-4 is its generator and CLIP, with [generate] unchanged."""
    settings = load_settings(
        write(tmp_path, '[models]\ngenerator = "my/sd15"\n[generate]\nsteps = 30\n'), env={}
    )
    presets = resolve_presets(settings)
    assert presets.names == ("sd-v1-4",) and presets.default == "sd-v1-4"
    (preset,) = presets
    assert (preset.generator, preset.family, preset.clip) == ("my/sd15", "sd1", "ViT-L-14/openai")
    assert preset.generate == settings.generate


def test_presets_take_their_familys_clip_size_and_their_own_defaults(tmp_path: Path) -> None:
    """sd2 pairs with ViT-H and 768, sdxl with ViT-L and 1024; a preset's steps and negative win; SDXL's
    default size is too large to upscale within the default cap."""
    text = """
[models]
default_preset = "xl"
[[models.presets]]
name = "sd21"
generator = "stabilityai/stable-diffusion-2-1"
[[models.presets]]
name = "xl"
generator = "some/checkpoint.safetensors"
family = "sdxl"
steps = 40
negative_prompt = "blurry"
"""
    presets = resolve_presets(load_settings(write(tmp_path, text), env={}))
    assert presets.names == ("sd-v1-4", "sd21", "xl") and presets.get(None).name == "xl"
    sd21, xl = presets.get("sd21"), presets.get("xl")
    assert (sd21.family, sd21.clip, sd21.generate.width, sd21.generate.max_side) == (
        "sd2",
        "ViT-H-14/laion2b_s32b_b79k",
        768,
        1152,
    )
    assert not sd21.safety_checker and not sd21.single_file
    assert (xl.family, xl.clip, xl.generate.width, xl.generate.steps) == ("sdxl", "ViT-L-14/openai", 1024, 40)
    assert xl.generate.negative_prompt == "blurry"
    assert xl.single_file and xl.config == "stabilityai/stable-diffusion-xl-base-1.0"
    assert presets.without_safety_checker() == ["sd21", "xl"]
    # Upscale's cap (generate.upscale_max_side, 1536) is the bot's, the size each preset's: SD 1.x's 512
    # and SD 2.x's 768 double within it, SDXL's 1024 does not (README, docs/guides.md).
    fits = {p.name: upscale_fits(p.generate.width, p.generate.height, p.generate) for p in presets}
    assert fits == {"sd-v1-4": True, "sd21": True, "xl": False}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[models]\ndefault_preset = "nope"\n', "models.default_preset 'nope' is not a preset"),
        ('[[models.presets]]\nname = "Big One"\ngenerator = "x"\n', "must be 1-32 lowercase"),
        (
            '[[models.presets]]\nname = "a"\ngenerator = "x"\n' * 2,
            "once",
        ),
        ('[[models.presets]]\nname = "a"\ngenerator = "x"\nfamily = "sd3"\n', "family must be one of"),
        ('[models]\npresets = ["a"]\n', "must be a list of tables"),
    ],
)
def test_bad_presets_stop_the_program_with_one_line(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load_settings(write(tmp_path, text), env={})


def test_an_unknown_preset_is_one_sentence_listing_the_others(base_settings: Settings) -> None:
    presets = resolve_presets(base_settings)
    with pytest.raises(UnknownPreset) as caught:
        presets.get("sd3")
    assert str(caught.value) == (
        "There is no model preset “sd3”; choose one of sd-v1-4, sd2, sdxl, sd1-file."
    )


def test_families_are_found_from_the_files(smoke_models: SmokeModels) -> None:
    """A folder's configs and a single file's tensor names say the family; a Hub id its name."""
    found = [detect_family(str(p)) for p in (smoke_models.generator, smoke_models.sd2, smoke_models.sdxl)]
    assert found == ["sd1", "sd2", "sdxl"]
    assert detect_family(str(smoke_models.single_file)) == "sd1"
    assert detect_family("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert detect_family("stabilityai/stable-diffusion-2-1") == "sd2"


def test_the_single_file_holds_the_same_weights_as_the_folder(smoke_models: SmokeModels) -> None:
    """The original-layout checkpoint, read by from_single_file with the folder as its config, gives back
    every weight of the diffusers folder it was written from."""
    from diffusers import StableDiffusionPipeline

    folder = StableDiffusionPipeline.from_pretrained(smoke_models.generator)
    single = StableDiffusionPipeline.from_single_file(
        str(smoke_models.single_file), config=str(smoke_models.generator), local_files_only=True
    )
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(folder, part).state_dict(), getattr(single, part).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), part


def test_each_family_loads_its_own_pipeline(engine: Engine) -> None:
    """SD 2.x keeps v-prediction in every scheduler it runs and has no safety checker; SDXL runs its own
    pipeline; only the presets in use stay loaded (models.max_resident is 1)."""
    engine = engine.sharing()  # swaps generators in a copy: the session's engine keeps its own
    sd2 = engine.generator_for("sd2")
    assert {s.config.prediction_type for s in sd2._schedulers.values()} == {"v_prediction"}
    assert sd2.pipe.safety_checker is None
    xl = engine.generator_for("sdxl")
    assert type(xl.pipe).__mro__[1].__name__ == "StableDiffusionXLPipeline"
    assert engine.resident_presets == ("sdxl",)
    assert engine.generator.pipe.safety_checker is not None  # sd-v1-4 is loaded again for its turn
    assert engine.resident_presets == ("sd-v1-4",)


def test_the_single_file_preset_makes_the_folders_images(engine: Engine) -> None:
    """The same weights make the same image whichever way they were stored; another family another."""
    engine = engine.sharing()

    def pixels(preset: str) -> torch.Tensor:
        request = GenerationRequest("a lighthouse", seed=5, steps=2, preset=preset)
        (made,) = engine.generate(request).images
        return torch.from_numpy(np.asarray(made.image).astype(np.float32))

    folder, single, sd2 = pixels("sd-v1-4"), pixels("sd1-file"), pixels("sd2")
    assert torch.equal(folder, single)
    assert not torch.equal(folder, sd2)


def test_a_plan_takes_the_presets_defaults_and_records_it(engine: Engine, base_settings: Settings) -> None:
    """A request for a preset is planned with that preset's settings and names it and its generator."""
    planned = engine.plan(GenerationRequest("a cat", preset="sd2"))
    assert (planned.preset, planned.model, planned.params.preset) == ("sd2", "smoke:generator-sd2", "sd2")
    assert engine.plan(GenerationRequest("a cat")).preset == "sd-v1-4"
    with pytest.raises(UnknownPreset):
        engine.plan(dataclasses.replace(planned, preset="gone"))


def test_a_preset_without_its_weights_is_refused_when_planned(
    engine: Engine, base_settings: Settings, smoke_models: SmokeModels, tmp_path: Path
) -> None:
    """A request for a preset whose checkpoint is not here is one sentence at once, not a failed job."""
    gone = PresetSettings(
        name="gone",
        generator=str(tmp_path / "gone.safetensors"),
        family="sd1",
        clip=str(smoke_models.clip),
        config=str(smoke_models.generator),
    )
    models = dataclasses.replace(base_settings.models, presets=[gone])
    other = engine.sharing(settings=dataclasses.replace(base_settings, models=models))
    with pytest.raises(GenerationError) as caught:
        other.plan(GenerationRequest("a cat", preset="gone"))
    assert str(caught.value) == (
        "The model preset “gone” is not on this machine yet; an admin can run `i2p2i download-models`."
    )
    assert other.plan(GenerationRequest("a cat", preset="sd2")).preset == "sd2"
    # A worker reports the presets it can run: those whose weights are here, looked for again each time it
    # asks, so a checkpoint copied in later counts without a restart.
    assert "gone" not in other.available_presets()
    assert {"sd-v1-4", "sd2"} <= set(other.available_presets())
    shutil.copy(smoke_models.single_file, tmp_path / "gone.safetensors")
    assert "gone" in other.available_presets()
    assert other.plan(GenerationRequest("a cat", preset="gone")).preset == "gone"


def _pixels(engine: Engine, preset: str) -> torch.Tensor:
    request = GenerationRequest("a lighthouse", seed=5, steps=2, preset=preset)
    (made,) = engine.generate(request).images
    return torch.from_numpy(np.asarray(made.image).astype(np.float32))


def test_an_offloaded_generator_comes_back_and_makes_the_same_pixels(
    engine: Engine, base_settings: Settings
) -> None:
    """Another preset moves the resident generator to CPU RAM; choosing it again brings that same
    generator back, not a fresh load, and it makes the same image; past models.max_offloaded the oldest
    one in CPU RAM is unloaded."""
    engine = engine.sharing()  # max_resident 0 is 1 on a CPU; max_offloaded is 1
    first = engine.generator_for(None)
    before = _pixels(engine, "sd-v1-4")
    engine.generator_for("sd2")
    assert (engine.resident_presets, engine.offloaded_presets) == (("sd2",), ("sd-v1-4",))
    assert first.pipe.device.type == "cpu"
    assert engine.generator_for(None) is first
    assert (engine.resident_presets, engine.offloaded_presets) == (("sd-v1-4",), ("sd2",))
    assert torch.equal(_pixels(engine, "sd-v1-4"), before)
    sd2 = engine._offloaded["sd2"]
    engine.generator_for("sd1-file")  # sd-v1-4 goes to CPU RAM, sd2 leaves it
    assert engine.offloaded_presets == ("sd-v1-4",)
    assert engine.generator_for("sd2") is not sd2


def test_max_offloaded_zero_unloads_as_before(engine: Engine, base_settings: Settings) -> None:
    """With models.max_offloaded = 0 a generator moved off is unloaded: choosing it again loads it anew."""
    models = dataclasses.replace(base_settings.models, max_offloaded=0)
    engine = engine.sharing(settings=dataclasses.replace(base_settings, models=models))
    first = engine.generator_for(None)
    engine.generator_for("sd2")
    assert engine.offloaded_presets == ()
    assert engine.generator_for(None) is not first


def test_max_resident_auto_follows_the_gpus_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """0 ('auto'): 1 on a CPU and on a GPU with 16 GB or less, 2 above; a number is taken as it is."""
    sizes = {"small": 16 * 1024**3, "large": 80 * 1024**3}
    chosen = ["small"]
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=sizes[chosen[0]])
    )
    cuda = torch.device("cuda")
    assert resolve_max_resident(0, torch.device("cpu")) == 1
    assert resolve_max_resident(0, cuda) == 1
    chosen[0] = "large"
    assert resolve_max_resident(0, cuda) == 2
    assert resolve_max_resident(3, cuda) == 3
