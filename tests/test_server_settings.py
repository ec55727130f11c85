"""Per-server settings: what /settings accepts and refuses, how it overlays the config file, and storage."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from i2p2i_bot.config import GenerateSettings
from i2p2i_bot.flagged import FlaggedPolicy
from i2p2i_bot.presets import Preset, Presets
from i2p2i_bot.request import GenerationError, GenerationRequest, plan
from i2p2i_bot.server_settings import ServerSettings, ServerSettingsBook, SettingError
from i2p2i_bot.store import Store
from i2p2i_bot.terms import BannedTerms

BASE = GenerateSettings(
    steps=25, max_steps=100, max_count=8, width=512, height=512, min_side=256, max_side=768
)


def test_a_server_changes_defaults_and_narrows_bounds_within_the_config_file() -> None:
    server = (
        ServerSettings()
        .changed("max_count", "2", BASE)
        .changed("steps", "30", BASE)
        .changed("size", "384x640", BASE)
        .changed("negative_prompt", "blurry", BASE)
    )
    settings = server.generate(BASE)
    assert (settings.max_count, settings.steps, settings.width, settings.height) == (2, 30, 384, 640)
    assert settings.negative_prompt == "blurry" and settings.max_steps == 100
    assert server.default_count(BASE) == 2  # the default 4 would be past the server's maximum
    planned = plan(GenerationRequest("a kite"), settings, "m")
    assert (planned.steps, planned.width, planned.height, planned.negative_prompt) == (30, 384, 640, "blurry")
    with pytest.raises(GenerationError, match="between 1 and 2"):
        plan(GenerationRequest("a kite", count=3), settings, "m")
    # Without a row, a server has exactly the config file's settings.
    assert ServerSettings().generate(BASE) == BASE and ServerSettings().default_count(BASE) == 4


@pytest.mark.parametrize(
    ("key", "text"),
    [
        ("steps", "25"),
        ("max_steps", "100"),
        ("count", "4"),
        ("max_count", "8"),
        ("size", "512x512"),
        ("max_side", "768"),
        ("negative_prompt", BASE.negative_prompt or "none"),
        ("banned_terms", "none"),
        ("channels", "all"),
        ("nsfw", "filtered"),
    ],
)
def test_a_key_set_to_the_bots_default_follows_the_default(key: str, text: str) -> None:
    """Setting a key to the value it has anyway keeps no override: it reads as the default, and the server
    keeps following the config file's value when that changes."""
    changed = ServerSettings(steps=30).changed(key, text, BASE)  # type: ignore[arg-type]
    # Only the key set changes: the server's other override (steps 30) stays unless steps was the key.
    assert changed == (ServerSettings() if key == "steps" else ServerSettings(steps=30))
    assert changed.describe(key, BASE)[1] is False  # type: ignore[arg-type]


def test_a_default_count_follows_the_servers_own_maximum() -> None:
    narrowed = ServerSettings().changed("max_count", "2", BASE)
    assert narrowed.changed("count", "2", BASE) == narrowed
    assert narrowed.changed("count", "1", BASE).count == 1


@pytest.mark.parametrize(
    ("key", "text", "sentence"),
    [
        ("max_count", "9", "The most images must be between 1 and 8 (got 9)."),
        ("max_steps", "0", "The most steps must be between 1 and 100 (got 0)."),
        ("steps", "²", "Steps must be a whole number (you typed “²”)."),
        ("steps", "-3", "Steps must be a whole number (you typed “-3”)."),
        ("steps", "101", "Steps must be between 1 and 100, which is the most steps here (got 101)."),
        ("size", "big", "Write the size as WIDTHxHEIGHT, like 512x512 (you typed “big”)."),
        ("size", "500x512", "The width must be a multiple of 8 (got 500)."),
        (
            "size",
            "1024x512",
            "The default width must be between 256 and 768, which is the largest side here (got 1024).",
        ),
        ("max_side", "1024", "The largest side must be between 256 and 768 (got 1024)."),
        ("max_side", "300", "The largest side must be a multiple of 8 (got 300)."),
        (
            "count",
            "12",
            "The default number of images must be between 1 and 8, which is the most images here (got 12).",
        ),
        (
            "channels",
            "general",
            "Name the channels as #mentions (or their ids) separated by spaces, or write all.",
        ),
        ("banned_terms", " , ", "List the banned terms separated by commas, or write none."),
        (
            "nsfw",
            "yes",
            "nsfw must be filtered, spoiler or unfiltered (spoiler and unfiltered apply in age-restricted "
            "channels only; you typed “yes”).",
        ),
    ],
)
def test_each_bad_value_gets_one_sentence(key: str, text: str, sentence: str) -> None:
    with pytest.raises(SettingError) as info:
        ServerSettings().changed(key, text, BASE)  # type: ignore[arg-type]
    assert str(info.value) == sentence


def test_a_bound_may_not_leave_a_default_outside_it() -> None:
    server = ServerSettings().changed("count", "6", BASE)
    with pytest.raises(SettingError, match=r"default number of images must be between 1 and 4"):
        server.changed("max_count", "4", BASE)
    sized = ServerSettings().changed("size", "640x640", BASE)
    with pytest.raises(SettingError, match=r"default width must be between 256 and 512"):
        sized.changed("max_side", "512", BASE)
    # Resetting the default first makes room.
    assert sized.reset("size").changed("max_side", "512", BASE).generate(BASE).max_side == 512


def test_lists_channels_and_resets() -> None:
    server = ServerSettings().changed("channels", "<#11> <#22>, 33 <#11>", BASE)
    assert server.channel_ids == (11, 22, 33)
    assert server.allows_channel(22) and not server.allows_channel(44)
    assert ServerSettings().allows_channel(44)
    terms = server.changed("banned_terms", "kite, Red Balloon , kite", BASE)
    assert terms.banned_terms == ("kite", "Red Balloon")
    assert terms.changed("banned_terms", "none", BASE).banned_terms == ()
    with pytest.raises(SettingError, match="List the banned terms"):
        terms.changed("banned_terms", "\u200b, \u00ad", BASE)
    assert (
        terms.reset("channels").channel_ids == ()
        and terms.reset("channels").banned_terms == terms.banned_terms
    )
    assert terms.reset("all").empty
    assert server.changed("channels", "all", BASE).channel_ids == ()
    assert server.describe("channels", BASE) == ("<#11> <#22> <#33>", True)
    assert ServerSettings().describe("size", BASE) == ("512x512", False)


def test_the_nsfw_setting_opens_age_restricted_channels_only() -> None:
    """Flagged images are withheld by default, in ordinary channels and in DMs whatever the server says; a
    server's spoiler or unfiltered applies in its age-restricted channels alone."""
    withhold, spoiler, show = FlaggedPolicy
    places = [(True, False), (True, True), (False, True)]  # (in a server, age-restricted)
    expected = {
        None: [withhold, withhold, withhold],
        "filtered": [withhold, withhold, withhold],
        "spoiler": [withhold, spoiler, withhold],
        "unfiltered": [withhold, show, withhold],
    }
    for value, policies in expected.items():
        server = (
            ServerSettings()
            if value is None
            else ServerSettings().changed("nsfw", f" {value.upper()} ", BASE)
        )
        got = [server.flagged_policy(in_server=s, age_restricted=a) for s, a in places]
        assert got == policies, value
    server = ServerSettings().changed("nsfw", "spoiler", BASE)
    assert server.describe("nsfw", BASE) == ("spoiler", True)
    assert ServerSettings().describe("nsfw", BASE) == ("filtered", False)
    assert server.reset("nsfw").empty
    assert ServerSettings.from_json(server.to_json()) == server and server.to_json() == '{"nsfw": "spoiler"}'
    # A value a later version wrote and this one does not know is filtered.
    unknown = ServerSettings.from_json('{"nsfw": "blurred"}')
    assert unknown.flagged_policy(in_server=True, age_restricted=True) is withhold
    assert show.stricter(spoiler) is spoiler and withhold.stricter(show) is withhold


def test_json_round_trip_keeps_every_field_and_ignores_unknown_ones() -> None:
    server = ServerSettings(
        steps=20, max_count=3, banned_terms=("kite",), channel_ids=(5, 6), negative_prompt=""
    )
    assert ServerSettings.from_json(server.to_json()) == server
    assert ServerSettings.from_json('{"steps": 7, "from_a_later_version": 1}') == ServerSettings(steps=7)
    assert ServerSettings().to_json() == "{}"


async def test_the_book_stores_each_server_and_reads_them_back(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "db.sqlite3", images_dir=tmp_path / "images")
    try:
        banned = BannedTerms(["nsfw"])
        book = await ServerSettingsBook.open(store, BASE, banned)
        assert book.get(1) == ServerSettings() and book.banned(1) is banned
        await book.put(1, ServerSettings(max_count=2, banned_terms=("kite",)), by=99)
        await book.put(2, ServerSettings(steps=10), by=98)
        rows = await store._fetchall(
            "SELECT guild_id, settings, updated_by FROM server_settings ORDER BY guild_id"
        )
        assert [tuple(r) for r in rows] == [
            (1, '{"banned_terms": ["kite"], "max_count": 2}', 99),
            (2, '{"steps": 10}', 98),
        ]
        assert book.banned(1).find("a NSFW kite") == ["nsfw", "kite"]
        # However it is written: a Cyrillic look-alike and a zero-width space are still the server's term.
        assert book.banned(1).find("a k\u0456\u200bte") == ["kite"]
        assert book.banned(2).find("a kite") == [] and book.banned(None) is banned
        assert book.generate(2).steps == 10 and book.generate(None) == BASE

        again = await ServerSettingsBook.open(store, BASE, banned)
        assert again.get(1) == ServerSettings(max_count=2, banned_terms=("kite",))
        # Back to nothing changed: the row goes.
        await again.put(1, ServerSettings(), by=99)
        assert [r["guild_id"] for r in await store._fetchall("SELECT guild_id FROM server_settings")] == [2]
        assert again.banned(1) is banned
    finally:
        await store.close()


def test_a_server_plan_through_the_engine_keeps_its_own_bounds() -> None:
    """The engine plans with the server's changes over its own settings; other servers keep theirs."""
    from tests.fake_engine import FakeEngine

    engine = FakeEngine()
    engine.settings = dataclasses.replace(BASE, steps=5)
    narrow = ServerSettings(max_count=1, steps=3)
    assert engine.plan(GenerationRequest("x"), narrow).steps == 3
    assert engine.plan(GenerationRequest("x")).steps == 5
    with pytest.raises(GenerationError):
        engine.plan(GenerationRequest("x", count=2), narrow)


def two_presets() -> Presets:
    return Presets({name: Preset(name, f"fake-{name}", "sd1", "clip", BASE) for name in ("sd-v1-4", "sd2")})


def test_a_servers_model_is_checked_and_falls_back_when_the_config_drops_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    presets = two_presets()
    server = ServerSettings().changed("model", " sd2 ", BASE, presets)
    assert server.model == "sd2" and presets.server_model(server) == "sd2"
    assert server.describe("model", BASE, presets) == ("sd2", True)
    with pytest.raises(SettingError) as refused:
        server.changed("model", "sd3", BASE, presets)
    assert str(refused.value) == "There is no model preset “sd3”; choose one of sd-v1-4, sd2."
    # The bot's default keeps nothing for the server.
    assert server.changed("model", "sd-v1-4", BASE, presets).empty
    assert ServerSettings().describe("model", BASE, presets) == ("sd-v1-4", False)
    # The config no longer has sd2: the server's requests get the default, with a log line and no error.
    only_default = Presets({"sd-v1-4": presets.get(None)})
    with caplog.at_level("WARNING", logger="i2p2i.presets"):
        assert only_default.server_model(server, 7) is None
    assert "server 7 chose model preset 'sd2'" in caplog.text
    assert server.describe("model", BASE, only_default) == ("sd-v1-4", False)
    assert ServerSettings.from_json(server.to_json()) == server
