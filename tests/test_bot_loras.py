"""LoRAs through the loopback Discord: /loras lists them with their trigger words, /imagine applies the
prompt's tags and records the files' hashes, Info shows them, and an unknown LoRA or a Reroll of a LoRA
whose file changed is one private sentence."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
import threading
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from i2p2i_bot import job_controls
from i2p2i_bot.config import Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.generate import Generator
from i2p2i_bot.loras import Lora, LoraLibrary
from i2p2i_bot.smoke import SmokeModels, write_smoke_lora
from tests.bot_harness import bot_settings, running_i2p2i
from tests.discord_fake import FakeDiscord, StoredMessage
from tests.stub_engine import StubEngine
from tests.test_bot import embed_fields, ephemeral_answer


@pytest.fixture
def lora_dir(tmp_path: Path, smoke_models: SmokeModels) -> Path:
    folder = tmp_path / "loras"
    tags = json.dumps({"set": {"kite": 4, "stormy sky": 9}})
    write_smoke_lora(
        smoke_models.generator, folder / "storm.safetensors", seed=5, metadata={"ss_tag_frequency": tags}
    )
    write_smoke_lora(smoke_models.generator, folder / "plain.safetensors", seed=6, text_encoder=False)
    return folder


@pytest.fixture
def settings(
    base_settings: Settings, tmp_path: Path, discord_server: FakeDiscord, lora_dir: Path
) -> Settings:
    made = bot_settings(base_settings, tmp_path / "data", discord_server)
    return dataclasses.replace(made, models=dataclasses.replace(made.models, lora_dir=str(lora_dir)))


@pytest.fixture
def lora_engine(engine: Engine, settings: Settings, smoke_models: SmokeModels, lora_dir: Path) -> Engine:
    """The loaded models with a generator of its own (LoRAs change its modules) offering this folder's
    LoRAs, as Engine.load wires it from models.lora_dir."""
    generator = Generator.load(
        str(smoke_models.generator),
        settings.generate,
        torch.device("cpu"),
        name=engine.generator.model,
        loras=LoraLibrary(lora_dir, max_per_prompt=settings.models.max_loras),
    )
    return engine.sharing(generator=generator)


def job_loras(bot: Any, job_id: int) -> list[dict[str, Any]]:
    db = sqlite3.connect(bot.settings.data_path / "i2p2i.sqlite3")
    try:
        (text,) = db.execute("SELECT loras FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        db.close()
    return cast(list[dict[str, Any]], json.loads(text))


def image_file(bot: Any, job_id: int) -> np.ndarray:
    with Image.open(bot.store.image_path(job_id, 0)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


async def imagined(server: FakeDiscord, prompt: str) -> StoredMessage:
    handle = await server.push_slash("imagine", {"prompt": prompt, "count": 1, "seed": 77})
    await handle.wait_followup(timeout_s=30)
    await server.wait_until(lambda: cast(StoredMessage, handle.original).attachments or None, timeout_s=60)
    return cast(StoredMessage, handle.original)


async def test_loras_are_listed_applied_recorded_and_pinned(
    discord_server: FakeDiscord,
    settings: Settings,
    lora_engine: Engine,
    smoke_models: SmokeModels,
    lora_dir: Path,
) -> None:
    server = discord_server
    async with running_i2p2i(settings, server, lora_engine) as bot:
        assert "loras" in {c["name"] for c in server.synced_commands()}
        listing = await (await server.push_slash("loras")).wait_response()
        data = listing.json["data"]
        assert data["flags"] & 64  # only the member sees it
        assert data["embeds"][0]["title"] == "LoRAs (2)"
        assert data["embeds"][0]["description"] == ("`<lora:plain:1>`\n`<lora:storm:1>` · stormy sky, kite")

        unknown = await server.push_slash("imagine", {"prompt": "a kite <lora:oil:0.5>"})
        assert (
            await ephemeral_answer(unknown) == "There is no LoRA “oil”; the LoRAs on offer are plain, storm."
        )
        assert await bot.store.get_job(1) is None

        await imagined(server, "a red kite")
        styled = await imagined(server, "a red kite <lora:storm:0.8>")
        sha = LoraLibrary(lora_dir).sha256(lora_dir / "storm.safetensors")
        assert job_loras(bot, 1) == [] and job_loras(bot, 2) == [
            {"name": "storm", "weight": 0.8, "sha256": sha}
        ]
        # The same seed and text: the LoRA alone moved the pixels.
        assert float(np.abs(image_file(bot, 2) - image_file(bot, 1)).mean()) > 1.0
        assert embed_fields(styled)["LoRAs"] == "storm 0.8"
        info = await server.push_button(styled, "i2p:job:info:2")
        fields = {
            f["name"]: f["value"] for f in (await info.wait_response()).json["data"]["embeds"][0]["fields"]
        }
        assert fields["LoRAs"] == f"storm 0.8 · file `{sha[:12]}`"

        # The admin replaces the file: Reroll would make other images, so it says why instead.
        write_smoke_lora(smoke_models.generator, lora_dir / "storm.safetensors", seed=50)
        reroll = await server.push_button(styled, "i2p:job:reroll:2")
        assert await ephemeral_answer(reroll) == (
            "The LoRA “storm” has changed since this was made, so it cannot be made again the same; "
            "write the prompt anew to use the new file."
        )
        assert await bot.store.get_job(3) is None
        await bot.queue.join()


class HeldHashing(LoraLibrary):
    """A LoRA library whose hashing waits for the test's word, as reading a file of hundreds of MB keeps
    it busy; it gives up after a while rather than hang a bot that waits on it."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.hashing = threading.Event()
        self.release = threading.Event()
        # Whether the hash was still held when the test released it (None while it waits).
        self.released: bool | None = None

    def sha256(self, path: Path) -> str:
        self.hashing.set()
        self.released = self.release.wait(timeout=10)
        return super().sha256(path)


async def test_hashing_a_new_lora_leaves_the_bot_answering(
    discord_server: FakeDiscord, base_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the first /imagine naming a LoRA hashes its file, the bot answers another member's /loras and
    tells Discord the /imagine is under way (before its 3 s run out); released, the job is queued with
    the file's hash, as it would have been."""
    server = discord_server
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file({"lora_unet_down.lora_down.weight": torch.ones(2, 4)}, str(folder / "big.safetensors"))
    made = bot_settings(base_settings, tmp_path / "data", server)
    settings = dataclasses.replace(made, models=dataclasses.replace(made.models, lora_dir=str(folder)))
    engine = StubEngine(0.0, None, lora_dir=str(folder))
    engine.loras = library = HeldHashing(folder)
    monkeypatch.setattr(job_controls, "PLAN_BEFORE_ANSWER_S", 0.2)
    async with running_i2p2i(settings, server, engine) as bot:
        slash = await server.push_slash("imagine", {"prompt": "a kite <lora:big:0.5>", "count": 1})
        assert await asyncio.to_thread(library.hashing.wait, 10)

        listing = await server.push_slash("loras", user="bob")
        data = (await listing.wait_response()).json["data"]
        assert data["embeds"][0]["description"] == "`<lora:big:1>`"
        thinking = await slash.wait_response()
        assert thinking.json["type"] == 5  # the public placeholder, while the file is still being read
        assert library.released is None and await bot.store.get_job(1) is None

        library.release.set()
        await slash.wait_followup(timeout_s=30)
        assert library.released is True
        job = await bot.store.get_job(1)
        sha = hashlib.sha256((folder / "big.safetensors").read_bytes()).hexdigest()
        assert job is not None and job.request.loras == (Lora("big", 0.5, sha),)
        assert "Job #1" in cast(StoredMessage, slash.original).content  # the placeholder became its message
        await bot.queue.join()
