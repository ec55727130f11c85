"""Security: who may press what, what the bot downloads, where its token may appear, what it asks Discord for.

The real bot and the smoke engine against the loopback Discord; every refusal is checked against the
database and the fake's messages, so "refused" also means "nothing changed".
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import pkgutil
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import discord
import pytest
import yarl
from PIL import Image

import cogs
from cogs.imagine import downloadable
from i2p2i_bot.app import RedactTokens, redact_tokens_in_logs
from i2p2i_bot.config import DiscordSettings, Settings
from i2p2i_bot.delivery import CHANNEL_PERMISSION_NAMES, CHANNEL_PERMISSIONS
from i2p2i_bot.engine import Engine
from i2p2i_bot.replies import PrivateView
from tests.bot_harness import bot_settings, png_bytes, running_i2p2i
from tests.discord_fake import FakeDiscord, StoredMessage, World, running_fake_discord
from tests.test_bot import describe, ephemeral_answer, eventually, generate

ROOT = Path(__file__).resolve().parent.parent
ATTACHMENT_GETS = (
    "GET /attachments/{channel}/{attachment}/{filename}",
    "GET /media/attachments/{channel}/{attachment}/{filename}",
)
# Shaped like a real bot token (base64 user id, timestamp, HMAC), and found nowhere else.
TOKEN = "MTU3NDQ4NDIxOTExODM1NDQzNQ.GqZ7xK.s3cr3t-T0ken-n0t-t0-b3-f0und-AnywHere_xYz"
SECRET_DETAIL = "internal-detail-7f3a9c"


# Bookkeeping of answers in flight: a describe's row goes just after its card is posted, which a test that
# has seen the card may catch either way.
TRANSIENT_TABLES = {"pending_describes"}


def database_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table but the transient ones, read through a second, read-only connection."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        tables = [
            row[0]
            for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if row[0] not in TRANSIENT_TABLES
        ]
        return {table: db.execute(f'SELECT * FROM "{table}" ORDER BY rowid').fetchall() for table in tables}


def public_messages(server: FakeDiscord) -> dict[int, tuple[Any, ...]]:
    """What members see: each non-ephemeral message's text, buttons, files, and whether it is gone."""
    return {
        m.id: (
            m.content,
            json.dumps(m.embeds),
            m.custom_ids(),
            [a.filename for a in m.attachments],
            m.deleted,
        )
        for m in server.messages
        if not m.ephemeral
    }


@dataclasses.dataclass
class Snapshot:
    rows: dict[str, list[tuple[Any, ...]]]
    messages: dict[int, tuple[Any, ...]]
    active: list[int]
    paused: bool


def snapshot(bot: Any, server: FakeDiscord) -> Snapshot:
    return Snapshot(
        database_rows(bot.settings.database_path),
        public_messages(server),
        [job.id for job in bot.queue.active_jobs()],
        bot.queue.paused,
    )


async def refused(handle: Any) -> str:
    """The refusal a member got: ephemeral, one short note, and no modal opened."""
    text = await ephemeral_answer(handle)
    assert handle.response_type != 9
    assert len(text) <= 200 and "\n" not in text, text
    return text


# -- owner checks --------------------------------------------------------------------------------------------

# Every action of every button and select family, and who may use it: "owner" (and admins), or "anyone"
# for read-only ones. A family or action the bot registers that is not listed here fails the test below.
POLICY = {
    ("job", "cancel"): "owner",
    ("job", "info"): "anyone",
    ("job", "reroll"): "owner",
    ("job", "retry"): "owner",
    ("job", "edit"): "owner",
    ("job", "delete"): "owner",
    ("job", "image"): "owner",
    ("card", "gen"): "owner",
    ("card", "edit"): "owner",
    ("card", "use"): "owner",
    ("card", "neg"): "owner",
    ("card", "noneg"): "owner",
    ("card", "more"): "owner",
    ("card", "set"): "owner",
    ("card", "mode"): "owner",
    ("card", "keep"): "owner",
    ("card", "wts"): "owner",
}


def registered_actions(bot: Any) -> dict[re.Pattern[str], list[str]]:
    """The custom_id templates of every DynamicItem the bot registered, with each one's actions."""
    # discord.py keeps the registered DynamicItem classes by their compiled template.
    registry: dict[re.Pattern[str], type] = bot._connection._view_store._dynamic_items
    actions = {}
    for pattern in registry:
        found = re.search(r"\(\?P<action>([\w|]+)\)", pattern.pattern)
        actions[pattern] = found.group(1).split("|") if found else [pattern.pattern.split(":")[2]]
    return actions


async def test_every_button_family_refuses_other_members(
    server: FakeDiscord, settings_for, engine: Engine, astronaut: Image.Image
) -> None:
    """Bob presses each of Alice's buttons and selects: a short private note, and nothing changes anywhere."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        _, card = await describe(server, astronaut, mode="candidates")
        done = await generate(server, card)
        await server.wait_until(lambda: done.original.attachments or None, timeout_s=60)
        await eventually(lambda: bot.store.get_job(1), lambda job: job.delivered_at is not None)
        bot.queue.pause()
        waiting = await generate(server, card)
        # Its place in the queue is edited in once, right after it is queued; let that happen first.
        edit = "PATCH /webhooks/{app}/{token}/messages/{message}"
        await server.wait_for(
            route=edit, predicate=lambda c: c.params["token"] == waiting.token, timeout_s=30
        )
        # A job its owner cancelled: its message offers Retry.
        dropped = await generate(server, card)
        cancel = await server.push_button(dropped.original, "i2p:job:cancel:3")
        await cancel.wait_response()
        await eventually(lambda: bot.store.get_job(3), lambda job: job.delivered_at is not None)
        targets: dict[tuple[str, str], tuple[StoredMessage, str, list[str] | None]] = {
            ("job", "cancel"): (waiting.original, "i2p:job:cancel:2", None),
            ("job", "retry"): (server.message(dropped.original.id), "i2p:job:retry:3", None),
            ("job", "info"): (done.original, "i2p:job:info:1", None),
            ("job", "reroll"): (done.original, "i2p:job:reroll:1", None),
            ("job", "edit"): (done.original, "i2p:job:edit:1", None),
            ("job", "delete"): (done.original, "i2p:job:delete:1", None),
            ("job", "image"): (done.original, "i2p:job:image:1", ["subtle:0"]),
        }
        # A best card offers Apply negative and More prompts; the candidates card, its negative applied,
        # offers Remove negative, and once it keeps layout, Guide weights.
        _, best = await describe(server, astronaut, mode="best")
        applied = await server.push_button(card, next(c for c in card.custom_ids() if ":neg:" in c))
        await applied.wait_response()
        keep = await server.push_select(card, next(c for c in card.custom_ids() if ":keep:" in c), ["layout"])
        await keep.wait_response()
        card = server.message(card.id)
        for message in (card, best):
            for custom_id in message.custom_ids():
                action = custom_id.split(":")[2]
                values = {"mode": ["fast"], "keep": ["edges", "layout"]}.get(action)
                targets.setdefault(("card", action), (message, custom_id, values))

        # Every registered family and action has a policy, and this test presses each of them.
        for pattern, actions in registered_actions(bot).items():
            family = pattern.pattern.split(":")[1]
            for action in actions:
                assert (family, action) in POLICY, (
                    f"{pattern.pattern}: who may use {action!r}? add it to POLICY"
                )
                _, custom_id, _ = targets[(family, action)]
                match = pattern.fullmatch(custom_id)
                assert match is not None and match.groupdict().get("action", action) == action
        assert set(targets) == set(POLICY)

        for key, (message, custom_id, values) in targets.items():
            before = snapshot(bot, server)
            if values is None:
                handle = await server.push_button(message, custom_id, user="bob")
            else:
                handle = await server.push_select(message, custom_id, values, user="bob")
            if POLICY[key] == "anyone":
                answer = (await handle.wait_response()).json
                assert answer["type"] == 4 and answer["data"]["flags"] & 64
            else:
                text = await refused(handle)
                assert f"<@{server.user('alice').id}>" in text, (key, text)
            assert snapshot(bot, server) == before, key
        assert [job.id for job in bot.queue.active_jobs()] == [2]


def test_every_in_memory_view_checks_its_member() -> None:
    """Each View class in cogs/ and the package's Discord modules is a PrivateView, so a new one cannot
    forget the owner check."""
    found = []
    names = [f"cogs.{m.name}" for m in pkgutil.iter_modules(cogs.__path__)]
    names += ["i2p2i_bot.job_controls", "i2p2i_bot.delivery", "i2p2i_bot.cards"]
    for name in names:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, discord.ui.View)
                and value.__module__ == module.__name__
            ):
                found.append(value)
                assert issubclass(value, PrivateView), f"{value.__qualname__} must check who presses it"
    assert {view.__name__ for view in found} >= {"Pager", "ForgetConfirm", "ChooseImageView"}


async def test_commands_and_private_views_refuse_other_members(
    server: FakeDiscord, settings_for, engine: Engine, astronaut: Image.Image
) -> None:
    """/admin refuses a member, and /job one who was not where the job was posted; nobody confirms
    another's /forget or picks from their picker."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        # Every command has a rule: acts on the invoker's own data, or is for the owner and admins.
        policy = {
            "imagine": "own",
            "imagine-from": "own",
            "Imagine from image": "own",
            "history": "own",
            "queue": "own",
            "forget": "own",
            "job": "owner, admin, or who can see where it was posted",
            "admin": "admin",
            "settings": "admin",
            "loras": "anyone: lists the server's LoRAs, nobody's data",
        }
        assert {c.name for c in bot.tree.get_commands()} | {"Imagine from image"} == set(policy)
        _, card = await describe(server, astronaut, user="alice")
        bot.queue.pause()
        await generate(server, card)
        bot.queue.resume()
        await eventually(lambda: bot.store.get_job(1), lambda job: job.delivered_at is not None, 60)
        bot.queue.pause()
        await generate(server, card)
        _, bob_card = await describe(server, astronaut.rotate(90), user="bob")

        for name, options, where in (
            ("admin pause", {}, {}),
            ("admin resume", {}, {}),
            ("admin cancel", {"job_id": 2}, {}),
            ("admin queue", {}, {}),
            ("settings show", {}, {}),
            ("settings set", {"key": "max_count", "value": "1"}, {}),
            ("settings reset", {"key": "all"}, {}),
            # Alice's job was posted in #general; Bob asks from his DMs with the bot.
            ("job", {"job_id": 1}, {"dm": True}),
        ):
            before = snapshot(bot, server)
            text = await refused(await server.push_slash(name, options, user="bob", **where))
            assert "Only the bot's owner" in text or "is not yours" in text, (name, text)
            assert snapshot(bot, server) == before, name

        # Bob asks to forget his history; Alice presses his confirmation's buttons.
        forget = await server.push_slash("forget", user="bob")
        await forget.wait_response()
        confirmation = forget.original
        assert confirmation is not None
        for custom_id in confirmation.custom_ids():
            before = snapshot(bot, server)
            text = await refused(await server.push_button(confirmation, custom_id, user="alice"))
            assert "Only the member who opened this" in text
            assert snapshot(bot, server) == before
        assert await bot.store.get_interrogation(int(bob_card.custom_ids()[0].split(":")[3])) is not None

        # Alice's private picker for a message with two images: Bob cannot pick for her.
        first = server.add_attachment(png_bytes(astronaut), "a.png", ephemeral=False)
        second = server.add_attachment(png_bytes(astronaut.rotate(180)), "b.png", ephemeral=False)
        posted = await server.post_user_message("general", "bob", "two", attachments=[first, second])
        picker = await server.push_message_command("Imagine from image", posted, user="alice")
        await picker.wait_response()
        before = snapshot(bot, server)
        choice = picker.original
        assert choice is not None
        pick = await server.push_select(choice, choice.custom_ids()[0], ["1"], user="bob")
        assert "Only the member who opened this" in await refused(pick)
        assert snapshot(bot, server) == before


async def test_job_shows_another_members_job_only_where_it_was_posted(
    base_settings: Settings, tmp_path: Path, engine: Engine
) -> None:
    """/job of Alice's job: a member of the server it was posted in, who can see its channel, reads its
    prompt, settings and images list without buttons or delivery notes; from another server, a DM, or
    without access to the channel, and for a job asked for in a DM, one sentence and nothing changes."""
    world = World.default(guild_count=2)
    first, second = world.guilds
    bob = world.user("bob")
    first.channel("bot-log").permission_overwrites = [
        {"id": str(bob.id), "type": 1, "allow": "0", "deny": str(1 << 10)}  # View Channel
    ]
    async with running_fake_discord(world) as server:
        settings = bot_settings(base_settings, tmp_path / "data", server)
        async with running_i2p2i(settings, server, engine) as bot:
            for channel, dm in (("general", False), ("bot-log", False), ("general", True)):
                handle = await server.push_slash(
                    "imagine", {"prompt": f"a kite over {channel}", "count": 1}, channel=channel, dm=dm
                )
                await handle.wait_followup(timeout_s=30)
            guilds = []
            for job_id in (1, 2, 3):
                job = await eventually(
                    lambda n=job_id: bot.store.get_job(n), lambda job: job.delivered_at is not None, 60
                )
                guilds.append(job.guild_id)
            assert guilds == [first.id, first.id, None]

            async def shown(job_id: int, user: str, **where: Any) -> dict[str, Any]:
                before = snapshot(bot, server)
                handle = await server.push_slash("job", {"job_id": job_id}, user=user, **where)
                data = (await handle.wait_response()).json["data"]
                assert data["flags"] & 64 and snapshot(bot, server) == before
                return data

            seen = await shown(1, "bob")
            (embed,) = seen["embeds"]
            assert embed["title"] == "Job #1 · complete" and "a kite over general" in json.dumps(embed)
            assert {"Prompt", "Seeds", "Images", "Steps"} <= {f["name"] for f in embed["fields"]}
            assert "Result" not in {f["name"] for f in embed["fields"]}
            assert not seen.get("components")
            assert seen == await shown(1, "mod", channel="bot-log")  # anywhere in that server

            refusal = "is not yours, and was not posted where you can see it."
            for job_id, user, where in (
                (1, "bob", {"guild": second.id}),  # another server
                (1, "bob", {"dm": True}),
                (2, "bob", {}),  # posted in a channel Bob cannot view
                (3, "bob", {}),  # asked for in Alice's DMs with the bot
                (3, "mod", {}),
            ):
                before = snapshot(bot, server)
                handle = await server.push_slash("job", {"job_id": job_id}, user=user, **where)
                assert await refused(handle) == f"Job #{job_id} {refusal}", (job_id, user, where)
                assert snapshot(bot, server) == before

            assert "a kite over bot-log" in json.dumps((await shown(2, "mod"))["embeds"])
            # The owner and admins see it all, with the buttons, wherever they ask.
            for user, where in (("alice", {}), ("alice", {"guild": second.id}), ("owner", {})):
                data = await shown(3, user, **where)
                assert "i2p:job:reroll:3" in json.dumps(data["components"]), (user, where)


# -- downloads -----------------------------------------------------------------------------------------------


DEFAULT_API = DiscordSettings().api_base


def attachment_gets(server: FakeDiscord) -> list[Any]:
    return [c for c in server.calls() if c.route in ATTACHMENT_GETS]


async def test_a_redirecting_attachment_is_not_followed(
    server: FakeDiscord, settings_for, engine: Engine, astronaut: Image.Image
) -> None:
    """An attachment URL that answers 302 to another host is refused; the other host is never asked."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        elsewhere = server.add_attachment(png_bytes(astronaut), "elsewhere.png")
        target = elsewhere.url.replace("127.0.0.1", "localhost")
        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        server.respond_next(ATTACHMENT_GETS[0], status=302, body=None, headers={"Location": target})
        handle = await server.push_slash("imagine-from", {"image": upload})
        assert "upload it again" in await ephemeral_answer(handle)
        (get,) = attachment_gets(server)
        assert get.status == 302 and get.params["attachment"] == str(upload.id)
        assert await bot.store.recent_interrogations(server.user("alice").id) == []


@pytest.mark.parametrize("where", ["attachment", "embed"])
async def test_images_off_discord_hosts_are_not_downloaded(
    server: FakeDiscord, settings_for, engine: Engine, astronaut: Image.Image, where: str
) -> None:
    """An attachment or embed image whose URL is on a host other than Discord's is refused without a GET."""
    async with running_i2p2i(settings_for(server), server, engine) as bot:
        upload = server.add_attachment(png_bytes(astronaut), "photo.png", ephemeral=where == "attachment")
        foreign = upload.url.replace("127.0.0.1", "localhost")
        if where == "attachment":
            upload.url_override = foreign
            handle = await server.push_slash("imagine-from", {"image": upload})
        else:
            embed = {"type": "image", "url": foreign, "image": {"url": foreign, "width": 512, "height": 512}}
            posted = await server.post_user_message("general", "bob", "look", embeds=[embed])
            handle = await server.push_message_command("Imagine from image", posted)
        assert "only download images hosted by Discord" in await ephemeral_answer(handle)
        assert attachment_gets(server) == []
        assert await bot.store.recent_interrogations(server.user("alice").id) == []


@pytest.mark.parametrize(
    ("url", "api_base", "allowed"),
    [
        ("https://cdn.discordapp.com/attachments/1/2/a.png?ex=1", DEFAULT_API, True),
        ("https://media.discordapp.net/external/x/https/example.com/a.png", DEFAULT_API, True),
        ("http://cdn.discordapp.com/attachments/1/2/a.png", DEFAULT_API, False),
        ("https://cdn.discordapp.com:8443/attachments/1/2/a.png", DEFAULT_API, False),
        ("https://cdn.discordapp.com.example.com/a.png", DEFAULT_API, False),
        ("https://cdn.discordapp.com@example.com/a.png", DEFAULT_API, False),
        ("https://discord.com/api/v10/a.png", DEFAULT_API, False),
        ("https://example.com/a.png", DEFAULT_API, False),
        ("http://127.0.0.1:8765/attachments/1/a.png", "http://127.0.0.1:8765/api/v10", True),
        ("http://127.0.0.1:9999/attachments/1/a.png", "http://127.0.0.1:8765/api/v10", False),
        ("https://127.0.0.1:8765/attachments/1/a.png", "http://127.0.0.1:8765/api/v10", False),
        ("https://proxy.example/attachments/1/a.png", "https://proxy.example/api/v10", True),
    ],
)
def test_only_discords_file_hosts_or_the_configured_proxy_are_downloaded_from(
    url: str, api_base: str, allowed: bool
) -> None:
    """https on Discord's file hosts; a proxy's own origin only when one is configured; nothing else."""
    assert downloadable(yarl.URL(url), api_base) is allowed


@pytest.mark.parametrize(("declared", "cap_mb"), [(26 * 1024 * 1024, 25), (2 * 1024 * 1024, 1)])
async def test_declared_size_over_the_cap_is_refused_before_any_get(
    server: FakeDiscord,
    settings_for,
    engine: Engine,
    astronaut: Image.Image,
    declared: int,
    cap_mb: int,
) -> None:
    """The size Discord declares is checked first: a file over intake.max_bytes is never fetched."""
    settings = settings_for(server)
    intake = dataclasses.replace(settings.intake, max_bytes=cap_mb * 1024 * 1024)
    async with running_i2p2i(dataclasses.replace(settings, intake=intake), server, engine):
        upload = server.add_attachment(png_bytes(astronaut), "photo.png")
        upload.declared_size = declared
        handle = await server.push_slash("imagine-from", {"image": upload})
        assert f"the limit is {cap_mb} MB" in await ephemeral_answer(handle)
        assert attachment_gets(server) == []


async def test_a_file_bigger_than_declared_is_cut_off_at_the_cap(
    server: FakeDiscord, settings_for, engine: Engine
) -> None:
    """A declared size that lies does not help: the download stops at the cap, and the file is refused."""
    settings = settings_for(server)
    intake = dataclasses.replace(settings.intake, max_bytes=1024 * 1024)
    async with running_i2p2i(dataclasses.replace(settings, intake=intake), server, engine):
        upload = server.add_attachment(b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * 1024 * 1024), "big.png")
        upload.declared_size = 50 * 1024
        handle = await server.push_slash("imagine-from", {"image": upload})
        assert "larger than the 1 MB limit" in await ephemeral_answer(handle)
        assert len(attachment_gets(server)) == 1


# -- the token -----------------------------------------------------------------------------------------------


def _format(record: logging.LogRecord) -> str:
    return logging.Formatter("%(name)s %(levelname)s %(message)s").format(record)


async def test_the_token_appears_nowhere(
    settings_for, engine: Engine, astronaut: Image.Image, caplog: pytest.LogCaptureFixture
) -> None:
    """Happy path, errors, a gateway resume and a restart at DEBUG: the token is in no log record, database
    column, file, request body, file name or message; nor is an internal error's text shown to a member.
    No interaction token is in discord.py's or the bot's log records either."""
    caplog.set_level(logging.DEBUG)
    async with running_fake_discord(token=TOKEN) as server:
        settings = settings_for(server, stop_grace_s=0.2)
        assert TOKEN not in repr(settings)
        async with running_i2p2i(settings, server, engine) as bot:
            _, card = await describe(server, astronaut)
            press = await generate(server, card)
            await server.wait_until(lambda: press.original.attachments or None, timeout_s=60)
            # A member's mistake, and a bug of ours with a detail that must stay in the log.
            bad = server.add_attachment(b"not an image at all", "x.png", content_type="image/png")
            assert "not an image" in await ephemeral_answer(
                await server.push_slash("imagine-from", {"image": bad})
            )

            async def broken(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError(f"store failed: {SECRET_DETAIL}")

            bot.store.recent_jobs = broken  # type: ignore[method-assign]
            oops = await ephemeral_answer(await server.push_slash("history"))
            assert "error id" in oops and SECRET_DETAIL not in oops
            # A late delivery through the bot's own REST session, and a gateway resume.
            bot.queue.pause()
            late = await generate(server, card)
            late.expire()
            mark = server.frame_mark()
            server.drop_connection()
            await server.wait_for_frame(op=6, since=mark, timeout_s=30)
            bot.queue.resume()
            await server.wait_for(route="POST /channels/{channel}/messages", timeout_s=60)
        async with running_i2p2i(settings, server, engine) as bot:  # a restart: a second IDENTIFY
            await describe(server, astronaut.rotate(90))

        # The token did travel where it must: the Authorization header, IDENTIFY and RESUME.
        assert any(c.authorization == f"Bot {TOKEN}" for c in server.calls())
        sent = server.frames(direction="in")
        assert {f.op for f in sent if TOKEN in json.dumps(f.d)} == {2, 6}
        assert len([f for f in sent if f.op == 2]) == 2

        for call in server.calls():
            body = json.dumps([call.path, call.query, call.json, call.response], default=str)
            assert TOKEN not in body, str(call)
            assert SECRET_DETAIL not in body, str(call)
            for upload in call.files:
                assert TOKEN not in upload.filename and TOKEN.encode() not in upload.data
        for frame in server.frames(direction="out"):
            assert TOKEN not in json.dumps(frame.d)
        for message in server.messages:
            assert TOKEN not in json.dumps(message.payload())

        data = settings.data_path
        rows = database_rows(settings.database_path)
        assert rows["jobs"] and rows["interrogations"]
        for table, table_rows in rows.items():
            for row in table_rows:
                for value in row:
                    if isinstance(value, str | bytes):
                        needle: Any = TOKEN if isinstance(value, str) else TOKEN.encode()
                        assert needle not in value, table
        files = [path for path in data.rglob("*") if path.is_file()]
        assert any(path.suffix == ".png" for path in files)
        for path in files:
            assert TOKEN.encode() not in path.read_bytes(), path

        records = caplog.get_records("call")
        assert any(r.name.startswith("discord.http") and r.levelno == logging.DEBUG for r in records)
        assert any(SECRET_DETAIL in _format(r) for r in records)  # the bug's detail went to the log ...
        leaks = [_format(r) for r in records if TOKEN in _format(r)]
        assert leaks == []  # ... and the token went nowhere

        # discord.py logged the interactions' callback and followup URLs and their gateway events, without
        # the tokens in them. (The fake's own records name the tokens it serves, so they are left out.)
        bot_records = [_format(r) for r in records if r.name.startswith(("discord.", "i2p2i"))]
        for url in ("/interactions/{id}/[token]/callback", "/webhooks/{id}/[token]/"):
            pattern = re.escape(url).replace(re.escape("{id}"), r"\d+")
            assert any(re.search(pattern, text) for text in bot_records), url
        assert any("INTERACTION_CREATE" in text and "'token': '[token]'" in text for text in bot_records)
        tokens = [record.token for record in server.interactions.values()]
        assert len(tokens) >= 4
        assert [text for text in bot_records if any(token in text for token in tokens)] == []


# An interaction token and a webhook token as Discord makes them: URL-safe base64, long.
INTERACTION_TOKEN = "aW50ZXJhY3Rpb246MTM4NjQ0NTkyOTMzMzY1MjU2NDpaS0x6eGV2S2ZZa3FjVWdTbk9rZkZ2dW1DVjQ3"
WEBHOOK_TOKEN = "Xq3-4d_9ZpLkVb2mN8rT0wYc7JhGfE1sQaUoI6xCvB5nMlKjHgFdSaPoIuYtReWqAzXsCd"


class Received(logging.Handler):
    """Keeps the records that reach it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def discord_records() -> Iterator[list[logging.LogRecord]]:
    """The records of discord.py's loggers, at DEBUG, as a handler on each of them receives them."""
    redact_tokens_in_logs()
    handler = Received()
    loggers = [
        logging.getLogger(name) for name in ("discord.http", "discord.webhook.async_", "discord.gateway")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
    yield handler.records
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_tokens_in_discord_log_urls_and_events_become_a_placeholder(
    discord_records: list[logging.LogRecord],
) -> None:
    """discord.py's own messages, formatted from their arguments, reach a handler with [token] for each
    token and everything else as it was; a record with no token is left exactly as it was logged."""
    api = "https://discord.com/api/v10"
    callback = f"{api}/interactions/1386445929333652564/{INTERACTION_TOKEN}/callback?with_response=true"
    followup = f"{api}/webhooks/1286445929333652000/{INTERACTION_TOKEN}/messages/@original"
    http, webhook, gateway = (
        logging.getLogger(name) for name in ("discord.http", "discord.webhook.async_", "discord.gateway")
    )
    http.debug("%s %s with %s has returned %s", "POST", callback, None, 204)
    http.warning(
        "We are being rate limited. %s %s responded with 429. Retrying in %.2f seconds.",
        "POST",
        f"{api}/webhooks/1286445929333652000/{WEBHOOK_TOKEN}",
        1.5,
    )
    webhook.debug(
        "Webhook ID %s with %s %s has returned status code %s", 1286445929333652000, "PATCH", followup, 200
    )
    event = {
        "t": "INTERACTION_CREATE",
        "op": 0,
        "d": {"id": "1386445929333652564", "token": INTERACTION_TOKEN},
    }
    gateway.debug("For Shard ID %s: WebSocket Event: %s", None, event)
    http.debug("%s %s has received %s", "GET", f"{api}/channels/123/messages/456", {"id": "456"})

    messages = [record.getMessage() for record in discord_records]
    assert messages == [
        f"POST {api}/interactions/1386445929333652564/[token]/callback?with_response=true with None has "
        "returned 204",
        f"We are being rate limited. POST {api}/webhooks/1286445929333652000/[token] responded with 429. "
        "Retrying in 1.50 seconds.",
        f"Webhook ID 1286445929333652000 with PATCH {api}/webhooks/1286445929333652000/[token]/messages/"
        "@original has returned status code 200",
        "For Shard ID None: WebSocket Event: {'t': 'INTERACTION_CREATE', 'op': 0, 'd': {'id': "
        "'1386445929333652564', 'token': '[token]'}}",
        f"GET {api}/channels/123/messages/456 has received {{'id': '456'}}",
    ]
    untouched = discord_records[-1]
    assert untouched.msg == "%s %s has received %s" and untouched.args == (
        "GET",
        f"{api}/channels/123/messages/456",
        {"id": "456"},
    )
    assert all(INTERACTION_TOKEN not in m and WEBHOOK_TOKEN not in m for m in messages)


def test_redaction_is_installed_once_on_each_discord_logger() -> None:
    """Building a second bot, or calling it again, does not stack filters."""
    redact_tokens_in_logs()
    redact_tokens_in_logs()
    for name in ("discord.http", "discord.webhook.async_", "discord.gateway"):
        filters = logging.getLogger(name).filters
        assert len([f for f in filters if isinstance(f, RedactTokens)]) == 1, name


def test_a_record_whose_arguments_do_not_fit_is_left_for_the_handler_to_report() -> None:
    """A broken format string does not raise inside the filter (which would reach discord.py's code)."""
    record = logging.LogRecord("discord.http", logging.DEBUG, __file__, 1, "%s %s", ("one",), None)
    assert RedactTokens().filter(record) is True
    assert (record.msg, record.args) == ("%s %s", ("one",))


# -- what the bot asks Discord for ---------------------------------------------------------------------------


def _documented_permissions(text: str) -> dict[str, int]:
    section = text.split("## Channel permissions", 1)[1].split("\n## ", 1)[0]
    return {
        name.strip(): int(bit)
        for name, bit in re.findall(r"^\| ([A-Z][\w ]+?) +\| (\d+) +\|", section, flags=re.MULTILINE)
    }


async def test_permissions_scopes_and_intents_match_the_docs(
    base_settings: Settings,
    tmp_path: Path,
    engine: Engine,
    astronaut: Image.Image,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """docs/permissions.md names exactly what the bot uses: the channel permissions a late result needs, two
    scopes, the guilds intent, every command; a bot whose role has only those posts a late result."""
    docs = (ROOT / "docs" / "permissions.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = _documented_permissions(docs)
    assert set(table) == set(CHANNEL_PERMISSION_NAMES)
    for label, permission in CHANNEL_PERMISSION_NAMES.items():
        assert table[label] == permission.value, label
    assert sum(table.values()) == CHANNEL_PERMISSIONS.value
    for text in (docs, readme):
        assert set(re.findall(r"scope=([\w.+]+)", text)) == {"bot+applications.commands"}
    scopes = docs.split("## OAuth2 scopes", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^- `([\w.]+)`", scopes, flags=re.MULTILINE) == ["bot", "applications.commands"]
    intents_section = docs.split("## Gateway intents", 1)[1].split("\n## ", 1)[0]
    documented = discord.Intents.none()
    for name in re.findall(r"`(\w+)`", intents_section.splitlines()[1]):
        setattr(documented, name, True)

    world = World.default()
    for role in world.guild().roles:
        # The bot's role grants exactly the documented permissions; @everyone grants nothing on top.
        role.permissions = CHANNEL_PERMISSIONS.value if role.managed else 0
    caplog.set_level(logging.INFO)
    async with running_fake_discord(world) as server:
        settings = bot_settings(base_settings, tmp_path / "data", server)
        async with running_i2p2i(settings, server, engine) as bot:
            assert bot.intents == documented
            identify = server.frames(op=2, direction="in")[0]
            assert identify.d["intents"] == documented.value
            listed = set(re.findall(r"`/([\w-]+)", scopes)) | set(re.findall(r'"([A-Z][\w ]+)"', scopes))
            assert listed == {c["name"] for c in server.synced_commands()}
            _, card = await describe(server, astronaut)
            bot.queue.pause()
            press = await generate(server, card)
            press.expire()
            bot.queue.resume()
            posted = await server.wait_for(route="POST /channels/{channel}/messages", timeout_s=60)
            assert posted.ok and posted.files and posted.json["embeds"]
            (result,) = [m for m in server.messages_in("general") if m.id == int(posted.response["id"])]
            assert result.embeds and result.attachments  # Discord kept all of it
    assert not [r for r in caplog.get_records("call") if "missing permissions" in r.getMessage()]


@pytest.mark.parametrize("missing", list(CHANNEL_PERMISSION_NAMES))
async def test_each_documented_permission_is_needed(
    base_settings: Settings,
    tmp_path: Path,
    engine: Engine,
    astronaut: Image.Image,
    missing: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bot's role lacks one documented permission: the late result does not arrive whole in the channel
    (it goes by DM, or without Embed Links Discord drops its embed), and the log names what to grant."""
    world = World.default()
    for role in world.guild().roles:
        role.permissions = (
            CHANNEL_PERMISSIONS.value & ~CHANNEL_PERMISSION_NAMES[missing].value if role.managed else 0
        )
    caplog.set_level(logging.INFO)
    async with running_fake_discord(world) as server:
        settings = bot_settings(base_settings, tmp_path / "data", server)
        async with running_i2p2i(settings, server, engine) as bot:
            _, card = await describe(server, astronaut)
            bot.queue.pause()
            press = await generate(server, card)
            press.expire()
            bot.queue.resume()
            job = await eventually(lambda: bot.store.get_job(1), lambda job: job.delivered_at is not None, 60)
            assert job.status == "complete"
            in_channel = [m for m in server.messages_in("general") if m.content.startswith("<@")]
            if missing == "Embed Links":
                (result,) = in_channel
                assert result.attachments and result.embeds == []
            else:
                assert in_channel == []
                (dm,) = server.dm_messages("alice")
                assert dm.embeds and dm.attachments
    warnings = [r.getMessage() for r in caplog.get_records("call") if "missing permissions" in r.getMessage()]
    assert warnings and all(missing in w for w in warnings), warnings


def test_the_invite_integer_is_the_documented_permissions() -> None:
    """The invite URLs and the stated integer are the sum of the permissions the bot relies on."""
    docs = (ROOT / "docs" / "permissions.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    expected = str(CHANNEL_PERMISSIONS.value)
    assert f"(integer {expected})" in docs
    for text in (docs, readme):
        assert set(re.findall(r"permissions=(\d+)", text)) == {expected}


async def test_sqlite_statements_and_their_values_stay_out_of_a_debug_log(tmp_path: Path) -> None:
    """aiosqlite logs each statement with its bound values at DEBUG; with the bot's logging none shows."""
    import aiosqlite

    redact_tokens_in_logs()
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    root = logging.getLogger()
    handler, level = Collect(level=logging.DEBUG), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        async with aiosqlite.connect(tmp_path / "t.sqlite3") as db:
            await db.execute("CREATE TABLE t (token TEXT)")
            await db.execute("INSERT INTO t VALUES (?)", (INTERACTION_TOKEN,))
            await db.commit()
        logging.getLogger("i2p2i.test").debug("still logging at DEBUG")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert "still logging at DEBUG" in seen
    assert all(INTERACTION_TOKEN not in message for message in seen)
