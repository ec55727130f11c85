"""The loopback Discord, proven with a tiny real discord.py bot: commands, components, faults, resume."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from typing import Any, cast

import discord
import pytest
from discord import app_commands
from discord.ext import commands
from PIL import Image

from tests.discord_fake import FakeDiscord, running_bot, running_fake_discord
from tests.discord_fake.gateway import IDENTIFY, RESUME
from tests.discord_fake.interactions import (
    CHANNEL_MESSAGE,
    DEFERRED_CHANNEL_MESSAGE,
    DEFERRED_UPDATE_MESSAGE,
    MODAL,
    UPDATE_MESSAGE,
)
from tests.discord_fake.messages import EPHEMERAL

pytestmark = pytest.mark.filterwarnings("error")

CALLBACK = "POST /interactions/{interaction}/{token}/callback"
FOLLOWUP = "POST /webhooks/{app}/{token}"
CHANNEL_SEND = "POST /channels/{channel}/messages"


class PressButton(discord.ui.DynamicItem[discord.ui.Button], template=r"t:press:(?P<n>\d+)"):
    """A button that survives restarts: its state is the number in its custom_id."""

    def __init__(self, n: int) -> None:
        super().__init__(discord.ui.Button(label=f"Press {n}", custom_id=f"t:press:{n}"))
        self.n = n

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> PressButton:
        return cls(int(match["n"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.edit_message(
            content=f"pressed {self.n} by {interaction.user.name}", view=None
        )


class PromptModal(discord.ui.Modal, title="Edit prompt"):
    prompt: discord.ui.TextInput = discord.ui.TextInput(
        label="Prompt", style=discord.TextStyle.paragraph, max_length=1000
    )

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"prompt: {self.prompt.value}", ephemeral=True)


class StyleView(discord.ui.View):
    """A select whose answer is a deferred update (type 6) followed by an edit of the message it sits on."""

    def __init__(self) -> None:
        super().__init__(timeout=None)

    @discord.ui.select(
        custom_id="t:style",
        options=[
            discord.SelectOption(label="Oil", value="oil"),
            discord.SelectOption(label="Ink", value="ink"),
        ],
    )
    async def style(self, interaction: discord.Interaction, select: discord.ui.Select[StyleView]) -> None:
        await interaction.response.defer()
        await interaction.edit_original_response(content=f"style: {select.values[0]}", view=None)


class TinyBot(commands.Bot):
    """A bot with one of each thing the fake must carry."""

    def __init__(self) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            help_command=None,
            guild_ready_timeout=0.05,
        )
        self.release_late = asyncio.Event()
        self.late_errors: list[discord.HTTPException] = []
        # Set once /choose's view is stored: discord.py stores it after Discord answered the callback, so a
        # click pushed the moment the fake answered could beat it (and be dropped, as discord.py would).
        self.style_offered = asyncio.Event()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """No pause: discord.py sleeps 5 s before each later IDENTIFY, for Discord's identify rate limit."""

    async def setup_hook(self) -> None:
        self.add_dynamic_items(PressButton)
        for command in _commands():
            self.tree.add_command(command)
        await self.tree.sync()


def _commands() -> list[app_commands.Command | app_commands.ContextMenu]:
    @app_commands.command(description="Answer with a file and a button.")
    async def ping(interaction: discord.Interaction, image: discord.Attachment | None = None) -> None:
        await interaction.response.defer(thinking=True)
        data = await image.read() if image is not None else b"pong"
        view = discord.ui.View(timeout=None)
        view.add_item(PressButton(7))
        file = discord.File(io.BytesIO(data), filename="echo.bin")
        await interaction.followup.send(f"pong {len(data)} bytes", file=file, view=view)

    @app_commands.command(description="Open the prompt editor.")
    async def prompt(interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(PromptModal())

    @app_commands.command(description="Answer once the test releases it.")
    async def late(interaction: discord.Interaction) -> None:
        await interaction.response.defer()
        bot = interaction.client
        assert isinstance(bot, TinyBot)
        await bot.release_late.wait()
        try:
            await interaction.followup.send("late result")
        except discord.HTTPException as exc:
            bot.late_errors.append(exc)
            assert isinstance(interaction.channel, discord.TextChannel)
            await interaction.channel.send(f"{interaction.user.mention} late result")

    @app_commands.command(description="Offer a choice of styles.")
    async def choose(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pick a style", view=StyleView())
        cast(TinyBot, interaction.client).style_offered.set()

    @app_commands.command(description="Reply, edit, follow up, edit that, then delete the reply.")
    async def steps(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("step 1")
        await interaction.edit_original_response(content="step 2")
        extra = await interaction.followup.send("extra", ephemeral=True, wait=True)
        await extra.edit(content="extra, edited")
        original = await interaction.original_response()
        assert original.content == "step 2"
        await interaction.delete_original_response()

    @app_commands.command(description="Defer, then send two ephemeral follow-ups.")
    async def whisper(interaction: discord.Interaction, private: bool = False) -> None:
        await interaction.response.defer(thinking=True, ephemeral=private)
        await interaction.followup.send("first", ephemeral=not private)
        await interaction.followup.send("second", ephemeral=True)

    @app_commands.context_menu(name="Echo attachments")
    async def echo_attachments(interaction: discord.Interaction, message: discord.Message) -> None:
        names = ", ".join(a.filename for a in message.attachments)
        await interaction.response.send_message(f"{len(message.attachments)} attachment(s): {names}")

    return [ping, prompt, late, choose, steps, whisper, echo_attachments]


@pytest.fixture
async def server() -> AsyncIterator[FakeDiscord]:
    async with running_fake_discord() as fake:
        yield fake
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not leftover, f"tasks still pending after shutdown: {leftover}"


@pytest.fixture
async def bot(server: FakeDiscord) -> AsyncIterator[TinyBot]:
    async with running_bot(TinyBot(), server) as running:
        yield running


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_login_ready_and_command_sync(server: FakeDiscord, bot: TinyBot) -> None:
    """Login routes, IDENTIFY → READY → GUILD_CREATE and the command sync all reach the fake and back."""
    routes = [call.route for call in server.calls()]
    assert routes[:3] == [
        "GET /users/@me",
        "GET /oauth2/applications/@me",
        "PUT /applications/{app}/commands",
    ]
    assert all(call.authorization == f"Bot {server.token}" for call in server.calls())
    assert [f.t for f in server.frames(direction="out", op=0)][:2] == ["READY", "GUILD_CREATE"]
    assert len(server.frames(op=IDENTIFY)) == 1
    synced = {(c["name"], c["type"]) for c in server.synced_commands()}
    names = {"ping", "prompt", "late", "choose", "steps", "whisper"}
    assert synced == {(name, 1) for name in names} | {("Echo attachments", 3)}
    ping = server.command("ping")
    assert ping is not None and ping["options"][0]["type"] == 11  # the attachment option
    assert bot.user is not None and bot.user.id == server.world.bot_user.id
    guild = bot.get_guild(server.guild.id)
    assert guild is not None and guild.member_count == len(server.guild.members)
    assert guild.me is not None and guild.me.id == bot.user.id  # no members intent: only itself is cached
    nsfw = guild.get_channel(server.channel("art-nsfw").id)
    general = guild.get_channel(server.channel("general").id)
    assert isinstance(nsfw, discord.TextChannel) and nsfw.is_nsfw()
    assert isinstance(general, discord.TextChannel) and not general.is_nsfw()


async def test_ping_defers_then_sends_a_file_followup(server: FakeDiscord, bot: TinyBot) -> None:
    """/ping answers with a deferred callback, then a multipart follow-up whose file bytes arrive intact."""
    handle = await server.push_slash("ping")
    followup = await handle.wait_followup()
    callback = handle.callbacks()[0]
    assert callback.json == {"type": DEFERRED_CHANNEL_MESSAGE}
    assert callback.index < followup.index
    assert followup.query["wait"] == "1"
    assert [(f.field, f.filename, f.data, f.size) for f in followup.files] == [
        ("files[0]", "echo.bin", b"pong", 4)
    ]
    original = handle.original
    assert original is not None and not original.loading
    assert original.content == "pong 4 bytes"
    assert original.file("echo.bin") == b"pong"
    assert original.custom_ids() == ["t:press:7"]
    assert handle.followups == []  # the first follow-up replaced the "thinking…" placeholder


async def test_first_followup_after_a_deferral_keeps_the_deferrals_visibility(
    server: FakeDiscord, bot: TinyBot
) -> None:
    """The first follow-up after a "thinking…" deferral replaces the placeholder and, as on Discord, is as
    public or private as the deferral whatever its own flags say; later follow-ups keep their flags."""
    public = await server.push_slash("whisper")
    first, second = [await public.wait_followup(n) for n in (1, 2)]
    assert first.json["flags"] & EPHEMERAL and second.json["flags"] & EPHEMERAL
    original = public.original
    assert original is not None and (original.content, original.ephemeral) == ("first", False)
    [extra] = public.followups
    assert (extra.content, extra.ephemeral) == ("second", True)
    assert [m.content for m in server.messages_in("general", include_ephemeral=False)] == ["first"]

    private = await server.push_slash("whisper", {"private": True})
    await private.wait_followup(2)
    original = private.original
    assert original is not None and (original.content, original.ephemeral) == ("first", True)
    assert [(m.content, m.ephemeral) for m in private.followups] == [("second", True)]


async def test_attachment_option_is_downloaded_from_the_loopback(server: FakeDiscord, bot: TinyBot) -> None:
    """An attachment option resolves to a loopback URL the bot downloads; its bytes come back in the file."""
    image = _png(4, 3)
    upload = server.add_attachment(image, "cat.png")
    assert (upload.width, upload.height, upload.content_type) == (4, 3, "image/png")
    handle = await server.push_slash("ping", {"image": upload})
    followup = await handle.wait_followup()
    download = server.calls("GET /attachments/{channel}/{attachment}/{filename}")
    assert [(c.params["attachment"], c.status) for c in download] == [(str(upload.id), 200)]
    assert download[0].index < followup.index
    assert followup.files[0].data == image
    assert handle.original is not None and handle.original.content == f"pong {len(image)} bytes"


async def test_dynamic_button_press_edits_the_message(server: FakeDiscord, bot: TinyBot) -> None:
    """Pressing a DynamicItem button delivers a component interaction that updates its message (type 7)."""
    ping = await server.push_slash("ping")
    await ping.wait_followup()
    assert ping.original is not None
    press = await server.push_button(ping.original, "t:press:7", user="bob")
    callback = await press.wait_response()
    assert callback.json["type"] == UPDATE_MESSAGE
    message = server.message(ping.original.id)
    assert message.content == "pressed 7 by bob"
    assert message.components == []
    assert message.revisions[-1]["content"] == "pong 4 bytes"
    with pytest.raises(LookupError, match="no component"):
        await server.push_button(message, "t:press:7")


async def test_select_defers_update_then_edits_its_message(server: FakeDiscord, bot: TinyBot) -> None:
    """A select choice answered with a deferred update (type 6); @original then edits the select's message."""
    offer = await server.push_slash("choose")
    await offer.wait_response()
    await asyncio.wait_for(bot.style_offered.wait(), timeout=5)
    assert offer.original is not None and offer.original.custom_ids() == ["t:style"]
    pick = await server.push_select(offer.original, "t:style", ["ink"], user="bob")
    edit = await pick.wait_call("PATCH /webhooks/{app}/{token}/messages/{message}")
    assert pick.callbacks()[0].json == {"type": DEFERRED_UPDATE_MESSAGE}
    assert pick.callbacks()[0].response["interaction"]["response_message_id"] == str(offer.original.id)
    assert edit.params["message"] == "@original" and edit.ok
    assert pick.original is offer.original
    assert (offer.original.content, offer.original.components) == ("style: ink", [])


async def test_modal_is_opened_and_its_submit_handled(server: FakeDiscord, bot: TinyBot) -> None:
    """/prompt opens a modal (type 9); its submit reaches the modal's on_submit, which replies ephemerally."""
    opened = await server.push_slash("prompt")
    callback = await opened.wait_response()
    assert callback.json["type"] == MODAL
    assert opened.modal is not None and opened.modal["title"] == "Edit prompt"
    submitted = await server.push_modal_submit(opened, {"Prompt": "a red fox, oil on canvas"})
    reply = await submitted.wait_response()
    assert reply.json["type"] == CHANNEL_MESSAGE
    assert reply.json["data"]["content"] == "prompt: a red fox, oil on canvas"
    assert reply.json["data"]["flags"] & EPHEMERAL
    assert submitted.original is not None and submitted.original.ephemeral
    assert reply.response["resource"]["message"]["id"] == str(submitted.original.id)


async def test_message_context_menu_sees_the_target_attachments(server: FakeDiscord, bot: TinyBot) -> None:
    """A message context-menu command gets the resolved message with its attachments."""
    files = [server.add_attachment(_png(8, 8), "a.png"), server.add_attachment(b"notes", "b.txt")]
    target = await server.post_user_message("general", "alice", "look at these", attachments=files)
    handle = await server.push_message_command("Echo attachments", target, user="bob")
    callback = await handle.wait_response()
    assert callback.json["data"]["content"] == "2 attachment(s): a.png, b.txt"
    assert [m.content for m in server.messages_in("general")] == [
        "look at these",
        "2 attachment(s): a.png, b.txt",
    ]


async def test_rate_limited_followup_is_retried(server: FakeDiscord, bot: TinyBot) -> None:
    """A 429 on the follow-up makes discord.py sleep Retry-After and resend: two calls, one message."""
    server.rate_limit_next(FOLLOWUP, retry_after_s=0.05)
    handle = await server.push_slash("ping")
    await handle.wait_followup()
    attempts = handle.calls(FOLLOWUP)
    assert [c.status for c in attempts] == [429, 200]
    assert attempts[1].at - attempts[0].at >= 0.04
    assert attempts[0].fault is not None and attempts[0].fault.startswith("rate-limit-user")
    assert [m.content for m in server.messages_in("general")] == ["pong 4 bytes"]


async def test_server_error_on_followup_is_retried(server: FakeDiscord, bot: TinyBot) -> None:
    """A 500 on the follow-up is retried by discord.py (after its 1 s back-off): two calls, one message."""
    server.fail_next(FOLLOWUP, status=500)
    handle = await server.push_slash("ping")
    await handle.wait_followup(timeout_s=5.0)
    assert [c.status for c in handle.calls(FOLLOWUP)] == [500, 200]
    assert len(server.messages_in("general")) == 1


async def test_global_rate_limit_on_channel_send_is_retried(server: FakeDiscord, bot: TinyBot) -> None:
    """A global 429 on a bot REST route pauses discord.py's HTTP client, then the send succeeds."""
    server.rate_limit_next(CHANNEL_SEND, scope="global", retry_after_s=0.05)
    channel = bot.get_channel(server.channel("bot-log").id)
    assert isinstance(channel, discord.TextChannel)
    sent = await channel.send("hello")
    assert [c.status for c in server.calls(CHANNEL_SEND)] == [429, 200]
    assert server.calls(CHANNEL_SEND)[0].response["global"] is True
    assert [m.id for m in server.messages_in("bot-log")] == [sent.id]


async def test_expired_token_raises_http_exception_and_bot_falls_back(
    server: FakeDiscord, bot: TinyBot
) -> None:
    """After 15 minutes a follow-up gets 401 50027, which discord.py raises as a plain HTTPException."""
    handle = await server.push_slash("late", user="alice")
    await handle.wait_response()
    server.clock.advance(15 * 60 + 1)
    bot.release_late.set()
    fallback = await server.wait_for(route=CHANNEL_SEND)
    assert [c.status for c in handle.calls(FOLLOWUP)] == [401]
    [error] = bot.late_errors
    assert type(error) is discord.HTTPException  # not NotFound: 401 has no subclass of its own
    assert (error.status, error.code, error.text) == (401, 50027, "Invalid Webhook Token")
    assert fallback.json["content"] == f"<@{server.user('alice').id}> late result"


@pytest.mark.parametrize("how", ["close-4000", "tcp-drop", "op7-reconnect"])
async def test_gateway_disconnect_resumes_and_replays(server: FakeDiscord, bot: TinyBot, how: str) -> None:
    """After a forced disconnect discord.py RESUMEs (no new IDENTIFY) and gets what was pushed meanwhile."""
    frames = server.frame_mark()
    first_connection = server.frames(t="READY")[0].connection
    if how == "close-4000":
        await server.disconnect(4000)
    elif how == "tcp-drop":
        server.drop_connection()
    else:
        await server.request_reconnect()
    handle = await server.push_slash("ping")  # sent live or held for replay, depending on timing
    resume = await server.wait_for_frame(op=RESUME, direction="in", since=frames)
    await server.wait_for_frame(t="RESUMED", direction="out", since=frames)
    await handle.wait_followup()
    assert resume.d["session_id"] == server.gateway.current.id  # type: ignore[union-attr]
    assert len(server.frames(op=IDENTIFY)) == 1
    delivered = [
        f for f in server.frames(t="INTERACTION_CREATE", direction="out") if f.d["id"] == str(handle.id)
    ]
    assert delivered[-1].connection != first_connection  # replayed (or sent) on the resumed socket
    assert resume.d["seq"] < delivered[-1].s or how == "op7-reconnect"
    after = await server.push_slash("ping")
    await after.wait_followup()
    interaction_seqs = [f.s or 0 for f in server.frames(t="INTERACTION_CREATE", direction="out")]
    assert interaction_seqs == sorted(interaction_seqs)


async def test_invalid_session_makes_the_client_identify_again(server: FakeDiscord, bot: TinyBot) -> None:
    """An unresumable INVALID_SESSION makes discord.py IDENTIFY afresh and get a new READY."""
    first = server.gateway.current
    frames = server.frame_mark()
    ready_again = asyncio.ensure_future(bot.wait_for("ready", timeout=5))
    await server.invalidate_session(resumable=False)
    await server.wait_for_frame(op=IDENTIFY, direction="in", since=frames)
    await ready_again
    assert server.gateway.current is not first
    assert [f.t for f in server.frames(direction="out", op=0, since=frames)][:2] == ["READY", "GUILD_CREATE"]
    handle = await server.push_slash("ping")
    await handle.wait_followup()


@pytest.mark.parametrize(
    ("fault", "error", "status", "code"),
    [
        ("deleted", discord.NotFound, 404, 10003),
        ("no-permission", discord.Forbidden, 403, 50013),
        ("dms-blocked", discord.Forbidden, 403, 50007),
    ],
)
async def test_channel_faults_surface_as_discord_errors(
    server: FakeDiscord, bot: TinyBot, fault: str, error: type[discord.HTTPException], status: int, code: int
) -> None:
    """A deleted channel, a missing permission and closed DMs answer with Discord's status and error code."""
    target: discord.abc.Messageable
    if fault == "dms-blocked":
        server.block_dms("alice")
        target = await bot.fetch_user(server.user("alice").id)
    else:
        channel = bot.get_channel(server.channel("general").id)
        assert isinstance(channel, discord.TextChannel)
        target = channel
        if fault == "deleted":
            await server.delete_channel("general")
            await server.wait_until(lambda: bot.get_channel(channel.id) is None, what="CHANNEL_DELETE")
        else:
            await server.deny_bot_permissions("general")
            await server.wait_until(
                lambda: not channel.permissions_for(channel.guild.me).send_messages, what="CHANNEL_UPDATE"
            )
    with pytest.raises(error) as caught:
        await target.send("hello")
    assert (caught.value.status, caught.value.code) == (status, code)
    assert server.calls(CHANNEL_SEND)[-1].status == status


async def test_channel_message_is_fetched_edited_and_deleted(server: FakeDiscord, bot: TinyBot) -> None:
    """fetch_channel, send with a file, edit and delete pass through the channel routes and message store."""
    mark = server.mark()
    channel = await bot.fetch_channel(server.channel("bot-log").id)
    assert isinstance(channel, discord.TextChannel) and channel.name == "bot-log"
    sent = await channel.send("draft", file=discord.File(io.BytesIO(b"v1"), filename="v1.txt"))
    assert sent.attachments[0].size == 2 and await sent.attachments[0].read() == b"v1"
    edited = await sent.edit(content="final", attachments=[])
    assert (edited.content, edited.attachments) == ("final", [])
    stored = server.message(sent.id)
    assert (stored.content, stored.attachments, stored.edited_at is not None) == ("final", [], True)
    await sent.delete()
    assert stored.deleted and server.messages_in("bot-log") == []
    routes = [c.route for c in server.calls(since=mark) if c.route and "/channels/" in c.route]
    assert routes == [
        "GET /channels/{channel}",
        "POST /channels/{channel}/messages",
        "PATCH /channels/{channel}/messages/{message}",
        "DELETE /channels/{channel}/messages/{message}",
    ]


async def test_dm_is_opened_then_sent(server: FakeDiscord, bot: TinyBot) -> None:
    """user.send opens a DM channel (POST /users/@me/channels) and posts the message into it."""
    user = await bot.fetch_user(server.user("bob").id)
    await user.send("your images are ready")
    assert server.calls("POST /users/@me/channels")[0].json == {"recipient_id": server.user("bob").id}
    assert [m.content for m in server.dm_messages("bob")] == ["your images are ready"]


async def test_oversize_content_is_refused_like_discord(server: FakeDiscord, bot: TinyBot) -> None:
    """A message over 2000 characters gets Discord's 400 50035 Invalid Form Body."""
    channel = bot.get_channel(server.channel("general").id)
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.HTTPException) as caught:
        await channel.send("x" * 2001)
    assert (caught.value.status, caught.value.code) == (400, 50035)
    assert server.messages_in("general") == []


async def test_unknown_route_is_reported(server: FakeDiscord, bot: TinyBot) -> None:
    """A route the fake doesn't know answers 404 and is reported by assert_no_unknown_routes()."""
    guild = bot.get_guild(server.guild.id)
    assert guild is not None
    with pytest.raises(discord.NotFound):
        await guild.fetch_emojis()
    with pytest.raises(AssertionError, match=rf"GET /api/v10/guilds/{guild.id}/emojis"):
        server.assert_no_unknown_routes()
    [unknown] = server.forget_unknown_routes()
    assert (unknown.method, unknown.route, unknown.status) == ("GET", None, 404)


async def test_faults_reject_routes_that_do_not_exist(server: FakeDiscord) -> None:
    """Arming a fault on a misspelt route fails at once instead of silently never firing."""
    with pytest.raises(ValueError, match="unknown route"):
        server.fail_next("POST /webhook/{app}/{token}")


async def test_original_and_followup_messages_are_edited_and_deleted(
    server: FakeDiscord, bot: TinyBot
) -> None:
    """Editing, fetching and deleting the original response and a follow-up hit the webhook message routes."""
    handle = await server.push_slash("steps")
    await handle.wait_call("DELETE /webhooks/{app}/{token}/messages/{message}")
    routes = [(c.method, c.params.get("message"), c.status) for c in handle.calls() if c.route != CALLBACK]
    [extra] = handle.followups
    assert routes == [
        ("PATCH", "@original", 200),
        ("POST", None, 200),
        ("PATCH", str(extra.id), 200),
        ("GET", "@original", 200),
        ("DELETE", "@original", 204),
    ]
    assert handle.response_type == CHANNEL_MESSAGE
    assert handle.original is not None and handle.original.deleted
    assert [r["content"] for r in handle.original.revisions] == ["step 1"]
    assert (extra.content, extra.ephemeral) == ("extra, edited", True)
    assert server.messages_in("general") == [extra]
    assert server.messages_in("general", include_ephemeral=False) == []


async def test_late_first_response_gets_unknown_interaction(server: FakeDiscord, bot: TinyBot) -> None:
    """With the 3 s acknowledgement deadline on, a callback for an older interaction gets 404 10062."""
    server.ack_deadline_s = 3.0
    handle = await server.push_slash("ping", age_s=5.0)
    callback = await handle.wait_call(CALLBACK)
    assert (callback.status, callback.response["code"]) == (404, 10062)
    assert handle.response_type is None and handle.original is None
