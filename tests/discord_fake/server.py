"""FakeDiscord: Discord's REST API and gateway on 127.0.0.1, recording everything, with faults on demand."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web

from . import interactions as ix
from .faults import ApiError, CutMoment, FakeClock, Fault, FaultPlan, RateLimitScope
from .gateway import CLOSE_UNKNOWN_ERROR, Gateway
from .harness import patched_discord_urls
from .interactions import InteractionHandle, InteractionRecord
from .messages import AttachmentStore, MessageStore, StoredAttachment, StoredMessage
from .records import GatewayFrame, RecordedCall, UploadedFile
from .rest import ROUTE_KEYS, Reply, RestApi, match_route
from .world import ATTACH_FILES, SEND_MESSAGES, FakeChannel, FakeGuild, FakeRole, FakeUser, World

log = logging.getLogger(__name__)

T = TypeVar("T")
_POLL_S = 0.02
UserRef = FakeUser | str | int
ChannelRef = FakeChannel | str | int
GuildRef = FakeGuild | int | None
MessageRef = StoredMessage | int


class FakeDiscord:
    """A loopback Discord for the real discord.py client.

    ``await server.start()`` listens on 127.0.0.1 at ``port`` (by default 0: a free port); point discord.py
    at it with ``server.patch_discord()`` (or the ``api_base``/``gateway_url`` settings). Every HTTP request
    becomes a RecordedCall (``calls()``, ``wait_for()``); an unknown route answers 404 and is kept in
    ``unknown_calls`` so ``assert_clean()`` fails the test.
    """

    def __init__(
        self,
        world: World | None = None,
        *,
        token: str = "fake-bot-token",
        heartbeat_interval_ms: int = 41_250,
        token_lifetime_s: float = ix.TOKEN_LIFETIME_S,
        ack_deadline_s: float | None = None,
        port: int = 0,
    ) -> None:
        self.world = world or World.default()
        self.token = token
        self.token_lifetime_s = token_lifetime_s
        # Discord refuses a first response after 3 s; off by default so slow machines don't flake.
        self.ack_deadline_s = ack_deadline_s
        self.clock = FakeClock()
        self.faults = FaultPlan()
        self.attachments = AttachmentStore(self.world.snowflakes)
        self.messages = MessageStore(self.world.snowflakes, self.attachments)
        self.interactions: dict[int, InteractionRecord] = {}
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.dm_blocked: set[int] = set()
        self.gateway = Gateway(self, heartbeat_interval_ms=heartbeat_interval_ms)
        self.rest = RestApi(self)
        self.unknown_calls: list[RecordedCall] = []
        self.errors: list[str] = []
        self.started_at = time.time()
        self._calls: list[RecordedCall] = []
        self._observers: list[Callable[[RecordedCall], None]] = []
        self._changed: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._listen_port = port

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> FakeDiscord:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self.gateway.handle)
        app.router.add_route("*", "/{tail:.*}", self._handle_http)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._listen_port)
        try:
            await site.start()
        except OSError:  # e.g. the fixed port is in use
            await self._runner.cleanup()
            self._runner = None
            raise
        self._port = self._runner.addresses[0][1]
        self.attachments.set_base_url(self.base_url)
        log.debug("fake Discord listening on %s", self.base_url)
        return self

    async def stop(self) -> None:
        if self._runner is None:
            return
        await self.gateway.close_all()
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the fake Discord is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        """What ``discord.http.Route.BASE`` must be."""
        return f"{self.base_url}/api/v10"

    @property
    def gateway_url(self) -> str:
        """What ``DiscordWebSocket.DEFAULT_GATEWAY`` must be (also READY's ``resume_gateway_url``)."""
        return f"ws://127.0.0.1:{self.port}/gateway"

    def patch_discord(self) -> contextlib.AbstractContextManager[None]:
        """Point discord.py's REST base and default gateway here, restoring them on exit."""
        return patched_discord_urls(self.api_base, self.gateway_url)

    # -- the world ---------------------------------------------------------------------------------

    @property
    def guild(self) -> FakeGuild:
        """The first guild."""
        return self.world.guild()

    def user(self, name_or_id: UserRef) -> FakeUser:
        return name_or_id if isinstance(name_or_id, FakeUser) else self.world.user(name_or_id)

    def channel(self, ref: ChannelRef, *, guild: GuildRef = None) -> FakeChannel:
        """A channel by object, id, or name in ``guild`` (the first guild by default)."""
        if isinstance(ref, FakeChannel):
            return ref
        if isinstance(ref, int):
            channel = self.world.find_channel(ref)
            if channel is None:
                raise KeyError(f"no channel {ref}")
            return channel
        return self._guild(guild).channel(ref)

    def role(self, name: str, *, guild: GuildRef = None) -> FakeRole:
        return self._guild(guild).role(name)

    def _guild(self, guild: GuildRef) -> FakeGuild:
        if isinstance(guild, FakeGuild):
            return guild
        return self.world.guild(guild)

    # -- records -----------------------------------------------------------------------------------

    def calls(
        self,
        route: str | None = None,
        predicate: Callable[[RecordedCall], bool] | None = None,
        *,
        since: int = 0,
    ) -> list[RecordedCall]:
        """Recorded calls in arrival order, optionally only ``route`` (``"POST /webhooks/{app}/{token}"``)."""
        if route is not None:
            self._check_route(route)
        return [
            call
            for call in self._calls[since:]
            if (route is None or call.route == route) and (predicate is None or predicate(call))
        ]

    def observe(self, observer: Callable[[RecordedCall], None]) -> Callable[[], None]:
        """Call ``observer(call)`` as each call is answered; returns a function that stops it.

        For many concurrent waiters (a load test), where each ``wait_for`` re-scanning the whole log on
        every call would cost time quadratic in the number of calls.
        """
        self._observers.append(observer)

        def stop() -> None:
            if observer in self._observers:
                self._observers.remove(observer)

        return stop

    def mark(self) -> int:
        """A position in the call log, for ``since=`` (calls from now on)."""
        return len(self._calls)

    def frame_mark(self) -> int:
        """A position in the gateway frame log, for ``since=``."""
        return len(self.gateway.frames)

    def frames(
        self, *, op: int | None = None, t: str | None = None, direction: str | None = None, since: int = 0
    ) -> list[GatewayFrame]:
        """Gateway frames in order; ``direction`` is "in" (from the client) or "out"."""
        return [
            frame
            for frame in self.gateway.frames[since:]
            if (op is None or frame.op == op)
            and (t is None or frame.t == t)
            and (direction is None or frame.direction == direction)
        ]

    async def wait_until(
        self, condition: Callable[[], T | None], *, timeout_s: float = 5.0, what: str = ""
    ) -> T:
        """Re-check ``condition`` on each call or frame (and every 20 ms) until not None/False."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            result = condition()
            if result is not None and result is not False:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                recent = "\n  ".join(str(call) for call in self._calls[-15:]) or "(none)"
                raise AssertionError(
                    f"timed out after {timeout_s}s waiting for {what or condition!r}; "
                    f"recent calls:\n  {recent}"
                )
            if self._changed is None:
                self._changed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                # Also wake now and then: a condition on the bot's state changes after the frame was sent.
                await asyncio.wait_for(self._changed.wait(), min(remaining, _POLL_S))

    async def wait_for(
        self,
        predicate: Callable[[RecordedCall], bool] | None = None,
        *,
        route: str | None = None,
        count: int = 1,
        since: int = 0,
        timeout_s: float = 5.0,
    ) -> RecordedCall:
        """The ``count``-th answered call matching ``route`` and ``predicate``, earlier ones included."""
        if route is not None:
            self._check_route(route)

        def find() -> RecordedCall | None:
            found = [
                call
                for call in self._calls[since:]
                if call.done
                and (route is None or call.route == route)
                and (predicate is None or predicate(call))
            ]
            return found[count - 1] if len(found) >= count else None

        return await self.wait_until(
            find, timeout_s=timeout_s, what=f"call #{count} to {route or 'any route'}"
        )

    async def wait_for_frame(
        self,
        predicate: Callable[[GatewayFrame], bool] | None = None,
        *,
        op: int | None = None,
        t: str | None = None,
        direction: str | None = None,
        since: int = 0,
        timeout_s: float = 5.0,
    ) -> GatewayFrame:
        """The first gateway frame matching the filters, from ``since`` on."""

        def find() -> GatewayFrame | None:
            found = self.frames(op=op, t=t, direction=direction, since=since)
            return next((f for f in found if predicate is None or predicate(f)), None)

        return await self.wait_until(
            find, timeout_s=timeout_s, what=f"gateway frame op={op} t={t} {direction or ''}"
        )

    def assert_no_unknown_routes(self) -> None:
        if self.unknown_calls:
            listed = "\n  ".join(f"{c.method} {c.path} json={c.json!r}" for c in self.unknown_calls)
            raise AssertionError(
                f"the bot called {len(self.unknown_calls)} route(s) the fake Discord does not know; "
                f"add them to tests/discord_fake/rest.py:\n  {listed}"
            )

    def assert_clean(self) -> None:
        """No unknown routes and no protocol errors or fake-side exceptions; for fixture teardown."""
        self.assert_no_unknown_routes()
        if self.errors:
            raise AssertionError("the fake Discord saw errors:\n  " + "\n  ".join(self.errors))

    def forget_unknown_routes(self) -> list[RecordedCall]:
        """Take the unknown calls out (for a test that provokes one on purpose)."""
        taken, self.unknown_calls = self.unknown_calls, []
        return taken

    def _check_route(self, route: str) -> None:
        if route not in ROUTE_KEYS:
            raise ValueError(f"unknown route {route!r}; known routes: {sorted(ROUTE_KEYS)}")

    def _error(self, message: str) -> None:
        log.error("fake Discord: %s", message)
        self.errors.append(message)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # -- messages and attachments ------------------------------------------------------------------

    def message(self, message_id: MessageRef) -> StoredMessage:
        if isinstance(message_id, StoredMessage):
            return message_id
        message = self.messages.get(message_id)
        if message is None:
            raise KeyError(f"no message {message_id}")
        return message

    def messages_in(
        self, channel: ChannelRef, *, include_deleted: bool = False, include_ephemeral: bool = True
    ) -> list[StoredMessage]:
        """Messages in a channel in creation order, in their current state."""
        found = self.messages.in_channel(self.channel(channel).id, include_deleted=include_deleted)
        return [m for m in found if include_ephemeral or not m.ephemeral]

    def dm_messages(self, user: UserRef) -> list[StoredMessage]:
        """Messages the bot sent to ``user`` by DM."""
        channel = self.world.dm_channels.get(self.user(user).id)
        return [] if channel is None else self.messages.in_channel(channel.id)

    def add_attachment(
        self,
        data: bytes,
        filename: str,
        *,
        content_type: str | None = None,
        channel: ChannelRef | None = None,
        width: int | None = None,
        height: int | None = None,
        ephemeral: bool = True,
    ) -> StoredAttachment:
        """Register bytes a user "uploaded"; pass the result as an attachment option or in a message."""
        channel_id = self.channel(channel).id if channel is not None else self.guild.channels[0].id
        return self.attachments.add(
            data,
            filename,
            channel_id=channel_id,
            content_type=content_type,
            width=width,
            height=height,
            ephemeral=ephemeral,
        )

    async def post_user_message(
        self,
        channel: ChannelRef,
        author: UserRef,
        content: str = "",
        *,
        attachments: Sequence[StoredAttachment] = (),
        embeds: Sequence[dict[str, Any]] = (),
        reply_to: MessageRef | None = None,
    ) -> StoredMessage:
        """A message a user posted (e.g. a context-menu target, or a reply to ``reply_to``); dispatched as
        MESSAGE_CREATE."""
        target = self.channel(channel)
        body: dict[str, Any] = {"content": content, "embeds": list(embeds)}
        if reply_to is not None:
            replied = self.message(reply_to)
            body["message_reference"] = {"message_id": str(replied.id), "channel_id": str(replied.channel_id)}
        message = self.messages.create(
            channel=target,
            author=self.user(author),
            now=self.clock.now(),
            body=body,
        )
        for attachment in attachments:
            attachment.ephemeral = False
        message.attachments = list(attachments)
        await self._message_event("MESSAGE_CREATE", message)
        return message

    async def _message_event(self, event: str, message: StoredMessage) -> None:
        if message.ephemeral or self.gateway.current is None:
            return
        if event == "MESSAGE_DELETE":
            data: dict[str, Any] = {"id": str(message.id), "channel_id": str(message.channel_id)}
        else:
            data = message.payload()
        if message.guild_id is not None:
            data["guild_id"] = str(message.guild_id)
            member = self.world.guild(message.guild_id).member(message.author.id)
            if member is not None and event != "MESSAGE_DELETE":
                data["member"] = member.payload(with_user=False)
        await self.gateway.dispatch_message_event(event, data, guild_id=message.guild_id)

    # -- commands ----------------------------------------------------------------------------------

    def synced_commands(self, guild: GuildRef = None) -> list[dict[str, Any]]:
        """What the bot last synced: global commands, or a guild's when ``guild`` is given."""
        scope = None if guild is None else self._guild(guild).id
        return list(self.commands.get(scope, []))

    def command(
        self, name: str, *, type: int = ix.CHAT_INPUT, guild: GuildRef = None
    ) -> dict[str, Any] | None:
        """A synced command as Discord resolves it for ``guild``: the guild's own first, then global."""
        scopes: list[int | None] = [None]
        if guild is not None:
            scopes.insert(0, self._guild(guild).id)
        for scope in scopes:
            for command in self.commands.get(scope, []):
                if command["name"] == name and int(command["type"]) == type:
                    return command
        return None

    def _synced_command(
        self, name: str, type: int, guild: FakeGuild | None, require: bool
    ) -> dict[str, Any] | None:
        command = self.command(name, type=type, guild=guild)
        if command is None and require:
            synced = {scope: [c["name"] for c in cmds] for scope, cmds in self.commands.items()}
            raise LookupError(
                f"command {name!r} (type {type}) was never synced for this guild; synced: {synced}. "
                "Pass require_synced=False to push it anyway."
            )
        return command

    # -- interactions ------------------------------------------------------------------------------

    def interaction_by_token(self, token: str) -> InteractionRecord | None:
        return next((r for r in self.interactions.values() if r.token == token), None)

    def expire_token(self, token: str) -> None:
        """Invalidate an interaction token now (callbacks 404 10062, followups and edits 401 50027)."""
        record = self.interaction_by_token(token)
        if record is None:
            raise KeyError("unknown interaction token")
        record.revoked = True

    async def push_interaction(
        self,
        payload: Mapping[str, Any],
        *,
        message_id: int | None = None,
    ) -> InteractionHandle:
        """Dispatch a ready-made INTERACTION_CREATE payload (its user, channel and guild must exist here)."""
        data = dict(payload)
        guild = self.world.guild(int(data["guild_id"])) if data.get("guild_id") else None
        channel = self.channel(int(data.get("channel_id") or data["channel"]["id"]))
        raw_user = (data.get("member") or {}).get("user") or data.get("user") or {}
        user = self.user(int(raw_user["id"]))
        if message_id is None and isinstance(data.get("message"), dict):
            message_id = int(data["message"]["id"])
        record = InteractionRecord(
            id=int(data["id"]),
            token=str(data["token"]),
            type=int(data["type"]),
            payload=data,
            user=user,
            channel=channel,
            guild=guild,
            attachment_size_limit=int(data["attachment_size_limit"]),
            message_id=message_id,
        )
        return await self._push(record)

    async def push_slash(
        self,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        user: UserRef = "alice",
        channel: ChannelRef = "general",
        guild: GuildRef = None,
        dm: bool = False,
        require_synced: bool = True,
        **context: Any,
    ) -> InteractionHandle:
        """A member runs ``/name`` (``"group sub"`` for subcommands) with ``options``.

        Attachment options take ``add_attachment(...)`` results; user/channel/role options take world objects
        (a user may be given by name). ``context`` goes to the payload builder: ``locale``, ``age_s``
        (make the interaction that many seconds old), ``app_permissions``, ``attachment_size_limit``.
        """
        who, where, in_guild = self._where(user, channel, guild, dm)
        command = self._synced_command(name.split()[0], ix.CHAT_INPUT, in_guild, require_synced)
        command_id = int(command["id"]) if command else self.world.snowflakes.next()
        data = ix.chat_input_data(
            command=command,
            name=name,
            options=options or {},
            guild=in_guild,
            world=self.world,
            command_id=command_id,
        )
        return await self._push(self._record(ix.APPLICATION_COMMAND, data, who, where, in_guild, **context))

    async def push_autocomplete(
        self,
        name: str,
        options: Mapping[str, Any],
        focused: str,
        *,
        user: UserRef = "alice",
        channel: ChannelRef = "general",
        **context: Any,
    ) -> InteractionHandle:
        """A member types in the option ``focused`` of ``/name`` (its value as given in ``options``): the
        bot answers with its choices (callback type 8)."""
        who, where, in_guild = self._where(user, channel, None, False)
        command = self._synced_command(name.split()[0], ix.CHAT_INPUT, in_guild, True)
        assert command is not None
        data = ix.chat_input_data(
            command=command,
            name=name,
            options=options,
            guild=in_guild,
            world=self.world,
            command_id=int(command["id"]),
        )
        leaves = data["options"]
        while leaves and "options" in leaves[0]:  # a subcommand's options
            leaves = leaves[0]["options"]
        typed = next(o for o in leaves if o["name"] == focused)
        typed["focused"] = True
        return await self._push(self._record(ix.AUTOCOMPLETE, data, who, where, in_guild, **context))

    async def push_message_command(
        self,
        name: str,
        message: MessageRef,
        *,
        user: UserRef = "alice",
        require_synced: bool = True,
        **context: Any,
    ) -> InteractionHandle:
        """A member picks the message context-menu command ``name`` on ``message``."""
        target = self.message(message)
        channel = self.channel(target.channel_id)
        guild = self.world.guild(channel.guild_id) if channel.guild_id else None
        who = self.user(user)
        command = self._synced_command(name, ix.MESSAGE_COMMAND, guild, require_synced)
        command_id = int(command["id"]) if command else self.world.snowflakes.next()
        data = ix.context_menu_data(
            command=command,
            name=name,
            command_type=ix.MESSAGE_COMMAND,
            target=target,
            guild=guild,
            command_id=command_id,
        )
        return await self._push(self._record(ix.APPLICATION_COMMAND, data, who, channel, guild, **context))

    async def push_user_command(
        self,
        name: str,
        target: UserRef,
        *,
        user: UserRef = "alice",
        channel: ChannelRef = "general",
        guild: GuildRef = None,
        require_synced: bool = True,
        **context: Any,
    ) -> InteractionHandle:
        """A member picks the user context-menu command ``name`` on ``target``."""
        who, where, in_guild = self._where(user, channel, guild, False)
        command = self._synced_command(name, ix.USER_COMMAND, in_guild, require_synced)
        command_id = int(command["id"]) if command else self.world.snowflakes.next()
        data = ix.context_menu_data(
            command=command,
            name=name,
            command_type=ix.USER_COMMAND,
            target=self.user(target),
            guild=in_guild,
            command_id=command_id,
        )
        return await self._push(self._record(ix.APPLICATION_COMMAND, data, who, where, in_guild, **context))

    async def push_button(
        self, message: MessageRef, custom_id: str, *, user: UserRef = "alice", **context: Any
    ) -> InteractionHandle:
        """A member presses the button ``custom_id`` on ``message`` (it must be there and enabled)."""
        return await self._push_component(message, custom_id, None, user, context)

    async def push_select(
        self,
        message: MessageRef,
        custom_id: str,
        values: Sequence[str],
        *,
        user: UserRef = "alice",
        **context: Any,
    ) -> InteractionHandle:
        """A member picks ``values`` in the select menu ``custom_id`` on ``message``."""
        return await self._push_component(message, custom_id, list(values), user, context)

    async def push_modal_submit(
        self,
        opened_by: InteractionHandle,
        values: Mapping[str, str | list[str]],
        *,
        user: UserRef | None = None,
        **context: Any,
    ) -> InteractionHandle:
        """A member submits the modal the bot opened for ``opened_by``; ``values`` by custom_id or label."""
        modal = opened_by.modal
        if modal is None:
            raise LookupError(f"the bot did not answer interaction {opened_by.id} with a modal")
        source = opened_by.record
        data = ix.modal_submit_data(modal, values)
        who = self.user(user) if user is not None else source.user
        record = self._record(
            ix.MODAL_SUBMIT,
            data,
            who,
            source.channel,
            source.guild,
            message=self.messages.get(source.message_id) if source.message_id else None,
            **context,
        )
        return await self._push(record)

    async def _push_component(
        self,
        message: MessageRef,
        custom_id: str,
        values: list[str] | None,
        user: UserRef,
        context: dict[str, Any],
    ) -> InteractionHandle:
        target = self.message(message)
        if target.deleted:
            raise LookupError(f"message {target.id} was deleted; nobody can press its buttons")
        channel = self.channel(target.channel_id)
        guild = self.world.guild(channel.guild_id) if channel.guild_id else None
        data = ix.component_data(target, custom_id, values)
        record = self._record(
            ix.MESSAGE_COMPONENT, data, self.user(user), channel, guild, message=target, **context
        )
        return await self._push(record)

    def _where(
        self, user: UserRef, channel: ChannelRef, guild: GuildRef, dm: bool
    ) -> tuple[FakeUser, FakeChannel, FakeGuild | None]:
        who = self.user(user)
        if dm:
            return who, self.world.dm_channel_for(who), None
        where = self.channel(channel, guild=guild)
        in_guild = self.world.guild(where.guild_id) if where.guild_id is not None else None
        return who, where, in_guild

    def _record(
        self,
        kind: int,
        data: dict[str, Any],
        user: FakeUser,
        channel: FakeChannel,
        guild: FakeGuild | None,
        *,
        message: StoredMessage | None = None,
        locale: str = "en-US",
        age_s: float = 0.0,
        app_permissions: int | None = None,
        attachment_size_limit: int | None = None,
    ) -> InteractionRecord:
        if attachment_size_limit is None:
            attachment_size_limit = guild.upload_limit_bytes if guild else 10 * 1024 * 1024
        interaction_id = self.world.snowflakes.next(time.time() - age_s)
        token = ix.new_token()
        payload = ix.build_interaction(
            self.world,
            interaction_id=interaction_id,
            token=token,
            type=kind,
            data=data,
            user=user,
            channel=channel,
            guild=guild,
            message=message.payload() if message is not None else None,
            locale=locale,
            app_permissions=app_permissions,
            attachment_size_limit=attachment_size_limit,
        )
        return InteractionRecord(
            id=interaction_id,
            token=token,
            type=kind,
            payload=payload,
            user=user,
            channel=channel,
            guild=guild,
            attachment_size_limit=attachment_size_limit,
            message_id=message.id if message is not None else None,
        )

    async def _push(self, record: InteractionRecord) -> InteractionHandle:
        self.interactions[record.id] = record
        await self.gateway.dispatch("INTERACTION_CREATE", record.payload)
        return InteractionHandle(self, record)

    async def dispatch(self, event: str, data: dict[str, Any]) -> int:
        """Send any gateway DISPATCH (e.g. ``GUILD_ROLE_UPDATE``); returns its sequence number."""
        return await self.gateway.dispatch(event, data)

    # -- faults ------------------------------------------------------------------------------------

    def fail_next(
        self,
        route: str | None,
        *,
        status: int = 500,
        times: int = 1,
        code: int = 0,
        message: str | None = None,
        predicate: Callable[[RecordedCall], bool] | None = None,
    ) -> Fault:
        """Answer ``status`` to the next ``times`` calls of ``route`` (None: any route).

        discord.py retries 500/502/504/524 after 1 + 2·attempt seconds (webhooks: any 5xx); other statuses
        raise at once (403 Forbidden, 404 NotFound, otherwise HTTPException / DiscordServerError).
        """
        if route is not None:
            self._check_route(route)
        return self.faults.fail(
            route, status=status, times=times, code=code, message=message, where=predicate
        )

    def rate_limit_next(
        self,
        route: str | None,
        *,
        times: int = 1,
        retry_after_s: float = 0.05,
        scope: RateLimitScope = "user",
        predicate: Callable[[RecordedCall], bool] | None = None,
    ) -> Fault:
        """Answer 429 (per-route, or ``scope="global"``) to the next ``times`` calls of ``route``."""
        if route is not None:
            self._check_route(route)
        return self.faults.rate_limit(
            route, times=times, retry_after_s=retry_after_s, scope=scope, where=predicate
        )

    def respond_next(
        self,
        route: str | None,
        *,
        status: int,
        body: dict[str, Any] | str | None,
        headers: dict[str, str] | None = None,
        times: int = 1,
        predicate: Callable[[RecordedCall], bool] | None = None,
    ) -> Fault:
        """Answer exactly ``status``/``body``/``headers`` to the next ``times`` calls of ``route``."""
        if route is not None:
            self._check_route(route)
        return self.faults.respond(
            route, status=status, body=body, headers=headers, times=times, where=predicate
        )

    def cut_next(
        self,
        route: str | None,
        *,
        times: int = 1,
        moment: CutMoment = "before",
        predicate: Callable[[RecordedCall], bool] | None = None,
    ) -> Fault:
        """Close the connection, unanswered, on the next ``times`` calls of ``route``.

        ``moment="after"`` applies the request first, so a message exists that the client never heard of.
        discord.py retries only ECONNRESET on macOS and Windows errnos; on Linux the aiohttp error reaches
        the caller.
        """
        if route is not None:
            self._check_route(route)
        return self.faults.cut(route, times=times, moment=moment, where=predicate)

    def hold_next(
        self,
        route: str | None,
        *,
        times: int = 1,
        then_cut: CutMoment | None = None,
        predicate: Callable[[RecordedCall], bool] | None = None,
    ) -> Fault:
        """Hold the next ``times`` calls of ``route`` unanswered until ``fault.release()``.

        With ``then_cut`` the connection is closed on release instead of answered (see ``cut_next``).
        """
        if route is not None:
            self._check_route(route)
        return self.faults.hold(route, times=times, then_cut=then_cut, where=predicate)

    async def delete_channel(self, channel: ChannelRef) -> FakeChannel:
        """Delete a channel: REST on it answers 404 10003 Unknown Channel; the bot gets CHANNEL_DELETE."""
        target = self.channel(channel)
        target.deleted = True
        if self.gateway.current is not None and target.guild_id is not None:
            await self.gateway.dispatch("CHANNEL_DELETE", target.payload())
        return target

    async def deny_bot_permissions(
        self, channel: ChannelRef, permissions: int = SEND_MESSAGES | ATTACH_FILES
    ) -> FakeChannel:
        """Take ``permissions`` from the bot in ``channel`` with a member overwrite.

        Sent as CHANNEL_UPDATE, so ``channel.permissions_for(guild.me)`` sees it; sends there
        answer 403 50013 Missing Permissions, and later interactions carry the reduced ``app_permissions``.
        """
        target = self.channel(channel)
        target.denied_bot_permissions |= permissions
        bot_id = str(self.world.bot_user.id)
        target.permission_overwrites = [o for o in target.permission_overwrites if o["id"] != bot_id]
        target.permission_overwrites.append(
            {"id": bot_id, "type": 1, "allow": "0", "deny": str(target.denied_bot_permissions)}
        )
        if self.gateway.current is not None and target.guild_id is not None:
            await self.gateway.dispatch("CHANNEL_UPDATE", target.payload())
        return target

    def block_dms(self, user: UserRef) -> None:
        """``user`` accepts no DMs: sends to their DM channel answer 403 50007."""
        self.dm_blocked.add(self.user(user).id)

    async def disconnect(self, code: int = CLOSE_UNKNOWN_ERROR) -> None:
        """Close the bot's gateway socket with ``code`` (4000: resumable); dispatches wait for the RESUME."""
        await self.gateway.disconnect(code)

    def drop_connection(self) -> None:
        """Cut the gateway's TCP connection with no close frame (discord.py sees 1006 and resumes)."""
        self.gateway.drop()

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT."""
        await self.gateway.request_reconnect()

    async def invalidate_session(self, *, resumable: bool = False) -> None:
        """Send op 9 INVALID_SESSION (not resumable: the client IDENTIFYs again and gets a new READY)."""
        await self.gateway.invalidate_session(resumable=resumable)

    # -- HTTP --------------------------------------------------------------------------------------

    async def _handle_http(self, request: web.Request) -> web.StreamResponse:
        try:
            json_body, files = await _read_body(request)
        except (ValueError, UnicodeDecodeError) as exc:
            self._error(f"{request.method} {request.path} sent a body that does not parse: {exc!r}")
            json_body, files = None, []
        found = match_route(request.method, request.path)
        call = RecordedCall(
            index=len(self._calls),
            at=self.clock.now(),
            method=request.method,
            path=request.path,
            route=found[0].key if found else None,
            params=found[1] if found else {},
            query=dict(request.query),
            json=json_body,
            files=files,
            authorization=request.headers.get("Authorization"),
        )
        self._calls.append(call)
        try:
            response = await self._answer(call, found, request)
        finally:
            self._tell_observers(call)
            self._notify()
        return response

    def _tell_observers(self, call: RecordedCall) -> None:
        for observer in list(self._observers):
            try:
                observer(call)
            except Exception as exc:
                log.exception("fake Discord: call observer %r failed", observer)
                self.errors.append(f"call observer {observer!r} raised {exc!r}")

    async def _answer(
        self, call: RecordedCall, found: Any, request: web.Request | None = None
    ) -> web.StreamResponse:
        if found is None:
            self.unknown_calls.append(call)
            log.error(
                "fake Discord: unknown route %s %s (json=%r); add it to tests/discord_fake/rest.py",
                call.method,
                call.path,
                call.json,
            )
            return self._reply(call, Reply(404, {"message": "404: Not Found", "code": 0}))
        spec, _ = found
        if spec.bot_auth and call.authorization != f"Bot {self.token}":
            return self._reply(call, Reply(401, {"message": "401: Unauthorized", "code": 0}))
        fault = self.faults.take(call)
        if fault is not None:
            call.fault = fault.name
            if fault.gate is not None:
                await fault.gate.wait()  # held: the request is in flight until the test releases it
            if fault.cut == "before":
                return self._cut(call, request)
            if fault.cut is None and fault.gate is None:
                return self._reply(call, Reply(fault.status, fault.body), headers=fault.headers)
        try:
            reply = await self.rest.handler(spec)(call)
        except ApiError as error:
            reply = Reply(error.status, error.body())
        except Exception as exc:
            log.exception("fake Discord: handler for %s failed", spec.key)
            self.errors.append(f"{spec.key} handler raised {exc!r}")
            # 400, not 500: discord.py would retry a 5xx for seconds before failing.
            reply = Reply(400, {"message": f"fake Discord bug: {exc!r}", "code": 0})
        if fault is not None and fault.cut == "after":
            self._reply(call, reply)
            return self._cut(call, request)
        return self._reply(call, reply)

    def _cut(self, call: RecordedCall, request: web.Request | None) -> web.Response:
        """Close the connection without an answer; the client sees the server disconnect."""
        call.cut = True
        if request is not None and request.transport is not None:
            request.transport.abort()
        return web.Response(status=499)

    def _reply(
        self, call: RecordedCall, reply: Reply, *, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        call.status = reply.status
        call.response = reply.body if reply.raw is None else reply.raw
        extra = dict(headers or {})
        if reply.raw is not None:
            return web.Response(
                status=reply.status,
                body=reply.raw,
                headers={"Content-Type": reply.content_type or "", **extra},
            )
        if reply.body is None:
            return web.Response(status=reply.status, headers=extra)
        if isinstance(reply.body, str):
            return web.Response(
                status=reply.status, body=reply.body.encode(), headers={"Content-Type": "text/plain", **extra}
            )
        # Exactly "application/json": discord.py parses nothing else (aiohttp's json_response adds a charset).
        return web.Response(
            status=reply.status,
            body=json.dumps(reply.body).encode(),
            headers={"Content-Type": "application/json", **extra},
        )


async def _read_body(request: web.Request) -> tuple[Any, list[UploadedFile]]:
    if not request.body_exists:
        return None, []
    if request.content_type == "multipart/form-data":
        payload: Any = None
        files: list[UploadedFile] = []
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart; Discord's clients never send one
            if part.name == "payload_json":
                payload = json.loads(await part.text())
            elif part.filename is not None:
                data = bytes(await part.read())
                files.append(
                    UploadedFile(part.name or "", part.filename, part.headers.get("Content-Type"), data)
                )
        return payload, files
    text = await request.text()
    if request.content_type == "application/json":
        return json.loads(text) if text else None, []
    return text or None, []


@contextlib.asynccontextmanager
async def running_fake_discord(
    world: World | None = None, *, check: bool = True, **options: Any
) -> AsyncIterator[FakeDiscord]:
    """Start a FakeDiscord, yield it, stop it; on a clean exit also ``assert_clean()``."""
    server = FakeDiscord(world, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
    if check:
        server.assert_clean()
