"""The REST half of the fake: a route table and one handler per route, answering as Discord does."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import interactions as ix
from .faults import (
    ALREADY_ACKNOWLEDGED,
    CANNOT_DM_USER,
    CANNOT_EDIT_OTHERS_MESSAGE,
    INVALID_WEBHOOK_TOKEN,
    MISSING_ACCESS,
    MISSING_PERMISSIONS,
    UNKNOWN_CHANNEL,
    UNKNOWN_GUILD,
    UNKNOWN_INTERACTION,
    UNKNOWN_MEMBER,
    UNKNOWN_MESSAGE,
    UNKNOWN_USER,
    UNKNOWN_WEBHOOK,
    ApiError,
    invalid_form_body,
)
from .messages import EPHEMERAL, LOADING, StoredMessage
from .records import RecordedCall
from .validation import check_commands, check_message, check_modal
from .world import (
    ATTACH_FILES,
    DEFAULT_UPLOAD_LIMIT_BYTES,
    EMBED_LINKS,
    SEND_MESSAGES,
    VIEW_CHANNEL,
    FakeChannel,
    FakeGuild,
)

if TYPE_CHECKING:
    from .server import FakeDiscord

API_PREFIX = "/api/v10"
# How long Discord remembers a message's nonce for ``enforce_nonce`` ("the past few minutes").
NONCE_WINDOW_S = 5 * 60


@dataclasses.dataclass(frozen=True)
class Reply:
    """A handler's answer: JSON ``body`` (None for 204) or ``raw`` bytes with ``content_type``."""

    status: int = 200
    body: Any = None
    raw: bytes | None = None
    content_type: str | None = None


@dataclasses.dataclass(frozen=True)
class RouteSpec:
    """One route: ``key`` is what calls are recorded under, e.g. ``"POST /webhooks/{app}/{token}"``."""

    method: str
    template: str
    handler: str
    bot_auth: bool
    pattern: re.Pattern[str]

    @property
    def key(self) -> str:
        return f"{self.method} {self.template}"


def _route(method: str, template: str, handler: str, *, bot_auth: bool = True) -> RouteSpec:
    regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    return RouteSpec(method, template, handler, bot_auth, re.compile(f"^{regex}$"))


_WEBHOOK_MESSAGE = "/webhooks/{app}/{token}/messages/{message}"
_CHANNEL_MESSAGE = "/channels/{channel}/messages/{message}"

# API routes live under /api/v10; the first full match wins, so literal segments (@me) come first.
API_ROUTES: tuple[RouteSpec, ...] = (
    _route("GET", "/users/@me", "get_me"),
    _route("POST", "/users/@me/channels", "create_dm"),
    _route("GET", "/users/{user}", "get_user"),
    _route("GET", "/oauth2/applications/@me", "get_application"),
    _route("GET", "/applications/@me", "get_application"),
    _route("GET", "/gateway", "get_gateway"),
    _route("GET", "/gateway/bot", "get_gateway_bot"),
    _route("GET", "/applications/{app}/commands", "get_commands"),
    _route("PUT", "/applications/{app}/commands", "put_commands"),
    _route("GET", "/applications/{app}/guilds/{guild}/commands", "get_commands"),
    _route("PUT", "/applications/{app}/guilds/{guild}/commands", "put_commands"),
    _route("GET", "/guilds/{guild}", "get_guild"),
    _route("GET", "/guilds/{guild}/channels", "get_guild_channels"),
    _route("GET", "/guilds/{guild}/members/{user}", "get_member"),
    _route("GET", "/channels/{channel}", "get_channel"),
    _route("GET", "/channels/{channel}/messages", "get_messages"),
    _route("POST", "/channels/{channel}/messages", "create_message"),
    _route("GET", _CHANNEL_MESSAGE, "get_message"),
    _route("PATCH", _CHANNEL_MESSAGE, "edit_message"),
    _route("DELETE", _CHANNEL_MESSAGE, "delete_message"),
    _route("POST", "/channels/{channel}/typing", "typing"),
    _route("POST", "/interactions/{interaction}/{token}/callback", "interaction_callback", bot_auth=False),
    _route("POST", "/webhooks/{app}/{token}", "create_followup", bot_auth=False),
    _route("GET", _WEBHOOK_MESSAGE, "get_webhook_message", bot_auth=False),
    _route("PATCH", _WEBHOOK_MESSAGE, "edit_webhook_message", bot_auth=False),
    _route("DELETE", _WEBHOOK_MESSAGE, "delete_webhook_message", bot_auth=False),
)

# Attachment downloads are plain GETs of the URL in the attachment payload (CDN and media proxy).
CDN_ROUTES: tuple[RouteSpec, ...] = (
    _route("GET", "/attachments/{channel}/{attachment}/{filename}", "get_attachment", bot_auth=False),
    _route("GET", "/media/attachments/{channel}/{attachment}/{filename}", "get_attachment", bot_auth=False),
)

ROUTE_KEYS = frozenset(spec.key for spec in API_ROUTES + CDN_ROUTES)


def match_route(method: str, path: str) -> tuple[RouteSpec, dict[str, str]] | None:
    """The route for a request path (with or without the API prefix), and its path parameters."""
    if path.startswith(API_PREFIX + "/"):
        routes, path = API_ROUTES, path[len(API_PREFIX) :]
    else:
        routes = CDN_ROUTES
    for spec in routes:
        if spec.method != method:
            continue
        found = spec.pattern.match(path)
        if found:
            return spec, found.groupdict()
    return None


class RestApi:
    """Route handlers; each takes the recorded call and returns a Reply or raises ApiError."""

    def __init__(self, server: FakeDiscord) -> None:
        self._server = server

    def handler(self, spec: RouteSpec) -> Callable[[RecordedCall], Awaitable[Reply]]:
        return getattr(self, spec.handler)

    # -- login and application ---------------------------------------------------------------------

    async def get_me(self, call: RecordedCall) -> Reply:
        me = self._server.world.bot_user.payload()
        me.update({"verified": True, "mfa_enabled": False, "email": None, "locale": "en-US"})
        return Reply(body=me)

    async def get_application(self, call: RecordedCall) -> Reply:
        return Reply(body=self._server.world.application_payload())

    async def get_gateway(self, call: RecordedCall) -> Reply:
        return Reply(body={"url": self._server.gateway_url})

    async def get_gateway_bot(self, call: RecordedCall) -> Reply:
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        return Reply(body={"url": self._server.gateway_url, "shards": 1, "session_start_limit": limit})

    # -- commands ----------------------------------------------------------------------------------

    def _command_scope(self, call: RecordedCall) -> int | None:
        if int(call.params["app"]) != self._server.world.application_id:
            raise ApiError(403, MISSING_ACCESS, "Missing Access")
        if "guild" not in call.params:
            return None
        guild_id = int(call.params["guild"])
        if not any(g.id == guild_id for g in self._server.world.guilds):
            raise ApiError(404, UNKNOWN_GUILD, "Unknown Guild")
        return guild_id

    async def get_commands(self, call: RecordedCall) -> Reply:
        return Reply(body=self._server.commands.get(self._command_scope(call), []))

    async def put_commands(self, call: RecordedCall) -> Reply:
        scope = self._command_scope(call)
        check_commands(call.json)
        previous = {(c["name"], c["type"]): c["id"] for c in self._server.commands.get(scope, [])}
        world = self._server.world
        stored = []
        for command in call.json:
            kind = int(command.get("type", 1))
            # Discord keeps a command's id while its name and type stay the same.
            command_id = previous.get((command["name"], kind)) or str(world.snowflakes.next())
            entry = {
                "options": [],
                "default_member_permissions": None,
                "nsfw": False,
                **command,
                "id": command_id,
                "application_id": str(world.application_id),
                "type": kind,
                "description": command.get("description") or "",
                "version": str(world.snowflakes.next()),
            }
            if scope is not None:
                entry["guild_id"] = str(scope)
            stored.append(entry)
        self._server.commands[scope] = stored
        return Reply(body=stored)

    # -- users, guilds, channels -------------------------------------------------------------------

    async def get_user(self, call: RecordedCall) -> Reply:
        user = self._server.world.users.get(_int(call.params["user"]))
        if user is None:
            raise ApiError(404, UNKNOWN_USER, "Unknown User")
        return Reply(body=user.payload())

    async def create_dm(self, call: RecordedCall) -> Reply:
        recipient = (call.json or {}).get("recipient_id")
        user = self._server.world.users.get(_int(recipient))
        if user is None:
            raise invalid_form_body(
                "recipient_id", "NUMBER_TYPE_COERCE", f"Value {recipient!r} is not snowflake."
            )
        return Reply(body=self._server.world.dm_channel_for(user).payload())

    def _guild(self, call: RecordedCall) -> FakeGuild:
        guild_id = _int(call.params["guild"])
        for guild in self._server.world.guilds:
            if guild.id == guild_id:
                return guild
        raise ApiError(404, UNKNOWN_GUILD, "Unknown Guild")

    async def get_guild(self, call: RecordedCall) -> Reply:
        guild = self._guild(call)
        body = guild.payload(joined_at=self._server.started_at)
        for key in ("members", "channels", "threads", "presences", "voice_states", "joined_at", "large"):
            body.pop(key, None)
        return Reply(body=body)

    async def get_guild_channels(self, call: RecordedCall) -> Reply:
        return Reply(body=[c.payload() for c in self._guild(call).channels if not c.deleted])

    async def get_member(self, call: RecordedCall) -> Reply:
        member = self._guild(call).member(_int(call.params["user"]))
        if member is None:
            raise ApiError(404, UNKNOWN_MEMBER, "Unknown Member")
        return Reply(body=member.payload())

    def _channel(self, call: RecordedCall) -> FakeChannel:
        channel = self._server.world.find_channel(_int(call.params["channel"]))
        if channel is None or channel.deleted:
            raise ApiError(404, UNKNOWN_CHANNEL, "Unknown Channel")
        if not self._server.world.bot_permissions_in(channel) & VIEW_CHANNEL:
            raise ApiError(403, MISSING_ACCESS, "Missing Access")
        return channel

    def _check_post(self, call: RecordedCall, channel: FakeChannel, *, creating: bool) -> dict[str, Any]:
        """The body as Discord keeps it, after the checks of the bot's rights in ``channel``.

        As Discord: files need Attach Files (403 50013); embeds need Embed Links, and without it they are
        dropped from a message that has other content, and refused (403 50013) from one that has none.
        """
        allowed = self._server.world.bot_permissions_in(channel)
        if creating and not allowed & SEND_MESSAGES:
            raise ApiError(403, MISSING_PERMISSIONS, "Missing Permissions")
        if call.files and not allowed & ATTACH_FILES:
            raise ApiError(403, MISSING_PERMISSIONS, "Missing Permissions")
        body = dict(call.json or {})
        if body.get("embeds") and not allowed & EMBED_LINKS:
            if not (body.get("content") or call.files or body.get("components")):
                raise ApiError(403, MISSING_PERMISSIONS, "Missing Permissions")
            body["embeds"] = []
        return body

    def _channel_message(self, call: RecordedCall, channel: FakeChannel) -> StoredMessage:
        message = self._server.messages.get(_int(call.params["message"]))
        if message is None or message.deleted or message.channel_id != channel.id or message.ephemeral:
            raise ApiError(404, UNKNOWN_MESSAGE, "Unknown Message")
        return message

    async def get_channel(self, call: RecordedCall) -> Reply:
        return Reply(body=self._channel(call).payload())

    async def get_messages(self, call: RecordedCall) -> Reply:
        channel = self._channel(call)
        limit = min(int(call.query.get("limit", "50")), 100)
        before = _int(call.query["before"]) if "before" in call.query else None
        after = _int(call.query["after"]) if "after" in call.query else None
        found = [
            m
            for m in self._server.messages.in_channel(channel.id)
            if not m.ephemeral and (before is None or m.id < before) and (after is None or m.id > after)
        ]
        found.sort(key=lambda m: m.id, reverse=True)
        return Reply(body=[m.payload() for m in found[:limit]])

    async def get_message(self, call: RecordedCall) -> Reply:
        channel = self._channel(call)
        return Reply(body=self._channel_message(call, channel).payload())

    async def create_message(self, call: RecordedCall) -> Reply:
        server = self._server
        channel = self._channel(call)
        body = self._check_post(call, channel, creating=True)
        if channel.is_dm and any(user.id in server.dm_blocked for user in channel.recipients):
            raise ApiError(403, CANNOT_DM_USER, "Cannot send messages to this user")
        limit = (
            server.world.guild(channel.guild_id).upload_limit_bytes
            if channel.guild_id
            else DEFAULT_UPLOAD_LIMIT_BYTES
        )
        check_message(call.json, call.files, upload_limit_bytes=limit, creating=True)
        if body.get("enforce_nonce") and body.get("nonce") is not None:
            # Discord returns the message this author already sent with this nonce in the last few minutes.
            since = server.clock.now() - NONCE_WINDOW_S
            earlier = server.messages.by_nonce(
                channel.id, server.world.bot_user.id, str(body["nonce"]), since=since
            )
            if earlier is not None:
                return Reply(body=earlier.payload())
        body["flags"] = int(body.get("flags") or 0) & ~EPHEMERAL  # only interaction replies can be ephemeral
        message = server.messages.create(
            channel=channel, author=server.world.bot_user, now=server.clock.now(), body=body, files=call.files
        )
        await server._message_event("MESSAGE_CREATE", message)
        return Reply(body=message.payload())

    async def edit_message(self, call: RecordedCall) -> Reply:
        server = self._server
        channel = self._channel(call)
        message = self._channel_message(call, channel)
        if message.author.id != server.world.bot_user.id:
            body = call.json or {}
            if set(body) - {"flags"}:
                raise ApiError(
                    403, CANNOT_EDIT_OTHERS_MESSAGE, "Cannot edit a message authored by another user"
                )
        body = self._check_post(call, channel, creating=False)
        check_message(call.json, call.files, upload_limit_bytes=DEFAULT_UPLOAD_LIMIT_BYTES, creating=False)
        server.messages.edit(message, now=server.clock.now(), body=body, files=call.files)
        await server._message_event("MESSAGE_UPDATE", message)
        return Reply(body=message.payload())

    async def delete_message(self, call: RecordedCall) -> Reply:
        server = self._server
        channel = self._channel(call)
        message = self._channel_message(call, channel)
        server.messages.delete(message)
        await server._message_event("MESSAGE_DELETE", message)
        return Reply(status=204)

    async def typing(self, call: RecordedCall) -> Reply:
        self._channel(call)
        return Reply(status=204)

    # -- interactions ------------------------------------------------------------------------------

    def _callback_interaction(self, call: RecordedCall) -> ix.InteractionRecord:
        server = self._server
        record = server.interactions.get(_int(call.params["interaction"]))
        if record is None:
            raise ApiError(404, UNKNOWN_INTERACTION, "Unknown interaction")
        if record.token != call.params["token"]:
            raise ApiError(401, INVALID_WEBHOOK_TOKEN, "Invalid Webhook Token")
        age_s = server.clock.now() - record.created_at
        late = server.ack_deadline_s is not None and age_s > server.ack_deadline_s
        if record.revoked or age_s >= server.token_lifetime_s or late:
            raise ApiError(404, UNKNOWN_INTERACTION, "Unknown interaction")
        if record.response_type is not None:
            raise ApiError(400, ALREADY_ACKNOWLEDGED, "Interaction has already been acknowledged.")
        return record

    def _webhook_interaction(self, call: RecordedCall) -> ix.InteractionRecord:
        server = self._server
        if _int(call.params["app"]) != server.world.application_id:
            raise ApiError(404, UNKNOWN_WEBHOOK, "Unknown Webhook")
        record = server.interaction_by_token(call.params["token"])
        if (
            record is None
            or record.revoked
            or server.clock.now() - record.created_at >= server.token_lifetime_s
        ):
            raise ApiError(401, INVALID_WEBHOOK_TOKEN, "Invalid Webhook Token")
        return record

    def _new_interaction_message(
        self, record: ix.InteractionRecord, body: dict[str, Any], call: RecordedCall, *, flags: int = 0
    ) -> StoredMessage:
        server = self._server
        data = record.payload.get("data") or {}
        if record.type == ix.APPLICATION_COMMAND:
            message_type = 20 if int(data.get("type", 1)) == ix.CHAT_INPUT else 23
        else:
            message_type = 0
        message = server.messages.create(
            channel=record.channel,
            author=server.world.bot_user,
            now=server.clock.now(),
            body=body,
            files=call.files,
            flags=flags,
            message_type=message_type,
        )
        message.webhook_id = server.world.application_id
        message.application_id = server.world.application_id
        message.interaction_id = record.id
        metadata: dict[str, Any] = {
            "id": str(record.id),
            "type": record.type,
            "user": record.user.payload(),
            "authorizing_integration_owners": record.payload.get("authorizing_integration_owners", {}),
        }
        if data.get("name"):
            metadata["name"] = data["name"]
        if record.message_id is not None:
            metadata["interacted_message_id"] = str(record.message_id)
        if record.original_message_id is not None:
            metadata["original_response_message_id"] = str(record.original_message_id)
        message.interaction_metadata = metadata
        return message

    async def interaction_callback(self, call: RecordedCall) -> Reply:
        server = self._server
        record = self._callback_interaction(call)
        body = call.json or {}
        kind = int(body.get("type", 0))
        data = body.get("data") or {}
        allowed = {
            ix.APPLICATION_COMMAND: {ix.CHANNEL_MESSAGE, ix.DEFERRED_CHANNEL_MESSAGE, ix.MODAL},
            ix.MESSAGE_COMPONENT: {
                ix.CHANNEL_MESSAGE,
                ix.DEFERRED_CHANNEL_MESSAGE,
                ix.DEFERRED_UPDATE_MESSAGE,
                ix.UPDATE_MESSAGE,
                ix.MODAL,
            },
            ix.MODAL_SUBMIT: {ix.CHANNEL_MESSAGE, ix.DEFERRED_CHANNEL_MESSAGE},
            ix.AUTOCOMPLETE: {ix.AUTOCOMPLETE_RESULT},
        }.get(record.type, set())
        if record.type == ix.MODAL_SUBMIT and record.message_id is not None:
            allowed |= {ix.DEFERRED_UPDATE_MESSAGE, ix.UPDATE_MESSAGE}
        if kind not in allowed:
            raise invalid_form_body(
                "type", "INTERACTION_RESPONSE_TYPE_INVALID", f"Callback type {kind} is not valid here."
            )
        message: StoredMessage | None = None
        event = "MESSAGE_CREATE"
        if kind == ix.CHANNEL_MESSAGE:
            check_message(data, call.files, upload_limit_bytes=record.attachment_size_limit, creating=True)
            message = self._new_interaction_message(record, data, call)
            record.original_message_id = message.id
        elif kind == ix.DEFERRED_CHANNEL_MESSAGE:
            flags = LOADING | (int(data.get("flags") or 0) & EPHEMERAL)
            message = self._new_interaction_message(record, {}, call, flags=flags)
            record.original_message_id = message.id
        elif kind == ix.DEFERRED_UPDATE_MESSAGE:
            record.original_message_id = record.message_id
        elif kind == ix.UPDATE_MESSAGE:
            check_message(data, call.files, upload_limit_bytes=record.attachment_size_limit, creating=False)
            message = server.messages.get(record.message_id or 0)
            if message is None or message.deleted:
                raise ApiError(404, UNKNOWN_MESSAGE, "Unknown Message")
            server.messages.edit(message, now=server.clock.now(), body=data, files=call.files)
            record.original_message_id = message.id
            event = "MESSAGE_UPDATE"
        elif kind == ix.MODAL:
            check_modal(data)
            record.modal = data
        record.response_type = kind
        if message is not None:
            await server._message_event(event, message)
        if call.query.get("with_response", "").lower() not in ("1", "true"):
            return Reply(status=204)
        interaction: dict[str, Any] = {"id": str(record.id), "type": record.type}
        response_message = message or (
            server.messages.get(record.message_id)
            if kind == ix.DEFERRED_UPDATE_MESSAGE and record.message_id
            else None
        )
        if response_message is not None:
            interaction["response_message_id"] = str(response_message.id)
            interaction["response_message_loading"] = response_message.loading
            interaction["response_message_ephemeral"] = response_message.ephemeral
        resource: dict[str, Any] = {"type": kind}
        if kind in (ix.CHANNEL_MESSAGE, ix.UPDATE_MESSAGE) and message is not None:
            resource["message"] = message.payload()
        return Reply(body={"interaction": interaction, "resource": resource})

    async def create_followup(self, call: RecordedCall) -> Reply:
        server = self._server
        record = self._webhook_interaction(call)
        if record.response_type is None:
            raise ApiError(404, UNKNOWN_WEBHOOK, "Unknown Webhook")
        if record.channel.deleted:
            raise ApiError(404, UNKNOWN_CHANNEL, "Unknown Channel")
        body = call.json or {}
        check_message(body, call.files, upload_limit_bytes=record.attachment_size_limit, creating=True)
        original = server.messages.get(record.original_message_id or 0)
        if (
            record.response_type == ix.DEFERRED_CHANNEL_MESSAGE
            and original is not None
            and original.loading
            and not original.deleted
        ):
            # Discord's "Create Followup Message": directly after a deferred ("thinking…") response, a
            # follow-up works as "Edit Original Interaction Response": it replaces the placeholder, and its
            # ephemeral flag is ignored, since a message's ephemerality is fixed when it is made (here, by the
            # deferral). An ephemeral answer after a public deferral lands in the channel.
            server.messages.edit(original, now=server.clock.now(), body=body, files=call.files)
            message = original
            await server._message_event("MESSAGE_UPDATE", message)
        else:
            message = self._new_interaction_message(
                record, body, call, flags=int(body.get("flags") or 0) & EPHEMERAL
            )
            record.followup_ids.append(message.id)
            await server._message_event("MESSAGE_CREATE", message)
        if call.query.get("wait", "").lower() in ("1", "true"):
            return Reply(body=message.payload())
        return Reply(status=204)

    def _webhook_message(self, call: RecordedCall) -> tuple[ix.InteractionRecord, StoredMessage]:
        record = self._webhook_interaction(call)
        wanted = call.params["message"]
        if wanted == "@original":
            message_id = record.original_message_id
        else:
            message_id = _int(wanted)
            if message_id not in (record.original_message_id, *record.followup_ids):
                message_id = None
        message = self._server.messages.get(message_id or 0)
        if message is None or message.deleted or record.channel.deleted:
            # A deleted channel takes its messages with it.
            raise ApiError(404, UNKNOWN_MESSAGE, "Unknown Message")
        return record, message

    async def get_webhook_message(self, call: RecordedCall) -> Reply:
        return Reply(body=self._webhook_message(call)[1].payload())

    async def edit_webhook_message(self, call: RecordedCall) -> Reply:
        server = self._server
        record, message = self._webhook_message(call)
        check_message(call.json, call.files, upload_limit_bytes=record.attachment_size_limit, creating=False)
        server.messages.edit(message, now=server.clock.now(), body=call.json, files=call.files)
        await server._message_event("MESSAGE_UPDATE", message)
        return Reply(body=message.payload())

    async def delete_webhook_message(self, call: RecordedCall) -> Reply:
        server = self._server
        _, message = self._webhook_message(call)
        server.messages.delete(message)
        await server._message_event("MESSAGE_DELETE", message)
        return Reply(status=204)

    # -- attachments -------------------------------------------------------------------------------

    async def get_attachment(self, call: RecordedCall) -> Reply:
        attachment = self._server.attachments.get(_int(call.params["attachment"]))
        if attachment is None or attachment.filename != call.params["filename"]:
            return Reply(status=404, raw=b"Not Found", content_type="text/plain")
        return Reply(raw=attachment.data, content_type=attachment.content_type or "application/octet-stream")


def _int(value: Any) -> int:
    """A snowflake from a path or body; anything else is Discord's 'not a snowflake' error."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise invalid_form_body("id", "NUMBER_TYPE_COERCE", f"Value {value!r} is not snowflake.") from None
