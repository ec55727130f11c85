"""Shared fixtures: tiny models built once per run, short label lists, settings that point at them."""

from __future__ import annotations

import os

# Before any Hugging Face library is imported: a test that reaches for the network is a bug.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread for torch (it reads this when imported), here and in every bot.py, CLI or worker a test starts
# (they inherit it): the models are tiny, and two threads on a busy 2-core machine spin at each other's
# barriers (an image took 0.7 s instead of 0.04 s, measured). A value set outside is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import dataclasses
import shutil
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from i2p2i_bot.config import GenerateSettings, InterrogateSettings, ModelSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.gpu import GpuWorker
from i2p2i_bot.smoke import SmokeModels, ensure_smoke_models
from i2p2i_bot.store import Store
from tests.bot_harness import bot_settings
from tests.discord_fake import FakeDiscord, running_fake_discord

# Short label lists, so tables embed in a blink. Some entries hold default banned terms on purpose.
SHORT_LABELS = {
    "artists.txt": [
        "Claude Monet",
        "Vincent van Gogh",
        "Hokusai",
        "Frida Kahlo",
        "Ansel Adams",
        "Greg Rutkowski",
    ],
    "flavors.txt": [
        "highly detailed",
        "sharp focus",
        "trending on artstation",
        "soft lighting",
        "golden hour",
        "cinematic",
        "octane render",
        "4k",
        "8k",
        "bokeh",
        "studio portrait",
        "dramatic sky",
        "muted colors",
        "vibrant colors",
        "oil on canvas",
        "matte painting",
        "concept art",
        "film grain",
        "wide angle",
        "macro photograph",
        "sexy pose",
        "nude portrait",
        "symmetrical",
        "intricate",
        "volumetric lighting",
        "pastel palette",
        "high contrast",
        "low angle",
        "overcast",
        "ethereal",
    ],
    "mediums.txt": ["a photograph", "a painting", "a digital painting", "a sketch", "a 3d render"],
    "movements.txt": ["impressionism", "surrealism", "art nouveau", "pop art", "photorealism"],
    "negative.txt": ["blurry", "low quality", "deformed", "watermark", "oversaturated"],
}


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def smoke_models(smoke_cache: Path) -> SmokeModels:
    return ensure_smoke_models(smoke_cache)


@pytest.fixture(scope="session")
def describing_cache(tmp_path_factory: pytest.TempPathFactory, smoke_models: SmokeModels) -> Path:
    """A models.cache_dir with the smoke models a bot needs that GPU workers make every image for: the
    interrogation CLIPs and BLIP, and each generator folder without its UNet, VAE and safety checker; no
    single-file checkpoint, no guide weights."""
    cache = tmp_path_factory.mktemp("describing-cache")
    left_out = {"unet", "vae", "safety_checker", smoke_models.single_file.name}
    left_out |= {path.name for path in (smoke_models.edges, smoke_models.depth, smoke_models.look)}
    left_out.add(smoke_models.depth_estimator.name)
    shutil.copytree(
        smoke_models.clip.parent,
        cache / smoke_models.clip.parent.name,
        ignore=lambda _folder, names: [name for name in names if name in left_out],
    )
    return cache


@pytest.fixture(scope="session")
def labels_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("labels")
    for name, lines in SHORT_LABELS.items():
        (directory / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


@pytest.fixture(scope="session")
def base_settings(tmp_path_factory: pytest.TempPathFactory, smoke_cache: Path, labels_dir: Path) -> Settings:
    """Smoke models, short labels, small fast images."""
    return Settings(
        data_dir=str(tmp_path_factory.mktemp("data")),
        models=ModelSettings(preset="smoke", cache_dir=str(smoke_cache), device="cpu"),
        interrogate=InterrogateSettings(labels_dir=str(labels_dir), min_flavors=2, max_flavors=6),
        generate=GenerateSettings(steps=3, width=64, height=64, min_side=64, max_side=128),
    )


@pytest.fixture(scope="session")
def engine(base_settings: Settings, smoke_models: SmokeModels) -> Engine:
    return Engine.load(base_settings)


@pytest.fixture
def settings(base_settings: Settings, tmp_path: Path) -> Settings:
    """base_settings with a fresh data directory per test."""
    return dataclasses.replace(base_settings, data_dir=str(tmp_path / "data"))


@pytest.fixture
def settings_for(base_settings: Settings, tmp_path: Path) -> Callable[..., Settings]:
    """Settings for a bot that talks to a given loopback Discord, with queue settings changed as asked."""

    def make(server: FakeDiscord, **queue: Any) -> Settings:
        return bot_settings(base_settings, tmp_path / "data", server, **queue)

    return make


@pytest.fixture
async def discord_server() -> AsyncIterator[FakeDiscord]:
    """The loopback Discord, fresh for each test."""
    async with running_fake_discord() as server:
        yield server


@pytest.fixture
def server(discord_server: FakeDiscord) -> FakeDiscord:
    """discord_server, by the shorter name the delivery, fault and process tests use."""
    return discord_server


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """An empty store of jobs and images in this test's folder."""
    store = await Store.open(tmp_path / "db.sqlite3", images_dir=tmp_path / "images")
    yield store
    await store.close()


@pytest.fixture
def gpu() -> Iterator[GpuWorker]:
    """The GPU thread, closed after the test."""
    worker = GpuWorker()
    yield worker
    worker.close(timeout_s=30)


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """A real photograph shipped inside scikit-image's wheel."""
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


class NetworkAttempt(BaseException):
    """A name lookup or connection was tried: a BaseException, so that no library retries it as an error."""


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty Hugging Face cache, returned, with huggingface_hub's offline switch off as when HF_HUB_OFFLINE
    is unset; every name lookup and connection is refused, and the test fails if any was tried."""
    import huggingface_hub.constants

    attempts: list[Any] = []

    def refuse(*args: Any, **_: Any) -> Any:
        attempts.append(args[:2])
        raise NetworkAttempt(args[:2])

    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family == socket.AF_UNIX:
            return real_connect(sock, address)
        refuse(address)

    cache = tmp_path / "huggingface" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield cache
    assert attempts == []
