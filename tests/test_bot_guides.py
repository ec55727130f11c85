"""Guides through the loopback Discord: Keep from the image and Guide weights on a prompt card, kept by
Reroll and shown in Info; and the sentences for a guide not on offer and a source no longer stored."""

from __future__ import annotations

import copy
import dataclasses
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image

from i2p2i_bot.config import GuideSettings, PresetSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.guided import GuidedPipelines, GuideModels, load_guide_models
from i2p2i_bot.job_controls import ImageActions, job_view
from i2p2i_bot.jobs import Job, JobStatus
from i2p2i_bot.models import resolve_models
from i2p2i_bot.request import GenerationRequest
from i2p2i_bot.smoke import SmokeModels
from i2p2i_bot.source_images import SourceImages
from i2p2i_bot.store import StoredImage
from tests.bot_harness import bot_settings, running_i2p2i
from tests.discord_fake import FakeDiscord, StoredMessage
from tests.test_bot import button, describe, embed_fields, ephemeral_answer

BOTH = GuideSettings(enabled=["layout", "edges"])
KEEP = "i2p:card:keep:"
WEIGHTS = "i2p:card:wts:"


# A two-image result's select where Vary and Upscale are offered: every action of each image, by image.
EVERY_ACTION_OF_TWO = [
    (f"#{k + 1} {label}", f"{action}:{k}")
    for k in range(2)
    for label, action in (
        ("Vary (subtle)", "subtle"),
        ("Vary (strong)", "strong"),
        ("Upscale (2×)", "upscale"),
        ("Use as source", "source"),
    )
]


@pytest.fixture
def settings(base_settings: Settings, tmp_path: Path, discord_server: FakeDiscord) -> Settings:
    """A bot that enables both guides and keeps its data (its sources too) in this test's folder."""
    return dataclasses.replace(bot_settings(base_settings, tmp_path / "data", discord_server), guides=BOTH)


@pytest.fixture(scope="module")
def both_guides(base_settings: Settings, engine: Engine) -> GuideModels:
    """The smoke ControlNet and image-to-image, loaded as Engine.load loads them."""
    settings = dataclasses.replace(base_settings, guides=BOTH)
    return load_guide_models(BOTH, resolve_models(settings), engine.generator.device, torch.float32)


@pytest.fixture
def guided_engine(engine: Engine, settings: Settings) -> Callable[[GuideModels], Engine]:
    """The loaded models with these guides, reading sources from this bot's folder as Engine.load wires
    them (it gives the generator the same sources folder the bot saves uploads in)."""

    def make(guides: GuideModels) -> Engine:
        generator = copy.copy(engine.generator)
        generator.source_images = SourceImages(settings.sources_path)
        generator.guided = GuidedPipelines(generator.pipe, guides, generator.source_images)
        shared = engine.sharing(generator=generator)
        # The other presets' generators, loaded there, read the same folder.
        shared.source_images = generator.source_images
        return shared

    return make


def job_guides(bot: Any, job_id: int) -> tuple[Any, ...]:
    """A job's keep and guide_source columns, as stored."""
    db = sqlite3.connect(bot.settings.data_path / "i2p2i.sqlite3")
    try:
        row = db.execute("SELECT keep, guide_source FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        db.close()
    return (json.loads(row[0]), row[1]) if row else ()


def embed_fields_of(data: dict[str, Any]) -> dict[str, str]:
    """The fields of an answer's first embed, by name."""
    return {f["name"]: f["value"] for f in data["embeds"][0]["fields"]}


def image_file(bot: Any, job_id: int, index: int = 0) -> np.ndarray:
    with Image.open(bot.store.image_path(job_id, index)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


async def finished(server: FakeDiscord, handle: Any) -> StoredMessage:
    """The job message of a press or submit, once its images are posted."""
    await handle.wait_followup(timeout_s=30)
    await server.wait_until(lambda: cast(StoredMessage, handle.original).attachments or None, timeout_s=60)
    return cast(StoredMessage, handle.original)


async def with_seed(server: FakeDiscord, card: StoredMessage, seed: int) -> StoredMessage:
    """Edit prompt on the card, submitted as prefilled but for the seed; the finished job's message."""
    edit = await server.push_button(card, button(card, "i2p:card:edit:"))
    await edit.wait_response()
    submit = await server.push_modal_submit(edit, {"Seed (blank for random)": str(seed)})
    return await finished(server, submit)


async def test_a_card_keeps_edges_and_layout_for_generate_reroll_and_info(
    discord_server: FakeDiscord,
    settings: Settings,
    guided_engine: Callable[[GuideModels], Engine],
    both_guides: GuideModels,
    astronaut: Image.Image,
) -> None:
    """Keep from the image lists the offered guides; edges and layout with a weight from Guide weights go
    into Generate's job (with the card's image as source), change the image of a seed, stay with Reroll,
    and show in the result and in Info."""
    server = discord_server
    async with running_i2p2i(settings, server, guided_engine(both_guides)) as bot:
        _, card = await describe(server, astronaut)
        stored = await bot.store.get_interrogation(1)
        assert stored is not None
        select = card.component(button(card, KEEP))
        assert select is not None
        assert [(o["value"], o.get("default", False)) for o in select["options"]] == [
            ("prompt", True),
            ("layout", False),
            ("edges", False),
        ]
        assert select["max_values"] == 3
        assert not any(c.startswith(WEIGHTS) for c in card.custom_ids())
        plain = await with_seed(server, card, 7)
        assert job_guides(bot, 1) == ([], None)
        assert "Kept from the source" not in embed_fields(plain)

        choose = await server.push_select(card, button(card, KEEP), ["prompt", "layout", "edges"])
        assert (await choose.wait_response()).json["type"] == 7
        card = server.message(card.id)
        assert embed_fields(card)["Keep from the image"] == (
            "layout 0.6 (composition and colours) · edges 0.8 (outlines and pose)"
        )
        weights = await server.push_button(card, button(card, WEIGHTS))
        await weights.wait_response()
        assert weights.modal is not None
        inputs = {
            c["components"][0]["label"]: c["components"][0]["value"] for c in weights.modal["components"]
        }
        assert inputs == {
            "Layout weight (0, 1], default 0.6": "0.6",
            "Edges weight [0, 2], default 0.8": "0.8",
        }
        bad = await server.push_modal_submit(weights, {"Edges weight [0, 2], default 0.8": "3"})
        assert await ephemeral_answer(bad) == "The weight of edges must be in [0, 2] (got 3)."
        update = await server.push_modal_submit(weights, {"Edges weight [0, 2], default 0.8": "1.2"})
        assert (await update.wait_response()).json["type"] == 7
        keep = [{"name": "layout", "weight": 0.6}, {"name": "edges", "weight": 1.2}]

        card = server.message(card.id)
        await finished(server, await server.push_button(card, button(card, "i2p:card:gen:")))
        assert job_guides(bot, 2) == (keep, stored.source_sha256)
        kept = await with_seed(server, card, 7)
        assert job_guides(bot, 3) == (keep, stored.source_sha256)
        # The same seed and prompt: the guides alone moved the pixels.
        assert float(np.abs(image_file(bot, 3) - image_file(bot, 1)).mean()) > 1.0
        shown = "layout 0.6 (composition and colours) · edges 1.2 (outlines and pose)"
        assert embed_fields(kept)["Kept from the source"] == shown

        reroll = await server.push_button(kept, "i2p:job:reroll:3")
        await finished(server, reroll)
        assert job_guides(bot, 4) == (keep, stored.source_sha256)
        info = await server.push_button(kept, "i2p:job:info:3")
        fields = {
            f["name"]: f["value"] for f in (await info.wait_response()).json["data"]["embeds"][0]["fields"]
        }
        assert fields["Kept from the source"] == f"{shown}\nsource image `{stored.source_sha256[:12]}`"
        await bot.queue.join()


async def test_a_card_keeps_depth_and_look_with_edges_in_the_job(
    discord_server: FakeDiscord,
    settings: Settings,
    guided_engine: Callable[[GuideModels], Engine],
    base_settings: Settings,
    engine: Engine,
    astronaut: Image.Image,
) -> None:
    """With depth and look enabled and their weights loaded, Keep from the image lists them after edges;
    depth, edges and look chosen go into the job with their weights and the card's image as source,
    change the image of a seed, and show in the result."""
    every = GuideSettings(enabled=["layout", "edges", "depth", "look"])
    sources = resolve_models(dataclasses.replace(base_settings, guides=every))
    guides = load_guide_models(every, sources, engine.generator.device, torch.float32)
    server = discord_server
    async with running_i2p2i(settings, server, guided_engine(guides)) as bot:
        _, card = await describe(server, astronaut)
        select = card.component(button(card, KEEP))
        assert select is not None
        assert [o["value"] for o in select["options"]] == ["prompt", "layout", "edges", "depth", "look"]
        depth = next(o for o in select["options"] if o["value"] == "depth")
        assert depth["description"] == "Keeps 3-D arrangement · weight 0.8"
        plain = await with_seed(server, card, 7)

        choose = await server.push_select(card, button(card, KEEP), ["depth", "edges", "look"])
        await choose.wait_response()
        card = server.message(card.id)
        weights = await server.push_button(card, button(card, WEIGHTS))
        await weights.wait_response()
        update = await server.push_modal_submit(weights, {"Depth weight [0, 2], default 0.8": "1.5"})
        await update.wait_response()
        card = server.message(card.id)
        kept = await with_seed(server, card, 7)
        stored = await bot.store.get_interrogation(1)
        assert stored is not None
        keep = [
            {"name": "edges", "weight": 0.8},
            {"name": "depth", "weight": 1.5},
            {"name": "look", "weight": 0.6},
        ]
        assert job_guides(bot, 2) == (keep, stored.source_sha256)
        assert float(np.abs(image_file(bot, 2) - image_file(bot, 1)).mean()) > 1.0
        shown = (
            "edges 0.8 (outlines and pose) · depth 1.5 (3-D arrangement) · look 0.6 (subject look and style)"
        )
        assert embed_fields(kept)["Kept from the source"] == shown
        assert "Kept from the source" not in embed_fields(plain)
        await bot.queue.join()


async def test_a_guide_not_on_offer_and_a_lost_source_are_one_sentence(
    discord_server: FakeDiscord,
    settings: Settings,
    guided_engine: Callable[[GuideModels], Engine],
    astronaut: Image.Image,
) -> None:
    """Edges enabled but its ControlNet not on the machine: the card lists layout alone, and an old card's
    edges choice is one sentence saying why; a guided job whose source file is gone is one sentence and
    queues nothing."""
    server = discord_server
    async with running_i2p2i(settings, server, guided_engine(GuideModels(layout=True))) as bot:
        _, card = await describe(server, astronaut)
        select = card.component(button(card, KEEP))
        assert select is not None and [o["value"] for o in select["options"]] == ["prompt", "layout"]
        # A select Discord still shows from before the ControlNet went missing.
        edges = await server.push_select(card, button(card, KEEP), ["edges"])
        assert await ephemeral_answer(edges) == (
            "Edges needs the ControlNet weights, which this bot has not downloaded."
        )
        assert (await bot.store.card_choices(1)).keep == ()

        layout = await server.push_select(card, button(card, KEEP), ["prompt", "layout"])
        await layout.wait_response()
        card = server.message(card.id)
        done = await finished(server, await server.push_button(card, button(card, "i2p:card:gen:")))
        stored = await bot.store.get_interrogation(1)
        assert stored is not None
        assert job_guides(bot, 1) == ([{"name": "layout", "weight": 0.6}], stored.source_sha256)
        # The source file is lost (an operator cleaned the folder, a backup restored without it).
        source = bot.store.source_path(stored.source_sha256)
        assert source is not None and source.exists()
        source.unlink()
        gone = (
            "The image these guides keep elements of is no longer stored; describe it again, "
            "or keep the prompt only."
        )
        assert await ephemeral_answer(await server.push_button(done, "i2p:job:reroll:1")) == gone
        assert await ephemeral_answer(await server.push_button(card, button(card, "i2p:card:gen:"))) == gone
        assert await bot.store.get_job(2) is None


async def test_vary_and_use_as_source_start_from_the_chosen_result(
    discord_server: FakeDiscord,
    settings: Settings,
    guided_engine: Callable[[GuideModels], Engine],
    both_guides: GuideModels,
    astronaut: Image.Image,
) -> None:
    """A result's "image #k → action" select: Vary (subtle) on image #2 queues the same prompt keeping
    that image's layout at 0.35 (the image saved as a source by its hash), Vary (strong) on #1 at 0.7, and
    Use as source posts a new prompt card of that image."""
    server = discord_server
    async with running_i2p2i(settings, server, guided_engine(both_guides)) as bot:
        _, card = await describe(server, astronaut, count=2)
        result = await finished(server, await server.push_button(card, button(card, "i2p:card:gen:")))
        record = await bot.store.job_record(1)
        assert record is not None and len(record.images) == 2
        first, second = sorted(record.images, key=lambda m: m.index)
        assert first.sha256 != second.sha256
        select = result.component("i2p:job:image:1")
        assert select is not None
        assert [(o["label"], o["value"]) for o in select["options"]] == EVERY_ACTION_OF_TWO

        subtle = await server.push_select(result, "i2p:job:image:1", ["subtle:1"])
        varied = await finished(server, subtle)
        job = await bot.store.get_job(2)
        assert job is not None and job.parent_job_id == 1
        assert (job.request.prompt, job.request.count) == (record.job.request.prompt, 2)
        assert job_guides(bot, 2) == ([{"name": "layout", "weight": 0.35}], second.sha256)
        source = bot.store.source_path(second.sha256)
        assert source is not None
        with Image.open(source) as kept:
            assert np.array_equal(np.asarray(kept.convert("RGB"), dtype=np.int16), image_file(bot, 1, 1))
        assert embed_fields(varied)["Kept from the source"] == "layout 0.35 (composition and colours)"

        strong = await server.push_select(result, "i2p:job:image:1", ["strong:0"])
        await finished(server, strong)
        assert job_guides(bot, 3) == ([{"name": "layout", "weight": 0.7}], first.sha256)

        use = await server.push_select(result, "i2p:job:image:1", ["source:1"])
        await use.wait_followup(timeout_s=60)
        new_card = cast(StoredMessage, use.original)
        card_id = int(button(new_card, "i2p:card:gen:").split(":")[3])
        stored = await bot.store.get_interrogation(card_id)
        assert stored is not None and stored.source_sha256 == second.sha256
        assert new_card.embeds[0]["title"] == "Prompt · best" and new_card.component(button(new_card, KEEP))
        await bot.queue.join()


async def test_upscale_makes_the_chosen_result_again_at_twice_its_size(
    discord_server: FakeDiscord,
    settings: Settings,
    guided_engine: Callable[[GuideModels], Engine],
    both_guides: GuideModels,
    astronaut: Image.Image,
) -> None:
    """Upscale (2×) on image #2 queues one image with that image's seed, prompt and negative at twice the
    size, kept from it with layout at generate.upscale_strength, and posts a 128-pixel PNG; the result
    offers no second upscale (256 is past upscale_max_side); Info and /history name job #1 image #2;
    Reroll makes another upscale of it past max_side; another member is refused as for Vary."""
    generate = dataclasses.replace(settings.generate, max_side=64, upscale_max_side=128)
    upscaling = dataclasses.replace(settings, generate=generate)
    server = discord_server
    engine = guided_engine(both_guides).sharing(settings=upscaling)
    async with running_i2p2i(upscaling, server, engine) as bot:
        _, card = await describe(server, astronaut, count=2)
        result = await finished(server, await server.push_button(card, button(card, "i2p:card:gen:")))
        record = await bot.store.job_record(1)
        assert record is not None and len(record.images) == 2
        first, second = sorted(record.images, key=lambda m: m.index)
        select = result.component("i2p:job:image:1")
        assert select is not None
        assert select["placeholder"] == "Image #k → Vary, Upscale or Use as source…"
        assert [(o["label"], o["value"]) for o in select["options"]] == EVERY_ACTION_OF_TWO

        theirs = await server.push_select(result, "i2p:job:image:1", ["upscale:1"], user="bob")
        vary = await server.push_select(result, "i2p:job:image:1", ["subtle:1"], user="bob")
        refused = await ephemeral_answer(theirs)
        assert refused.startswith("Only <@") and refused == await ephemeral_answer(vary)
        assert await bot.store.get_job(2) is None

        upscaled = await finished(server, await server.push_select(result, "i2p:job:image:1", ["upscale:1"]))
        job = await bot.store.get_job(2)
        assert job is not None and (job.origin, job.parent_job_id) == ("upscale", 1)
        asked, made = record.job.request, job.request
        assert (made.prompt, made.negative_prompt) == (asked.prompt, asked.negative_prompt)
        assert (made.count, made.seed, made.upscale) == (1, second.seed, True)
        assert (made.width, made.height) == (128, 128)
        assert second.seed != first.seed == asked.seed
        assert job_guides(bot, 2) == ([{"name": "layout", "weight": 0.4}], second.sha256)
        with Image.open(bot.store.image_path(2, 0)) as png:
            assert (png.format, png.size) == ("PNG", (128, 128))
        assert embed_fields(upscaled)["Kept from the source"] == "layout 0.4 (composition and colours)"
        again = upscaled.component("i2p:job:image:2")
        assert again is not None and again["placeholder"] == "Image #k → Vary or Use as source…"
        assert [o["value"] for o in again["options"]] == ["subtle:0", "strong:0", "source:0"]

        info = await server.push_button(upscaled, "i2p:job:info:2")
        fields = embed_fields_of((await info.wait_response()).json["data"])
        assert fields["Upscale (2×) of"] == "job #1, image #2" and "Rerolled from" not in fields
        history = await server.push_slash("history")
        listed = (await history.wait_response()).json["data"]["embeds"][0]["description"]
        assert "**Job #2** · complete · upscale of job #1 ·" in listed

        await finished(server, await server.push_button(upscaled, "i2p:job:reroll:2"))
        reroll = await bot.store.get_job(3)
        assert reroll is not None and reroll.status.value == "complete"
        assert (reroll.request.width, reroll.request.upscale, reroll.request.count) == (128, True, 1)
        assert job_guides(bot, 3) == ([{"name": "layout", "weight": 0.4}], second.sha256)
        await bot.queue.join()


async def test_every_image_keeps_every_action_past_one_selects_options() -> None:
    """Eight images with four actions each are 32 options, past a select's 25: the images after the sixth
    get a second select rather than losing theirs; labels read in the job's language."""
    job = Job(
        owner_id=1,
        request=GenerationRequest("a kite", count=8, width=64, height=64),
        id=4,
        status=JobStatus.COMPLETE,
        created_at=0.0,
    )
    images = [
        StoredImage(job_id=4, index=i, seed=i, nsfw=False, fidelity=None, sha256=f"{i:064x}", created_at=0.0)
        for i in range(8)
    ]
    actions = ("subtle", "strong", "upscale", "source")
    view = job_view(job, running=False, locale="zh-CN", images=images, image_actions=actions)
    selects = [item.item for item in view.children if isinstance(item, ImageActions)]
    assert [s.custom_id for s in selects] == ["i2p:job:image:4", "i2p:job:image:4:1"]
    assert [len(s.options) for s in selects] == [24, 8]
    values = [o.value for s in selects for o in s.options]
    assert values == [f"{action}:{i}" for i in range(8) for action in actions]
    assert selects[1].options[2].label == "#7 放大（2×）"
    assert ImageActions.__discord_ui_compiled_template__.fullmatch("i2p:job:image:4:1")


def select_values(message: StoredMessage, prefix: str) -> list[str] | None:
    """The option values of the message's select whose custom_id starts with `prefix`; None: none."""
    custom_id = next((c for c in message.custom_ids() if c.startswith(prefix)), None)
    select = message.component(custom_id) if custom_id is not None else None
    return None if select is None else [o["value"] for o in select["options"]]


async def test_keep_from_the_image_follows_the_cards_model(
    discord_server: FakeDiscord,
    settings: Settings,
    guided_engine: Callable[[GuideModels], Engine],
    both_guides: GuideModels,
    astronaut: Image.Image,
) -> None:
    """Layout fits every model, edges SD 1.x alone: an SD 1.x card lists layout and edges; the same card
    switched to sd2 lists layout alone, and while it still keeps edges its Generate, an old select's edges
    and an old Guide weights modal are each one sentence that changes nothing; keeping layout alone, its
    Generate makes an sd2 job keeping layout of the card's image; an sd2 card, asked for or the server's
    model, lists layout too."""
    server = discord_server
    async with running_i2p2i(settings, server, guided_engine(both_guides)) as bot:
        _, card = await describe(server, astronaut)
        assert select_values(card, KEEP) == ["prompt", "layout", "edges"]
        choose = await server.push_select(card, button(card, KEEP), ["layout", "edges"])
        assert (await choose.wait_response()).json["type"] == 7
        kept = copy.deepcopy(server.message(card.id))  # as a member's client may still show it
        assert any(c.startswith(WEIGHTS) for c in kept.custom_ids())

        switch = await server.push_select(card, button(card, "i2p:card:mode:"), ["model:sd2"])
        assert (await switch.wait_response()).json["type"] == 7
        card = server.message(card.id)
        assert embed_fields(card)["Model"] == "sd2"
        assert select_values(card, KEEP) == ["prompt", "layout"]
        assert any(c.startswith(WEIGHTS) for c in card.custom_ids())
        refused = "The sd2 model cannot keep edges of an image: that guide fits SD 1.x models only."
        assert (
            await ephemeral_answer(await server.push_button(card, button(card, "i2p:card:gen:"))) == refused
        )
        assert await bot.store.get_job(1) is None
        edges = await server.push_select(card, button(card, KEEP), ["edges"])
        assert await ephemeral_answer(edges) == refused
        weights = await server.push_button(kept, button(kept, WEIGHTS))
        await weights.wait_response()
        update = await server.push_modal_submit(weights, {"Layout weight (0, 1], default 0.6": "0.5"})
        assert await ephemeral_answer(update) == refused
        before = [(g.name, g.weight) for g in (await bot.store.card_choices(1)).keep]
        assert before == [("layout", 0.6), ("edges", 0.8)]

        layout = await server.push_select(card, button(card, KEEP), ["layout"])
        assert (await layout.wait_response()).json["type"] == 7
        card = server.message(card.id)
        await finished(server, await server.push_button(card, button(card, "i2p:card:gen:")))
        job = await bot.store.get_job(1)
        stored = await bot.store.get_interrogation(1)
        assert job is not None and job.request.preset == "sd2" and stored is not None
        assert job_guides(bot, 1) == ([{"name": "layout", "weight": 0.6}], stored.source_sha256)

        clear = await server.push_select(card, button(card, KEEP), ["prompt"])
        assert (await clear.wait_response()).json["type"] == 7
        assert (await bot.store.card_choices(1)).keep == ()

        _, asked = await describe(server, astronaut, model="sd2")
        assert embed_fields(asked)["Model"] == "sd2" and select_values(asked, KEEP) == ["prompt", "layout"]
        handle = await server.push_slash("settings set", {"key": "model", "value": "sd2"}, user="owner")
        assert await ephemeral_answer(handle) == "Set model to sd2 for this server."
        _, servers = await describe(server, astronaut)
        card_id = int(button(servers, "i2p:card:gen:").split(":")[3])
        assert (await bot.store.card_choices(card_id)).preset == "sd2"
        assert select_values(servers, KEEP) == ["prompt", "layout"]
        await bot.queue.join()


async def test_an_sd1_card_keeps_guides_on_a_bot_whose_default_model_takes_none(
    discord_server: FakeDiscord,
    settings: Settings,
    guided_engine: Callable[[GuideModels], Engine],
    both_guides: GuideModels,
    astronaut: Image.Image,
) -> None:
    """With sd2 the bot's default model, its cards offer layout alone, and a card for the SD 1.x preset
    lists layout and edges, and its Generate makes a job keeping layout of the card's image."""
    models = dataclasses.replace(settings.models, default_preset="sd2")
    sd2_default = dataclasses.replace(settings, models=models)
    server = discord_server
    engine = guided_engine(both_guides).sharing(settings=sd2_default)
    async with running_i2p2i(sd2_default, server, engine) as bot:
        _, plain = await describe(server, astronaut)
        described = await bot.store.get_interrogation(1)
        assert described is not None and described.interrogation.models["clip"] == "smoke:sd2-clip"
        assert select_values(plain, KEEP) == ["prompt", "layout"]

        _, card = await describe(server, astronaut, model="sd-v1-4")
        assert select_values(card, KEEP) == ["prompt", "layout", "edges"]
        choose = await server.push_select(card, button(card, KEEP), ["layout"])
        await choose.wait_response()
        card = server.message(card.id)
        await finished(server, await server.push_button(card, button(card, "i2p:card:gen:")))
        job = await bot.store.get_job(1)
        assert job is not None and job.request.preset == "sd-v1-4"
        stored = await bot.store.get_interrogation(2)
        assert stored is not None
        assert job_guides(bot, 1) == ([{"name": "layout", "weight": 0.6}], stored.source_sha256)
        await bot.queue.join()


async def test_a_results_vary_and_upscale_follow_its_jobs_model(
    discord_server: FakeDiscord,
    settings: Settings,
    guided_engine: Callable[[GuideModels], Engine],
    both_guides: GuideModels,
    smoke_models: SmokeModels,
) -> None:
    """An sd2 job's result offers Vary and Upscale (layout fits every model), and its Vary makes an sd2 job
    keeping layout of that image; an SD 1.x job's result on the same bot offers them too, and one of an
    SDXL preset whose default size doubled passes generate.upscale_max_side (the cap is the bot's, the size
    the preset's: SDXL's 1024 against 1536) offers Vary alone."""
    xl = PresetSettings(name="xl", generator=str(smoke_models.sdxl), family="sdxl", size=80)
    capped = dataclasses.replace(
        settings,
        generate=dataclasses.replace(settings.generate, upscale_max_side=128),
        models=dataclasses.replace(settings.models, presets=[xl]),
    )
    server = discord_server
    engine = guided_engine(both_guides).sharing(settings=capped)
    async with running_i2p2i(capped, server, engine) as bot:
        sd2 = await finished(
            server, await server.push_slash("imagine", {"prompt": "a kite", "count": 1, "model": "sd2"})
        )
        assert select_values(sd2, "i2p:job:image:1") == ["subtle:0", "strong:0", "upscale:0", "source:0"]
        record = await bot.store.job_record(1)
        assert record is not None and record.job.request.preset == "sd2"
        vary = await server.push_select(sd2, "i2p:job:image:1", ["subtle:0"])
        varied = await finished(server, vary)
        job = await bot.store.get_job(2)
        assert job is not None and job.request.preset == "sd2"
        assert job_guides(bot, 2) == ([{"name": "layout", "weight": 0.35}], record.images[0].sha256)
        assert select_values(varied, "i2p:job:image:2") == ["subtle:0", "strong:0", "upscale:0", "source:0"]

        sd1 = await finished(server, await server.push_slash("imagine", {"prompt": "a kite", "count": 1}))
        assert select_values(sd1, "i2p:job:image:3") == ["subtle:0", "strong:0", "upscale:0", "source:0"]
        big = await finished(
            server, await server.push_slash("imagine", {"prompt": "a kite", "count": 1, "model": "xl"})
        )
        made = await bot.store.get_job(4)
        assert made is not None and (made.request.width, made.request.height) == (80, 80)
        assert select_values(big, "i2p:job:image:4") == ["subtle:0", "strong:0", "source:0"]
        await bot.queue.join()
