"""The command line end to end with the smoke models, on a real photograph."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from i2p2i_bot.cli import main
from i2p2i_bot.config import (
    DEFAULT_CAPTION,
    DEFAULT_CLIP,
    DEFAULT_DEPTH_ESTIMATOR,
    DEFAULT_DEPTH_MODEL,
    DEFAULT_EDGES_MODEL,
    DEFAULT_GENERATOR,
    DEFAULT_LOOK_MODEL,
    DEFAULT_LOOK_WEIGHTS,
    GenerateSettings,
    GuideSettings,
    Settings,
)
from i2p2i_bot.generate import Generator
from i2p2i_bot.images import NOT_AN_IMAGE
from i2p2i_bot.interrogate import Captioner, ClipEncoder
from i2p2i_bot.models import (
    DEPTH_ESTIMATOR_FILES,
    ModelSources,
    ModelUnavailable,
    download_models,
    quick_gelu_name,
    resolve_models,
)
from i2p2i_bot.prompt_edits import edit_prompt
from i2p2i_bot.smoke import SMOKE_WARNING, SmokeModels


@pytest.fixture
def config_file(base_settings: Settings, tmp_path: Path) -> Path:
    """A TOML file for the smoke models, short labels and 64-pixel images."""
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
data_dir = "{tmp_path / "data"}"
[models]
preset = "smoke"
cache_dir = "{base_settings.models.cache_dir}"
device = "cpu"
[interrogate]
labels_dir = "{base_settings.interrogate.labels_dir}"
min_flavors = 2
max_flavors = 6
[generate]
steps = 2
width = 64
height = 64
min_side = 64
max_side = 128
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def photos(tmp_path: Path, astronaut: Image.Image) -> Path:
    """A folder with two real photographs (PNG and JPEG) and a file that is not an image."""
    import skimage.data

    folder = tmp_path / "photos"
    folder.mkdir()
    astronaut.save(folder / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()).save(folder / "cat.jpg", quality=90)
    (folder / "notes.png").write_text("this is not an image")
    return folder


def test_imagine_from_writes_images_and_json(
    config_file: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """imagine-from PHOTO -n 2 writes two PNGs and a JSON record with prompts, seeds and fidelity."""
    out = tmp_path / "out"
    source = str(photos / "astronaut.png")
    options = ["-n", "2", "--seed", "77", "--mode", "fast", "--append", "oil painting", "--out", str(out)]
    code = main(["--config", str(config_file), "imagine-from", source, *options])
    assert code == 0
    record = json.loads((out / "astronaut.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.1.png", "astronaut.2.png", "astronaut.json"]
    assert record["mode"] == "fast"
    assert record["original_prompt"] == record["interrogation"]["prompt"]
    assert record["prompt"] == record["original_prompt"] + ", oil painting"
    assert (
        record["source_sha256"]
        == __import__("hashlib").sha256((photos / "astronaut.png").read_bytes()).hexdigest()
    )
    assert [i["seed"] for i in record["images"]] == [77, 78]
    assert record["params"] == {
        "steps": 2,
        "guidance": 7.5,
        "width": 64,
        "height": 64,
        "scheduler": "dpm",
        "preset": "sd-v1-4",
    }
    assert record["smoke"] is True and record["models"]["generator"] == "smoke:generator"
    for item in record["images"]:
        assert -1.0 <= item["fidelity"] <= 1.0 and item["nsfw"] is False
        with Image.open(out / item["file"]) as png:
            assert isinstance(png, PngImagePlugin.PngImageFile) and png.size == (64, 64)
            params = json.loads(png.text["parameters"])
        assert params["seed"] == item["seed"] and params["prompt"] == record["prompt"]
    fids = {i["file"]: i["fidelity"] for i in record["images"]}
    assert record["by_fidelity"] == sorted(fids, key=lambda f: -fids[f])
    assert "astronaut.json" in capsys.readouterr().out


def test_one_bad_file_does_not_stop_the_others(
    config_file: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder with a broken file: the good images are done, the bad one gets one line, exit code 1."""
    out = tmp_path / "out"
    code = main(
        [
            "--config",
            str(config_file),
            "-q",
            "imagine-from",
            str(photos),
            "--mode",
            "classic",
            "--out",
            str(out),
        ]
    )
    assert code == 1
    assert sorted(p.name for p in out.glob("*.json")) == ["astronaut.json", "cat.json"]
    err = capsys.readouterr().err
    err_lines = [line for line in err.splitlines() if "notes.png" in line]
    assert len(err_lines) == 1 and "not an image" in err_lines[0]
    assert "Traceback" not in err


def test_prompt_override(config_file: Path, photos: Path, tmp_path: Path) -> None:
    """--prompt replaces the interrogated prompt and is recorded as the edit."""
    out = tmp_path / "out"
    options = ["--prompt", "a tabby cat", "--out", str(out)]
    code = main(["--config", str(config_file), "imagine-from", str(photos / "cat.jpg"), *options])
    assert code == 0
    record = json.loads((out / "cat.json").read_text())
    assert record["prompt"] == "a tabby cat" and record["edits"]["prompt"] == "a tabby cat"
    assert record["original_prompt"] != "a tabby cat"
    assert len(record["images"]) == 1


@pytest.mark.parametrize("append", ["NSFW", "ＮＳＦＷ", "ns\u200bfw", "n\u0455fw"])
def test_banned_append_is_refused_before_loading(
    config_file: Path, photos: Path, capsys: pytest.CaptureFixture[str], append: str
) -> None:
    """Appending a banned term, plain or disguised, stops at once with one sentence naming it."""
    code = main(["--config", str(config_file), "imagine-from", str(photos), "--append", append])
    assert code == 2
    assert "banned terms (nsfw)" in capsys.readouterr().err


def test_describe_json_lines(
    config_file: Path, photos: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """describe --json prints one JSON object per readable image, with scored candidates, and never loads
    Stable Diffusion, which it does not use."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("describe loaded the generator")

    monkeypatch.setattr(Generator, "load", refuse)
    code = main(["--config", str(config_file), "describe", str(photos), "--mode", "candidates", "--json"])
    assert code == 1  # notes.png is not an image
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["source"]).name for r in rows] == ["astronaut.png", "cat.jpg"]
    for row in rows:
        assert row["models"] == {"clip": "smoke:clip", "caption": "smoke:caption"}
        assert [c["mode"] for c in row["candidates"]][-1] == "negative"
        assert all(-1 <= c["score"] <= 1 for c in row["candidates"])


def test_generate_command(config_file: Path, tmp_path: Path) -> None:
    """generate PROMPT -n 3 writes three images and a record; a second run into the same folder gets names
    of its own that no image number produces, and never overwrites the first."""
    out = tmp_path / "gen"
    for _ in range(2):
        options = ["-n", "3", "--seed", "5", "--out", str(out)]
        assert main(["--config", str(config_file), "generate", "A red kite!", *options]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "a-red-kite.1.png", "a-red-kite.2.png", "a-red-kite.3.png", "a-red-kite.json",
        "a-red-kite_2.1.png", "a-red-kite_2.2.png", "a-red-kite_2.3.png", "a-red-kite_2.json",
    ]  # fmt: skip
    for stem in ("a-red-kite", "a-red-kite_2"):
        record = json.loads((out / f"{stem}.json").read_text())
        assert [i["file"] for i in record["images"]] == [f"{stem}.{k}.png" for k in (1, 2, 3)]
        assert [i["seed"] for i in record["images"]] == [5, 6, 7]
        assert all(i["fidelity"] is None for i in record["images"])


def test_output_names_never_mix_records(
    config_file: Path, tmp_path: Path, astronaut: Image.Image, capsys: pytest.CaptureFixture[str]
) -> None:
    """Sources called chelsea, chelsea-2 and chelsea (again, as a JPEG), run twice into one folder: every
    image belongs to the record its name points to (the name up to its number), and to no other."""
    folder = tmp_path / "sources"
    folder.mkdir()
    small = astronaut.resize((64, 64))
    small.save(folder / "chelsea.png")
    small.save(folder / "chelsea-2.png")
    small.save(folder / "chelsea.jpg")
    out = tmp_path / "out"
    for _ in range(2):
        options = ["-n", "2", "--mode", "fast", "--prompt", "a cat", "--out", str(out)]
        assert main(["--config", str(config_file), "-q", "imagine-from", str(folder), *options]) == 0
    records = {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(records) == [
        "chelsea-2.json", "chelsea-2_2.json", "chelsea.json", "chelsea_2.json", "chelsea_3.json",
        "chelsea_4.json",
    ]  # fmt: skip
    owners: dict[str, list[str]] = {}
    for name, record in records.items():
        for item in record["images"]:
            owners.setdefault(item["file"], []).append(name)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 12 and sorted(owners) == pngs
    for png, listed_in in owners.items():
        assert listed_in == [png.rsplit(".", 2)[0] + ".json"]
    assert "i2p2i:" not in capsys.readouterr().err


@pytest.fixture
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a command loads a model: what it checks must be found before that."""
    from i2p2i_bot import cli

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the models were loaded")

    monkeypatch.setattr(cli, "_load_engine", refuse)
    monkeypatch.setattr(cli, "_load_interrogator", refuse)


@pytest.mark.parametrize(
    ("command", "code", "needle"),
    [
        (["describe", "{tmp}/missing.png"], 1, "missing.png: no such file or folder"),
        (["imagine-from", "{tmp}/missing.png"], 1, "missing.png: no such file or folder"),
        (["imagine-from", "{tmp}/empty"], 1, "empty: no images in this folder (files ending in .bmp, "),
        (["describe", "{tmp}/empty"], 1, "empty: no images in this folder"),
        (["imagine-from", "{tmp}/photos/notes.png"], 1, "notes.png: That file is not an image I can read"),
        (["generate", ""], 2, "The prompt is empty; write what the image should show."),
        (["generate", "\u200b\u00ad"], 2, "The prompt is empty; write what the image should show."),
        (["imagine-from", "{tmp}/photos", "--prompt", ""], 2, "The prompt is empty"),
        (["generate", "a kite", "--out", "{tmp}/photos/cat.jpg/x"], 2, "cat.jpg is a file, not a folder"),
        (["imagine-from", "{tmp}/photos", "--out", "{tmp}/photos/cat.jpg"], 2, "is a file, not a folder"),
    ],
)
def test_inputs_are_checked_before_the_models_load(
    command: list[str],
    code: int,
    needle: str,
    config_file: Path,
    photos: Path,
    tmp_path: Path,
    no_models: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A missing file, a folder without images, a file that is not an image, an empty prompt and an --out
    that cannot be a folder each end the command with one line before any model loads, and leave no --out
    folder behind: exit 1 for inputs, 2 for options."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in command]
    if argv[0] != "describe" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main(["--config", str(config_file), *argv]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("command", "line"),
    [
        (
            ["generate", "a fox", "--source", "{photos}/cat.jpg", "--keep", "pose"],
            "i2p2i: --keep: There is no guide called 'pose'; the guides are layout, edges, depth, look.",
        ),
        (
            ["generate", "a fox", "--source", "{photos}/cat.jpg", "--keep", "edges:2.5"],
            "i2p2i: --keep: The weight of edges must be in [0, 2] (got 2.5).",
        ),
        (
            ["imagine-from", "{photos}/cat.jpg", "--keep", "layout:0,edges"],
            "i2p2i: --keep: The weight of layout must be in (0, 1] (got 0).",
        ),
        (
            ["imagine-from", "{photos}/cat.jpg", "--keep", "layout:1,layout"],
            "i2p2i: --keep: The layout guide is named twice; give each guide once.",
        ),
        (
            ["generate", "a fox", "--keep", "edges"],
            "i2p2i: --keep needs a source image: give one with --source IMAGE",
        ),
        (
            ["generate", "a fox", "--source", "{photos}/cat.jpg"],
            "i2p2i: --source is the image --keep keeps elements of; add --keep NAME[:WEIGHT],...",
        ),
        (
            ["generate", "a fox", "--source", "{photos}/notes.png", "--keep", "layout"],
            f"i2p2i: --source {{photos}}/notes.png: {NOT_AN_IMAGE}",
        ),
        (
            ["generate", "a fox", "--source", "{photos}/cat.jpg", "--keep", "layout:0.1", "--steps", "4"],
            "i2p2i: With 4 steps, layout:0.1 leaves no step to take; raise the steps or the layout weight.",
        ),
        # The config enables layout alone.
        (
            ["imagine-from", "{photos}/cat.jpg", "--keep", "edges"],
            "i2p2i: This bot does not offer the edges guide (available: layout).",
        ),
        # Layout fits every model family.
        (
            ["generate", "a fox", "--model", "sdxl", "--source", "{photos}/cat.jpg", "--keep", "look"],
            "i2p2i: This bot does not offer the look guide (available: layout).",
        ),
    ],
)
def test_bad_guides_are_one_line_and_exit_2_before_the_models_load(
    command: list[str],
    line: str,
    config_file: Path,
    photos: Path,
    tmp_path: Path,
    no_models: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unknown guide, a weight out of range, a guide twice, --keep without a source (or a source without
    --keep, or one that is no image) and a guide the server does not offer: one line, exit 2, nothing
    loaded and nothing written."""
    argv = [arg.replace("{photos}", str(photos)) for arg in command] + ["--out", str(tmp_path / "out")]
    assert main(["--config", str(config_file), *argv]) == 2
    # The smoke models' warning is logged once per process, by whichever test reads their presets first.
    said = [text for text in capsys.readouterr().err.splitlines() if SMOKE_WARNING not in text]
    assert said == [line.replace("{photos}", str(photos))]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def guided_config(config_file: Path) -> Path:
    """config_file with both guides enabled."""
    with config_file.open("a", encoding="utf-8") as file:
        file.write('[guides]\nenabled = ["layout", "edges"]\n')
    return config_file


def test_generate_keeps_the_sources_elements_and_records_each_guide(
    guided_config: Path, photos: Path, tmp_path: Path
) -> None:
    """generate --source IMAGE --keep edges:0.9,layout makes other images than the prompt alone with the
    same seeds; the JSON and every PNG's parameters name each guide, its weight and the source."""
    source = photos / "cat.jpg"
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    common = ["--config", str(guided_config), "generate", "a fox", "-n", "2", "--seed", "9"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    kept = ["--source", str(source), "--keep", "edges:0.9,layout"]
    assert main([*common, *kept, "--out", str(tmp_path / "kept")]) == 0
    record = json.loads((tmp_path / "kept" / "a-fox.json").read_text())
    assert record["keep"] == [
        {"name": "layout", "weight": 0.6},
        {"name": "edges", "weight": 0.9, "model": "smoke:edges"},
    ]
    assert record["source"] == str(source) and record["source_sha256"] == sha
    assert "keep" not in record["params"]
    assert json.loads((tmp_path / "plain" / "a-fox.json").read_text())["keep"] == []
    for k in (1, 2):
        with Image.open(tmp_path / "kept" / f"a-fox.{k}.png") as png:
            assert isinstance(png, PngImagePlugin.PngImageFile)
            params = json.loads(png.text["parameters"])
            guided = np.asarray(png.convert("RGB"), dtype=np.int16)
        assert params["keep"] == [{"name": "layout", "weight": 0.6}, {"name": "edges", "weight": 0.9}]
        assert params["guide_source_sha256"] == sha and params["seed"] == 8 + k
        with Image.open(tmp_path / "plain" / f"a-fox.{k}.png") as png:
            assert isinstance(png, PngImagePlugin.PngImageFile)
            assert "keep" not in json.loads(png.text["parameters"])
            plain = np.asarray(png.convert("RGB"), dtype=np.int16)
        assert float(np.abs(guided - plain).mean()) > 2.0


def test_imagine_from_keeps_each_images_own_layout(guided_config: Path, photos: Path, tmp_path: Path) -> None:
    """imagine-from with --keep guides each image's images from that image: the record and PNGs name it."""
    out = tmp_path / "out"
    images = [str(photos / "astronaut.png"), str(photos / "cat.jpg")]
    options = ["--keep", "layout:0.8", "--mode", "fast", "--seed", "4", "--out", str(out)]
    assert main(["--config", str(guided_config), "-q", "imagine-from", *images, *options]) == 0
    for stem, name in (("astronaut", "astronaut.png"), ("cat", "cat.jpg")):
        record = json.loads((out / f"{stem}.json").read_text())
        sha = hashlib.sha256((photos / name).read_bytes()).hexdigest()
        assert record["source_sha256"] == sha and record["keep"] == [{"name": "layout", "weight": 0.8}]
        with Image.open(out / f"{stem}.1.png") as png:
            assert isinstance(png, PngImagePlugin.PngImageFile)
            assert json.loads(png.text["parameters"])["guide_source_sha256"] == sha


def test_bad_inputs_are_reported_before_the_models_load_and_the_rest_go_on(
    config_file: Path,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A typo among good files is reported before the models load (a full load with real weights), then
    the good files are done and the exit code is 1."""
    from i2p2i_bot import cli

    load = cli._load_engine
    said_before_loading: list[str] = []

    def spy(settings: Settings, progress: bool, preset: str | None) -> Any:
        said_before_loading.append(capsys.readouterr().err)
        return load(settings, progress, preset)

    monkeypatch.setattr(cli, "_load_engine", spy)
    out = tmp_path / "out"
    sources = [str(photos / "astronaut.png"), str(photos / "astronuat.png"), str(photos / "notes.png")]
    assert main(["--config", str(config_file), "-q", "imagine-from", *sources, "--out", str(out)]) == 1
    assert said_before_loading == [
        f"i2p2i: {photos / 'astronuat.png'}: no such file or folder\n"
        f"i2p2i: {photos / 'notes.png'}: {NOT_AN_IMAGE}\n"
    ]
    assert "i2p2i:" not in capsys.readouterr().err  # nothing more failed
    assert sorted(p.name for p in out.glob("*.json")) == ["astronaut.json"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["generate", "x", "-n", "99"], "The number of images must be between 1 and 8 (got 99)."),
        (["generate", "x", "--width", "65"], "The width must be a multiple of 8"),
    ],
)
def test_bad_options_are_one_line(
    config_file: Path, args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invalid generation options exit 2 with one line and no traceback."""
    assert main(["--config", str(config_file), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_bad_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config with an unknown key exits 2 naming the key."""
    path = tmp_path / "bad.toml"
    path.write_text("[generate]\nsteppes = 3\n")
    assert main(["--config", str(path), "describe", "x.png"]) == 2
    assert capsys.readouterr().err.strip() == "i2p2i: unknown setting generate.steppes"


def test_download_models_refuses_when_offline(capsys: pytest.CaptureFixture[str]) -> None:
    """download-models says plainly that HF_HUB_OFFLINE forbids downloads, instead of trying."""
    assert main(["download-models"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


# --- what download-models fetches ------------------------------------------------------------------------

# Exactly what the loaders read. Widening these puts gigabytes of unused weights on every install.
SD_FILES = [
    "model_index.json",
    "*/*.json",
    "*/*.txt",
    "*/diffusion_pytorch_model.safetensors",
    "*/model.safetensors",
]
BLIP_FILES = ["*.json", "*.txt", "model.safetensors", "model-*-of-*.safetensors"]
CLIP_FILE = ("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors")
# The real repositories' other copies of the weights, none of which a loader reads.
SD_UNUSED = [
    *(
        f"{c}/{w}"
        for c in ("unet", "vae")
        for w in ("diffusion_pytorch_model.bin", "diffusion_flax_model.msgpack")
    ),
    *(f"{c}/diffusion_pytorch_model.{v}.safetensors" for c in ("unet", "vae") for v in ("fp16", "non_ema")),
    *(
        f"{c}/{w}"
        for c in ("text_encoder", "safety_checker")
        for w in ("pytorch_model.bin", "flax_model.msgpack")
    ),
    *(f"{c}/model.fp16.safetensors" for c in ("text_encoder", "safety_checker")),
    "v1-variants-scores.jpg",
]
BLIP_UNUSED = ["pytorch_model.bin", "tf_model.h5", "README.md"]
CONTROLNET_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]
CONTROLNET_UNUSED = ["diffusion_pytorch_model.bin", "images/bird_canny.png", "README.md"]
# Intel/dpt-hybrid-midas also holds its pickled weights.
DEPTH_ESTIMATOR_UNUSED = ["pytorch_model.bin", "README.md"]
# h94/IP-Adapter also holds adapters for other models and pickled copies.
LOOK_UNUSED = [
    "models/ip-adapter_sd15.bin",
    "models/ip-adapter-plus_sd15.safetensors",
    "models/image_encoder/pytorch_model.bin",
    "sdxl_models/ip-adapter_sdxl.safetensors",
]


def default_sources() -> ModelSources:
    return ModelSources(DEFAULT_GENERATOR, DEFAULT_CLIP, DEFAULT_CAPTION)


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[Any]]:
    """Stand-ins for snapshot_download and open_clip's hf_hub_download that record what they are asked for
    (repository, allow_patterns, ignore_patterns); a snapshot holds one safetensors file per repository unless
    the repository id says "pickled"."""
    import huggingface_hub
    import open_clip.pretrained

    calls: dict[str, list[Any]] = {"snapshot": [], "file": []}

    def snapshot_download(
        repo_id: str,
        *,
        allow_patterns: list[str] | None = None,
        ignore_patterns: list[str] | None = None,
        **_: Any,
    ) -> str:
        calls["snapshot"].append((repo_id, allow_patterns, ignore_patterns))
        folder = tmp_path / "hub" / repo_id
        weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
        if "pickled" not in repo_id and not weights.exists():
            weights.parent.mkdir(parents=True)
            weights.write_bytes(b"")
            (folder / "model.safetensors").write_bytes(b"")
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    def hf_hub_download(repo_id: str, filename: str, **_: Any) -> str:
        calls["file"].append((repo_id, filename))
        return str(tmp_path / "hub" / repo_id / filename)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hf_hub_download)
    return calls


def test_download_models_fetches_only_what_the_loaders_read(hub_calls: dict[str, list[Any]]) -> None:
    """The default models: SD v1-4's and BLIP's safetensors weights with their configs and tokenizers (no
    fp16, pickled, Flax or TensorFlow copies), and the one CLIP file open_clip loads for ViT-L-14/openai."""
    lines = download_models(default_sources(), safety_checker=True)
    assert hub_calls["snapshot"] == [(DEFAULT_GENERATOR, SD_FILES, None), (DEFAULT_CAPTION, BLIP_FILES, None)]
    assert hub_calls["file"] == [CLIP_FILE]
    assert [line.split(":")[0] for line in lines] == ["generator", "caption", "clip"]
    assert lines[2].endswith("open_clip_model.safetensors")
    assert "safety checker" not in lines[0]


def test_download_models_fetches_a_guides_weights_only_when_it_is_enabled(
    hub_calls: dict[str, list[Any]],
) -> None:
    """[guides] enabled = ["layout", "edges"] adds the ControlNet's config and safetensors weights (no
    pickled copy, no example images); layout needs no weights, and by default nothing more is fetched."""
    assert resolve_models(Settings()).edges is None
    enabled = Settings(guides=GuideSettings(enabled=["layout", "edges"]))
    sources = resolve_models(enabled)
    assert sources.edges == DEFAULT_EDGES_MODEL
    lines = download_models(sources, safety_checker=True)
    # (The stand-in's snapshot holds no ControlNet weights, so the pickled copy is asked for next.)
    assert hub_calls["snapshot"][:3] == [
        (DEFAULT_GENERATOR, SD_FILES, None),
        (DEFAULT_CAPTION, BLIP_FILES, None),
        (DEFAULT_EDGES_MODEL, CONTROLNET_FILES, None),
    ]
    assert [line.split(":")[0] for line in lines] == ["generator", "caption", "edges", "clip"]


def test_download_models_fetches_depths_controlnet_and_estimator_when_depth_is_enabled(
    hub_calls: dict[str, list[Any]],
) -> None:
    """[guides] enabled = ["depth"] fetches the depth ControlNet and the depth estimator's configs and
    safetensors weights, and not the edges ControlNet."""
    sources = resolve_models(Settings(guides=GuideSettings(enabled=["depth"])))
    assert (sources.edges, sources.depth) == (None, DEFAULT_DEPTH_MODEL)
    assert sources.depth_estimator == DEFAULT_DEPTH_ESTIMATOR
    lines = download_models(sources, safety_checker=True)
    asked = [call for call in hub_calls["snapshot"] if call[0] not in (DEFAULT_GENERATOR, DEFAULT_CAPTION)]
    assert asked[0] == (DEFAULT_DEPTH_MODEL, CONTROLNET_FILES, None)
    assert (DEFAULT_DEPTH_ESTIMATOR, list(DEPTH_ESTIMATOR_FILES), None) in asked
    assert DEFAULT_EDGES_MODEL not in [call[0] for call in asked]
    labels = ["generator", "caption", "depth", "depth estimator", "clip"]
    assert [line.split(":")[0] for line in lines] == labels


def test_download_models_fetches_the_ip_adapter_and_its_image_encoder_when_look_is_enabled(
    hub_calls: dict[str, list[Any]],
) -> None:
    """[guides] enabled = ["look"] fetches ip-adapter_sd15's weights and the image encoder beside them,
    not the repository's adapters for other models."""
    sources = resolve_models(Settings(guides=GuideSettings(enabled=["look"])))
    assert (sources.look, sources.look_weights) == (DEFAULT_LOOK_MODEL, DEFAULT_LOOK_WEIGHTS)
    lines = download_models(sources, safety_checker=True)
    [look] = [call for call in hub_calls["snapshot"] if call[0] == DEFAULT_LOOK_MODEL][:1]
    assert look[1] == [
        "models/ip-adapter_sd15.safetensors",
        "models/image_encoder/config.json",
        "models/image_encoder/model.safetensors",
    ]
    assert [line.split(":")[0] for line in lines] == ["generator", "caption", "look", "clip"]


# The files of SD v1-4's repository that the patterns decide about, as the Hub lists them.
SD_LISTING = [
    "model_index.json",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/vocab.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    *SD_UNUSED,
]


def test_download_models_leaves_out_a_disabled_safety_checker(hub_calls: dict[str, list[Any]]) -> None:
    """With generate.safety_checker off, SD's safety_checker folder (1.2 GB) is not fetched and the line says
    so; every other file the loader reads, the feature extractor's config included, still is."""
    from huggingface_hub.utils import filter_repo_objects

    lines = download_models(default_sources(), safety_checker=False)
    assert hub_calls["snapshot"] == [
        (DEFAULT_GENERATOR, SD_FILES, ["safety_checker/*"]),
        (DEFAULT_CAPTION, BLIP_FILES, None),
    ]
    assert lines[0].endswith("(no safety checker: generate.safety_checker is off)")
    assert "safety checker" not in lines[1]
    _, allow, ignore = hub_calls["snapshot"][0]
    fetched = set(filter_repo_objects(SD_LISTING, allow_patterns=allow, ignore_patterns=ignore))
    assert fetched == {
        "model_index.json",
        "feature_extractor/preprocessor_config.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    }


@pytest.mark.parametrize("enabled", [True, False])
def test_download_models_command_follows_the_safety_checker_setting(
    enabled: bool,
    hub_calls: dict[str, list[Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`i2p2i download-models` passes generate.safety_checker from the config on to what it fetches."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    config = tmp_path / "config.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[generate]\nsafety_checker = {str(enabled).lower()}\n',
        encoding="utf-8",
    )
    assert main(["--config", str(config), "download-models"]) == 0
    assert hub_calls["snapshot"][0] == (
        DEFAULT_GENERATOR,
        SD_FILES,
        None if enabled else ["safety_checker/*"],
    )
    assert ("no safety checker" in capsys.readouterr().out) is not enabled


@pytest.mark.parametrize("safety_checker", [True, False])
def test_download_models_takes_pickled_weights_when_a_repository_has_no_safetensors(
    safety_checker: bool, hub_calls: dict[str, list[Any]]
) -> None:
    """A repository without safetensors weights gets a second, narrow fetch of the pickled ones, which also
    leaves out a disabled safety checker."""
    download_models(
        ModelSources("someone/pickled-sd", DEFAULT_CLIP, "someone/pickled-blip"),
        safety_checker=safety_checker,
    )
    ignored = None if safety_checker else ["safety_checker/*"]
    assert hub_calls["snapshot"] == [
        ("someone/pickled-sd", SD_FILES, ignored),
        ("someone/pickled-sd", ["*/diffusion_pytorch_model.bin", "*/pytorch_model.bin"], ignored),
        ("someone/pickled-blip", BLIP_FILES, None),
        (
            "someone/pickled-blip",
            ["pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"],
            None,
        ),
    ]


def cache_repository(cache: Path, repo_id: str, files: Mapping[str, Path | None]) -> Path:
    """Put files into a Hugging Face cache where the Hub's downloads put them (an empty file where the source
    is None); return the snapshot folder."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if source is None:
            (snapshot / name).touch()
        else:
            shutil.copyfile(source, snapshot / name)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def hub_repository(folder: Path, unused: list[str]) -> dict[str, Path | None]:
    """A repository as the Hub lists it: a model's files, plus copies of its weights no loader reads."""
    files: dict[str, Path | None] = dict.fromkeys(unused)
    files |= {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    return files


def serve_hub(cache: Path, repositories: dict[str, dict[str, Path | None]]) -> Any:
    """A snapshot_download that fills a Hugging Face cache the way the real one does: the files matching
    allow_patterns, and the repository's whole listing in the tree cache (which tells whether a snapshot is
    complete offline). A file with no source stands for weights no loader should read."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
    from huggingface_hub.utils import filter_repo_objects

    def snapshot_download(
        repo_id: str,
        *,
        allow_patterns: list[str] | None = None,
        ignore_patterns: list[str] | None = None,
        **_: Any,
    ) -> str:
        files = repositories[repo_id]
        chosen = list(
            filter_repo_objects(sorted(files), allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
        )
        for name in chosen:
            assert files[name] is not None, f"{repo_id}: {name} is fetched but no loader reads it"
        snapshot = cache_repository(cache, repo_id, {name: files[name] for name in chosen})
        entries = {name: TreeCacheEntry(size=1, blob_id="0" * 40) for name in files}
        write_tree_cache(str(snapshot.parent.parent), snapshot.name, entries)
        return str(snapshot)

    return snapshot_download


# Run first in a subprocess: any name lookup or connection ends it at once, with exit code 99.
REFUSE_NETWORK = """
import os, socket, sys
def refuse(*args, **kwargs):
    print("network attempt:", args[:2], file=sys.__stderr__, flush=True)
    os._exit(99)
real_connect = socket.socket.connect
def connect(sock, address):
    return real_connect(sock, address) if sock.family == socket.AF_UNIX else refuse(address)
socket.getaddrinfo = refuse
socket.socket.connect = connect
"""


def without_hub_settings(home: Path) -> dict[str, str]:
    """The environment with HF_HOME at home and neither HF_HUB_OFFLINE nor TRANSFORMERS_OFFLINE set."""
    env = {**os.environ, "HF_HOME": str(home)}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize("safety_checker", [True, False])
def test_what_download_models_fetches_loads_offline(
    safety_checker: bool, smoke_models: SmokeModels, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Served as the real repositories (their files, plus their unused copies of the weights), the fetched
    files are enough for the production loaders, the edges and depth guides' included, which then try no
    connection even with HF_HUB_OFFLINE unset; with the safety checker off, without its folder."""
    import huggingface_hub

    home = tmp_path / "hf"
    repositories = {
        DEFAULT_GENERATOR: hub_repository(smoke_models.generator, SD_UNUSED),
        DEFAULT_CAPTION: hub_repository(smoke_models.caption, BLIP_UNUSED),
        DEFAULT_EDGES_MODEL: hub_repository(smoke_models.edges, CONTROLNET_UNUSED),
        DEFAULT_DEPTH_MODEL: hub_repository(smoke_models.depth, CONTROLNET_UNUSED),
        DEFAULT_DEPTH_ESTIMATOR: hub_repository(smoke_models.depth_estimator, DEPTH_ESTIMATOR_UNUSED),
        DEFAULT_LOOK_MODEL: hub_repository(smoke_models.look, LOOK_UNUSED),
    }
    monkeypatch.setattr(huggingface_hub, "snapshot_download", serve_hub(home / "hub", repositories))
    sources = ModelSources(
        DEFAULT_GENERATOR,
        str(smoke_models.clip),
        DEFAULT_CAPTION,
        edges=DEFAULT_EDGES_MODEL,
        depth=DEFAULT_DEPTH_MODEL,
        depth_estimator=DEFAULT_DEPTH_ESTIMATOR,
        look=DEFAULT_LOOK_MODEL,
        look_weights=DEFAULT_LOOK_WEIGHTS,
    )
    lines = download_models(sources, safety_checker=safety_checker)
    snapshot = Path(lines[0].split(" → ")[1].split(" (")[0])
    assert (snapshot / "safety_checker").is_dir() is safety_checker

    script = REFUSE_NETWORK + (
        "import torch\n"
        "from i2p2i_bot.config import GenerateSettings\n"
        "from i2p2i_bot.generate import Generator\n"
        "from i2p2i_bot.interrogate import Captioner\n"
        "cpu = torch.device('cpu')\n"
        f"g = Generator.load({DEFAULT_GENERATOR!r}, GenerateSettings(safety_checker={safety_checker}), cpu)\n"
        f"assert (g.pipe.safety_checker is not None) is {safety_checker}\n"
        f"Captioner.load({DEFAULT_CAPTION!r}, cpu)\n"
        "from i2p2i_bot.config import GuideSettings\n"
        "from i2p2i_bot.guided import load_guide_models\n"
        "from i2p2i_bot.models import ModelSources\n"
        f"sources = {sources!r}\n"
        "enabled = GuideSettings(enabled=['edges', 'depth', 'look'])\n"
        "guides = load_guide_models(enabled, sources, cpu, torch.float32)\n"
        "assert guides.offered == ('edges', 'depth', 'look'), guides.offered\n"
        "from i2p2i_bot.guided import GuidedPipelines\n"
        "from i2p2i_bot.source_images import SourceImages\n"
        "GuidedPipelines(g.pipe, guides, SourceImages())\n"
        "print('loaded')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=without_hub_settings(home),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("loaded")


# --- loading never downloads ------------------------------------------------------------------------------

CPU = torch.device("cpu")
NOT_DOWNLOADED = "; run `i2p2i download-models`"


@pytest.mark.parametrize(
    ("model", "line"),
    [
        ("generator", f"Not downloaded: Stable Diffusion {DEFAULT_GENERATOR}{NOT_DOWNLOADED}"),
        ("clip", f"Not downloaded: CLIP {DEFAULT_CLIP}{NOT_DOWNLOADED}"),
        ("caption", f"Not downloaded: BLIP {DEFAULT_CAPTION}{NOT_DOWNLOADED}"),
    ],
    ids=("generator", "clip", "caption"),
)
def test_a_model_missing_from_the_cache_is_one_line_and_no_connection(
    model: str, line: str, no_network: Path
) -> None:
    """With an empty cache and the Hub's offline switch off, each loader fails at once with one short line
    that names its model and `i2p2i download-models`, and tries no connection."""
    loaders = {
        "generator": lambda: Generator.load(DEFAULT_GENERATOR, GenerateSettings(), CPU),
        "clip": lambda: ClipEncoder.load(DEFAULT_CLIP, CPU),
        "caption": lambda: Captioner.load(DEFAULT_CAPTION, CPU),
    }
    with pytest.raises(ModelUnavailable) as raised:
        loaders[model]()
    assert str(raised.value) == line


def test_a_partly_downloaded_model_is_named_so(
    smoke_models: SmokeModels, no_network: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetched with the safety checker off, Stable Diffusion is incomplete for a loader that wants the
    checker: one line says so; with the checker off it loads from the cache."""
    import huggingface_hub

    with monkeypatch.context() as patch:
        repositories = {DEFAULT_GENERATOR: hub_repository(smoke_models.generator, SD_UNUSED)}
        patch.setattr(huggingface_hub, "snapshot_download", serve_hub(no_network, repositories))
        download_models(
            ModelSources(DEFAULT_GENERATOR, str(smoke_models.clip), str(smoke_models.caption)),
            safety_checker=False,
        )
    with pytest.raises(ModelUnavailable) as raised:
        Generator.load(DEFAULT_GENERATOR, GenerateSettings(safety_checker=True), CPU)
    assert str(raised.value) == (
        f"Not downloaded: Stable Diffusion {DEFAULT_GENERATOR} (in part){NOT_DOWNLOADED}"
    )
    generator = Generator.load(DEFAULT_GENERATOR, GenerateSettings(safety_checker=False), CPU)
    assert generator.pipe.safety_checker is None


def test_the_clip_loader_reads_the_file_download_models_fetches(
    hub_calls: dict[str, list[Any]], no_network: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For ViT-L-14/openai, download-models fetches one file into the cache, and the loader hands that file
    to open_clip with the tag's preprocessing."""
    import open_clip.pretrained

    from i2p2i_bot.models import clip_files

    def hf_hub_download(repo_id: str, filename: str, **_: Any) -> str:
        hub_calls["file"].append((repo_id, filename))
        return str(cache_repository(no_network, repo_id, {filename: None}) / filename)

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", hf_hub_download)
    lines = download_models(default_sources(), safety_checker=True)
    assert hub_calls["file"] == [CLIP_FILE]
    files = clip_files(DEFAULT_CLIP)
    assert lines[2] == f"clip: {DEFAULT_CLIP} → {files.pretrained}"
    assert (files.model_name, files.image_interpolation, files.image_resize_mode) == (
        "ViT-L-14",
        "bicubic",
        "shortest",
    )
    assert files.quick_gelu  # OpenAI trained these weights with QuickGELU
    assert quick_gelu_name(DEFAULT_CLIP) == "ViT-L-14-quickgelu/openai"  # what results record


def test_a_cached_pretrained_tag_builds_what_open_clip_builds_from_the_tag(
    smoke_models: SmokeModels, no_network: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ARCH/TAG is built from the cached weights file and the tag's preprocessing, exactly as open_clip builds
    it from the tag itself: here a tiny registered model whose tag has non-default preprocessing."""
    import open_clip
    import open_clip.factory
    import open_clip.pretrained

    config = json.loads((smoke_models.clip / "open_clip_config.json").read_text())
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "i2p2i-tiny", config["model_cfg"])
    tag = {
        "url": "",
        "hf_hub": "someone/tiny-clip/",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "interpolation": "bilinear",
        "resize_mode": "squash",
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "i2p2i-tiny", {"test": tag})
    weights = smoke_models.clip / "open_clip_model.safetensors"
    snapshot = cache_repository(no_network, "someone/tiny-clip", {weights.name: weights})

    ours = ClipEncoder.load("i2p2i-tiny/test", CPU)
    monkeypatch.setattr(
        open_clip.pretrained, "hf_hub_download", lambda repo_id, filename, **_: str(snapshot / filename)
    )
    stock, _, stock_preprocess = open_clip.create_model_and_transforms("i2p2i-tiny", pretrained="test")

    assert ours.model.visual.preprocess_cfg == stock.visual.preprocess_cfg
    assert ours.model.visual.preprocess_cfg["resize_mode"] == "squash"
    assert repr(ours.preprocess) == repr(stock_preprocess)
    image = Image.new("RGB", (96, 64), (200, 40, 90))
    with torch.inference_mode():
        expected = stock.eval().encode_image(stock_preprocess(image)[None]).float()
    torch.testing.assert_close(ours.encode_images([image]), expected / expected.norm(dim=-1, keepdim=True))


def test_weights_trained_with_quick_gelu_are_built_with_it(
    smoke_models: SmokeModels, no_network: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag trained with QuickGELU (as OpenAI's are) builds its model with QuickGELU, which open_clip 3 only
    warns about when it is handed the tag: with plain GELU the same weights give other embeddings."""
    import open_clip
    import open_clip.factory
    import open_clip.pretrained
    from open_clip.transformer import QuickGELU

    config = json.loads((smoke_models.clip / "open_clip_config.json").read_text())
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "i2p2i-tiny", config["model_cfg"])
    tag = {"url": "", "hf_hub": "someone/tiny-clip/", "quick_gelu": True}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "i2p2i-tiny", {"quick": tag})
    weights = smoke_models.clip / "open_clip_model.safetensors"
    snapshot = cache_repository(no_network, "someone/tiny-clip", {weights.name: weights})
    monkeypatch.setattr(
        open_clip.pretrained, "hf_hub_download", lambda repo_id, filename, **_: str(snapshot / filename)
    )

    ours = ClipEncoder.load("i2p2i-tiny/quick", CPU)
    activations = {type(m) for m in ours.model.modules() if "GELU" in type(m).__name__}
    assert activations == {QuickGELU}
    trained, _, preprocess = open_clip.create_model_and_transforms(
        "i2p2i-tiny", pretrained="quick", force_quick_gelu=True
    )
    stock, _, _ = open_clip.create_model_and_transforms("i2p2i-tiny", pretrained="quick")
    image = Image.new("RGB", (64, 64), (30, 160, 90))
    with torch.inference_mode():
        right = trained.eval().encode_image(preprocess(image)[None]).float()
        wrong = stock.eval().encode_image(preprocess(image)[None]).float()
    torch.testing.assert_close(ours.encode_images([image]), right / right.norm(dim=-1, keepdim=True))
    assert not torch.allclose(right, wrong)


def test_an_hf_hub_clip_and_its_tokenizer_load_from_the_cache(
    smoke_models: SmokeModels, no_network: Path, tmp_path: Path
) -> None:
    """hf-hub:ID reads its config and weights from the cache, and the Hugging Face tokenizer its config names
    from that tokenizer's cached folder; without the tokenizer it is one line naming both."""
    config = json.loads((smoke_models.clip / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = "someone/tiny-tokenizer"
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    weights = smoke_models.clip / "open_clip_model.safetensors"
    cache_repository(
        no_network,
        "someone/tiny-clip",
        {"open_clip_config.json": tmp_path / "open_clip_config.json", weights.name: weights},
    )
    with pytest.raises(ModelUnavailable) as raised:
        ClipEncoder.load("hf-hub:someone/tiny-clip", CPU)
    assert str(raised.value) == (
        "Not downloaded: CLIP hf-hub:someone/tiny-clip (its tokenizer someone/tiny-tokenizer)"
        + NOT_DOWNLOADED
    )

    tokenizer = {name: smoke_models.caption / name for name in ("tokenizer.json", "tokenizer_config.json")}
    cache_repository(no_network, "someone/tiny-tokenizer", tokenizer)
    clip = ClipEncoder.load("hf-hub:someone/tiny-clip", CPU)
    assert type(clip.tokenizer).__name__ == "HFTokenizer"
    assert clip.tokenize(["a red house"]).shape == (1, 77)
    image = Image.new("RGB", (64, 64), (10, 120, 200))
    torch.testing.assert_close(
        clip.encode_images([image]), ClipEncoder.load(str(smoke_models.clip), CPU).encode_images([image])
    )


def test_the_command_line_names_missing_models_in_one_line_without_a_connection(tmp_path: Path) -> None:
    """With no weights fetched and HF_HUB_OFFLINE unset, `generate` (which loads what the bot loads) and
    `describe` fail in one short line each naming the missing models and `i2p2i download-models`, with exit
    code 2 and no connection tried."""
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[models]\ndevice = "cpu"\n', encoding="utf-8")
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    script = REFUSE_NETWORK + (
        "import contextlib, io, json\n"
        "from i2p2i_bot.cli import main\n"
        "results = {}\n"
        f"for command in (['generate', 'a kite'], ['describe', {str(tmp_path / 'photo.png')!r}]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        f"        code = main(['--config', {str(config)!r}, *command])\n"
        "    results[command[0]] = [code, err.getvalue()]\n"
        "print(json.dumps(results))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=without_hub_settings(tmp_path / "hf"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.splitlines()[-1])
    sd = f"Stable Diffusion {DEFAULT_GENERATOR}"
    clip, blip = f"CLIP {DEFAULT_CLIP}", f"BLIP {DEFAULT_CAPTION}"
    assert results == {
        "generate": [2, f"i2p2i: Not downloaded: {sd}, {clip}, {blip}{NOT_DOWNLOADED}\n"],
        "describe": [2, f"i2p2i: Not downloaded: {clip}, {blip}{NOT_DOWNLOADED}\n"],
    }
    assert len(results["generate"][1]) < 200


def test_no_progress_bars_in_a_log(config_file: Path, base_settings: Settings, tmp_path: Path) -> None:
    """With stderr going to a file or a pipe, even `--verbose` writes log lines only: the label table's
    progress, but none of the libraries' progress bars with their carriage returns and escape codes."""
    labels = tmp_path / "labels"
    shutil.copytree(str(base_settings.interrogate.labels_dir), labels)
    with (labels / "flavors.txt").open("a", encoding="utf-8") as flavors:
        flavors.write(f"{tmp_path.name}\n")  # a list no other test has embedded: the table is built here
    config = tmp_path / "labels.toml"
    config.write_text(
        config_file.read_text().replace(str(base_settings.interrogate.labels_dir), str(labels)), "utf-8"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "i2p2i_bot", "-v", "--config", str(config), "generate", "a kite",
         "--out", str(out)],
        capture_output=True, timeout=300, check=False,
    )  # fmt: skip
    err = done.stderr.decode(errors="replace")  # bytes as written: text mode would turn "\r" into "\n"
    assert done.returncode == 0, err[-3000:]
    assert "\r" not in err and "\x1b[" not in err and "%|" not in err, err[-3000:]
    assert "Loading pipeline components" not in err and "Loading weights" not in err
    assert "building the label table: embedding " in err and "label table built: " in err
    assert (out / "a-kite.json").exists()


def test_module_entry_point() -> None:
    """`python -m i2p2i_bot --help` lists the commands."""
    out = subprocess.run(
        [sys.executable, "-m", "i2p2i_bot", "--help"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    for command in ("describe", "generate", "imagine-from", "download-models"):
        assert command in out


@pytest.mark.parametrize(
    ("prompt", "append", "remove", "expected"),
    [
        ("a cat, highly detailed, 4k", None, ["4k"], "a cat, highly detailed"),
        ("a cat, highly detailed, 4k", "oil", ["Highly Detailed"], "a cat, 4k, oil"),
        ("a black cat on a black mat", None, ["black"], "a cat on a mat"),
        ("a cat, blackness", None, ["black"], "a cat, blackness"),
        ("a cat", ", watercolor,", [], "a cat, watercolor"),
    ],
)
def test_edit_prompt(prompt: str, append: str | None, remove: list[str], expected: str) -> None:
    """Removed terms go as whole words or whole parts; appended text joins with a comma."""
    assert edit_prompt(prompt, append=append, remove=remove) == expected


def test_global_options_work_after_the_command(
    base_settings: Settings, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`imagine-from PHOTO -n 2 --models smoke --out DIR` (options after the command) writes 2 PNGs + JSON."""
    monkeypatch.setenv("I2P2I_CACHE_DIR", base_settings.models.cache_dir)
    monkeypatch.setenv("I2P2I_DATA_DIR", str(tmp_path / "data"))
    config = tmp_path / "small.toml"
    labels = base_settings.interrogate.labels_dir
    config.write_text(
        f'[interrogate]\nlabels_dir = "{labels}"\n'
        "[generate]\nsteps = 2\nwidth = 64\nheight = 64\nmin_side = 64\n"
    )
    out = tmp_path / "out"
    photo = str(photos / "astronaut.png")
    assert (
        main(
            [
                "imagine-from",
                photo,
                "-n",
                "2",
                "--models",
                "smoke",
                "--out",
                str(out),
                "--config",
                str(config),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.1.png", "astronaut.2.png", "astronaut.json"]
    assert json.loads((out / "astronaut.json").read_text())["smoke"] is True


def test_operations_commands_skip_the_model_libraries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`health` and `backup` are listed in --help and never set up the model libraries (health runs often)."""
    from i2p2i_bot import cli

    help_text = cli.build_parser().format_help()
    assert "health" in help_text and "backup" in help_text

    def forbidden() -> None:
        raise AssertionError("an operations command set up the model libraries")

    monkeypatch.setattr(cli, "_quiet_libraries", forbidden)
    monkeypatch.setenv("I2P2I_DATA_DIR", str(tmp_path / "data"))
    assert main(["health"]) == 1
    assert main(["backup", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("i2p2i: unhealthy: no heartbeat file at ")
    assert err[1] == f"i2p2i: there is no database at {tmp_path / 'data' / 'i2p2i.sqlite3'}"


def test_operations_commands_never_import_torch(tmp_path: Path) -> None:
    """`i2p2i health` runs every 30 s in Docker: in a fresh interpreter it must not pay for torch."""
    script = (
        "import sys\n"
        "from i2p2i_bot.cli import main\n"
        f"codes = [main(['health', '--file', {str(tmp_path / 'health.json')!r}]),\n"
        f"         main(['backup', {str(tmp_path)!r}])]\n"
        "heavy = ('torch', 'diffusers', 'open_clip', 'transformers')\n"
        "print(codes, sorted(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "I2P2I_DATA_DIR": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "[1, 1] []"


@pytest.mark.parametrize(("configured", "loaded"), [("auto", "off"), ("reduce-overhead", "reduce-overhead")])
def test_the_command_line_compiles_only_when_a_mode_is_named(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configured: str, loaded: str
) -> None:
    """compile = "auto" is for the bot: a command's few batches would wait minutes for the compiler."""
    from i2p2i_bot.engine import Engine

    seen: list[Settings] = []

    def fake_load(settings: Settings, *, progress: bool = False, preset: str | None = None) -> Any:
        seen.append(settings)
        raise SystemExit(0)

    monkeypatch.setattr(Engine, "load", fake_load)
    config = tmp_path / "compile.toml"
    config.write_text(config_file.read_text() + f'compile = "{configured}"\n')  # [generate] is last
    with pytest.raises(SystemExit):
        main(["--config", str(config), "generate", "a kite", "--out", str(tmp_path / "out")])
    assert [s.generate.compile for s in seen] == [loaded]


@pytest.mark.parametrize(
    ("preset", "generator"),
    [
        ("sd-v1-4", "smoke:generator"),
        ("sd2", "smoke:generator-sd2"),
        ("sdxl", "smoke:generator-sdxl"),
        ("sd1-file", "smoke:generator-sd1-file"),
    ],
)
def test_generate_makes_images_with_each_preset(
    config_file: Path, tmp_path: Path, preset: str, generator: str
) -> None:
    """generate --model NAME runs that preset's pipeline (SD 1.x, SD 2.x, SDXL, a single file) and
    records the preset beside its images."""
    out = tmp_path / "out"
    options = ["--model", preset, "--seed", "3", "--out", str(out)]
    assert main(["--config", str(config_file), "-q", "generate", "a red boat", *options]) == 0
    record = json.loads((out / "a-red-boat.json").read_text())
    assert record["params"]["preset"] == preset
    assert record["models"]["generator"] == generator
    with Image.open(out / record["images"][0]["file"]) as png:
        assert isinstance(png, PngImagePlugin.PngImageFile) and png.size == (64, 64)
        assert json.loads(png.text["parameters"])["generator"] == generator


def test_imagine_from_describes_with_the_presets_clip(
    config_file: Path, photos: Path, tmp_path: Path
) -> None:
    """A card for SD 2.x is written with the SD 2.x preset's own CLIP, and its images are that preset's."""
    out = tmp_path / "out"
    source = str(photos / "astronaut.png")
    options = ["--model", "sd2", "--mode", "fast", "--out", str(out)]
    assert main(["--config", str(config_file), "-q", "imagine-from", source, *options]) == 0
    record = json.loads((out / "astronaut.json").read_text())
    assert record["interrogation"]["models"]["clip"] == "smoke:sd2-clip"
    assert record["models"]["clip"] == "smoke:sd2-clip" and record["params"]["preset"] == "sd2"
    assert len(record["images"]) == 1


def test_describe_uses_the_presets_clip(
    config_file: Path, photos: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """describe --model sd2 ranks labels with the SD 2.x preset's CLIP; by default with the built-in one."""
    source = str(photos / "astronaut.png")
    for preset, clip in (("sd2", "smoke:sd2-clip"), (None, "smoke:clip")):
        model = ["--model", preset] if preset else []
        assert main(["--config", str(config_file), "-q", "describe", source, "--json", *model]) == 0
        (line,) = capsys.readouterr().out.splitlines()
        assert json.loads(line)["models"]["clip"] == clip


def test_an_unknown_preset_is_refused_before_any_model_loads(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--config", str(config_file), "generate", "a cat", "--model", "sd3", "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "i2p2i: There is no model preset “sd3”; choose one of sd-v1-4, sd2, sdxl, sd1-file."
    )


def test_models_lists_each_preset_with_what_it_needs(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`i2p2i models` names every preset, its family, size and weights; a missing checkpoint exits 1."""
    assert main(["--config", str(config_file), "models"]) == 0
    out = capsys.readouterr().out
    assert "sd-v1-4 (default): sd1, 64x64, 2 steps, weights present" in out
    assert "sd2: sd2, 64x64, 2 steps, weights present" in out and "sd1-file: sd1" in out
    assert out.count("no safety checker") == 2  # sd2 and sdxl
    config = tmp_path / "gone.toml"
    config.write_text(
        config_file.read_text().replace(
            "[interrogate]",
            f'[[models.presets]]\nname = "gone"\ngenerator = "{tmp_path / "gone.safetensors"}"\n'
            'family = "sd1"\n[interrogate]',
        )
    )
    assert main(["--config", str(config), "models"]) == 1
    assert "gone: sd1, 64x64, 2 steps, missing: The checkpoint" in capsys.readouterr().out


def test_download_models_describe_only_fetches_the_caption_model_and_every_presets_clip(
    hub_calls: dict[str, list[Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A bot whose images GPU workers make loads only its interrogators: `download-models --describe-only`
    fetches BLIP and the CLIP of every preset, and no generator or guide, even with guides enabled."""
    config = tmp_path / "config.toml"
    config.write_text(
        '[guides]\nenabled = ["layout", "edges"]\n'
        '[[models.presets]]\nname = "sd2"\ngenerator = "stabilityai/stable-diffusion-2-1"\nfamily = "sd2"\n'
    )
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["download-models", "--describe-only", "--config", str(config)]) == 0
    assert hub_calls["snapshot"] == [(DEFAULT_CAPTION, BLIP_FILES, None)]
    assert hub_calls["file"][0] == CLIP_FILE
    assert len(hub_calls["file"]) == 2 and "ViT-H-14" in hub_calls["file"][1][0]
