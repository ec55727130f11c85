"""INTERACTION_CREATE payloads shaped like Discord's, and the handles tests use to find the answers."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .messages import StoredAttachment, StoredMessage, walk_components
from .records import RecordedCall
from .snowflakes import snowflake_time
from .world import FakeChannel, FakeGuild, FakeRole, FakeUser, World

if TYPE_CHECKING:
    from .server import FakeDiscord

# Interaction types.
PING = 1
APPLICATION_COMMAND = 2
MESSAGE_COMPONENT = 3
AUTOCOMPLETE = 4
MODAL_SUBMIT = 5

# Application command types.
CHAT_INPUT = 1
USER_COMMAND = 2
MESSAGE_COMMAND = 3

# Application command option types.
SUB_COMMAND = 1
SUB_COMMAND_GROUP = 2
STRING = 3
INTEGER = 4
BOOLEAN = 5
USER = 6
CHANNEL = 7
ROLE = 8
MENTIONABLE = 9
NUMBER = 10
ATTACHMENT = 11

# Interaction callback types.
CHANNEL_MESSAGE = 4
DEFERRED_CHANNEL_MESSAGE = 5
DEFERRED_UPDATE_MESSAGE = 6
UPDATE_MESSAGE = 7
AUTOCOMPLETE_RESULT = 8
MODAL = 9

# Interaction contexts.
CONTEXT_GUILD = 0
CONTEXT_BOT_DM = 1

TOKEN_LIFETIME_S = 15 * 60
ACK_DEADLINE_S = 3.0


@dataclasses.dataclass
class InteractionRecord:
    """The fake's side of one interaction: who, where, and how it was answered so far."""

    id: int
    token: str
    type: int
    payload: dict[str, Any]
    user: FakeUser
    channel: FakeChannel
    guild: FakeGuild | None
    attachment_size_limit: int
    message_id: int | None = None
    response_type: int | None = None
    original_message_id: int | None = None
    followup_ids: list[int] = dataclasses.field(default_factory=list)
    modal: dict[str, Any] | None = None
    revoked: bool = False

    @property
    def created_at(self) -> float:
        """Epoch seconds from the interaction's snowflake, as discord.py's ``Interaction.created_at``."""
        return snowflake_time(self.id)


def new_token() -> str:
    """An interaction token: long, URL-safe, unguessable."""
    return "aW50ZXJhY3Rpb24" + secrets.token_urlsafe(60)


def build_interaction(
    world: World,
    *,
    interaction_id: int,
    token: str,
    type: int,
    data: dict[str, Any] | None,
    user: FakeUser,
    channel: FakeChannel,
    guild: FakeGuild | None,
    message: dict[str, Any] | None = None,
    locale: str = "en-US",
    app_permissions: int | None = None,
    attachment_size_limit: int,
) -> dict[str, Any]:
    """A complete INTERACTION_CREATE payload, with everything discord.py 2.7 reads."""
    payload: dict[str, Any] = {
        "id": str(interaction_id),
        "application_id": str(world.application_id),
        "type": type,
        "token": token,
        "version": 1,
        "locale": locale,
        "entitlements": [],
        "entitlement_sku_ids": [],
        "attachment_size_limit": attachment_size_limit,
    }
    if data is not None:
        payload["data"] = data
    if message is not None:
        payload["message"] = message
    if guild is not None:
        member = guild.member(user.id)
        if member is None:
            raise LookupError(f"{user.username} is not a member of {guild.name}")
        permissions = guild.permissions_of(member)
        bot_member = guild.member(world.bot_user.id)
        bot_permissions = guild.permissions_of(bot_member) if bot_member else world.bot_permissions
        if app_permissions is None:
            app_permissions = bot_permissions & ~channel.denied_bot_permissions
        member_payload = member.payload()
        member_payload["permissions"] = str(permissions)
        channel_payload = channel.payload()
        channel_payload["permissions"] = str(permissions)
        payload.update(
            {
                "guild_id": str(guild.id),
                "guild": {"id": str(guild.id), "locale": guild.preferred_locale, "features": []},
                "guild_locale": guild.preferred_locale,
                "channel_id": str(channel.id),
                "channel": channel_payload,
                "member": member_payload,
                "app_permissions": str(app_permissions),
                "authorizing_integration_owners": {"0": str(guild.id)},
                "context": CONTEXT_GUILD,
            }
        )
    else:
        channel_payload = channel.payload()
        payload.update(
            {
                "channel_id": str(channel.id),
                "channel": channel_payload,
                "user": user.payload(),
                "app_permissions": str(
                    app_permissions if app_permissions is not None else world.bot_permissions
                ),
                "authorizing_integration_owners": {"0": "0"},
                "context": CONTEXT_BOT_DM,
            }
        )
    return payload


def chat_input_data(
    *,
    command: Mapping[str, Any] | None,
    name: str,
    options: Mapping[str, Any],
    guild: FakeGuild | None,
    world: World,
    command_id: int,
) -> dict[str, Any]:
    """The ``data`` of a slash command; ``name`` may be "group sub" or "group subgroup sub".

    With a synced ``command`` the option types come from it, so an unknown or missing required option fails
    here as the Discord client would refuse it; without one they are inferred from the Python values.
    """
    parts = name.split()
    resolved: dict[str, dict[str, Any]] = {}
    spec_options = list((command or {}).get("options") or [])
    chain: list[tuple[str, int]] = []
    for part in parts[1:]:
        spec = next((o for o in spec_options if o.get("name") == part), None)
        if command is not None and spec is None:
            raise KeyError(f"/{parts[0]} has no subcommand {part!r}")
        kind = int(spec["type"]) if spec else (SUB_COMMAND if part == parts[-1] else SUB_COMMAND_GROUP)
        chain.append((part, kind))
        spec_options = list((spec or {}).get("options") or [])
    leaf_options: list[dict[str, Any]] = []
    known = {o["name"]: o for o in spec_options}
    for option_name, value in options.items():
        spec = known.get(option_name)
        if command is not None and spec is None:
            raise KeyError(f"/{name} has no option {option_name!r}; it has {sorted(known)}")
        kind = int(spec["type"]) if spec else _infer_option_type(value)
        leaf_options.append(_option(option_name, kind, value, resolved, guild, world))
    if command is not None:
        missing = [o["name"] for o in spec_options if o.get("required") and o["name"] not in options]
        if missing:
            raise ValueError(f"/{name} needs options {missing}")
    nested: list[dict[str, Any]] = leaf_options
    for part, kind in reversed(chain):
        nested = [{"name": part, "type": kind, "options": nested}]
    data: dict[str, Any] = {"id": str(command_id), "name": parts[0], "type": CHAT_INPUT}
    if nested:
        data["options"] = nested
    if resolved:
        data["resolved"] = resolved
    if command is not None and command.get("guild_id"):
        data["guild_id"] = str(command["guild_id"])
    return data


def context_menu_data(
    *,
    command: Mapping[str, Any] | None,
    name: str,
    command_type: int,
    target: StoredMessage | FakeUser,
    guild: FakeGuild | None,
    command_id: int,
) -> dict[str, Any]:
    """The ``data`` of a message or user context-menu command, with the target in ``resolved``."""
    if isinstance(target, StoredMessage):
        resolved: dict[str, Any] = {"messages": {str(target.id): target.payload()}}
    else:
        resolved = {"users": {str(target.id): target.payload()}}
        member = guild.member(target.id) if guild else None
        if member is not None:
            resolved["members"] = {str(target.id): member.payload(with_user=False)}
    data: dict[str, Any] = {
        "id": str(command_id),
        "name": name,
        "type": command_type,
        "target_id": str(target.id),
        "resolved": resolved,
    }
    if command is not None and command.get("guild_id"):
        data["guild_id"] = str(command["guild_id"])
    return data


def component_data(message: StoredMessage, custom_id: str, values: list[str] | None) -> dict[str, Any]:
    """The ``data`` of a button press or select choice on ``message``; the component must be there."""
    component = message.component(custom_id)
    if component is None:
        raise LookupError(
            f"message {message.id} has no component {custom_id!r}; it has {message.custom_ids()}"
        )
    if component.get("disabled"):
        raise LookupError(f"component {custom_id!r} on message {message.id} is disabled")
    data: dict[str, Any] = {"custom_id": custom_id, "component_type": int(component["type"])}
    if values is not None:
        data["values"] = list(values)
    elif component["type"] != 2:
        raise ValueError(f"component {custom_id!r} is a select (type {component['type']}); give values")
    return data


def modal_submit_data(modal: Mapping[str, Any], values: Mapping[str, str | list[str]]) -> dict[str, Any]:
    """The ``data`` of a modal submit; ``values`` maps each input's custom_id (or label) to what was typed.

    The components mirror the modal's own layout (action rows or labels), as Discord sends them back.
    """
    remaining = dict(values)

    def answer(component: Mapping[str, Any], label: str | None) -> dict[str, Any]:
        custom_id = component["custom_id"]
        key = custom_id if custom_id in remaining else (label if label in remaining else None)
        if key is None:
            if component.get("required", True) and component.get("type") == 4 and not component.get("value"):
                raise ValueError(f"modal input {custom_id!r} ({label}) is required; give a value")
            value: str | list[str] = component.get("value") or ("" if component.get("type") == 4 else [])
        else:
            value = remaining.pop(key)
        out: dict[str, Any] = {"type": component["type"], "custom_id": custom_id}
        if "id" in component:
            out["id"] = component["id"]
        if component.get("type") == 4:
            out["value"] = value
        else:
            out["values"] = list(value) if not isinstance(value, str) else [value]
        return out

    components: list[dict[str, Any]] = []
    for top in modal.get("components") or []:
        kind = top.get("type")
        if kind == 1:
            children = [answer(c, c.get("label")) for c in top.get("components") or [] if "custom_id" in c]
            components.append({"type": 1, "components": children})
        elif kind == 18:
            components.append(
                {"type": 18, "id": top.get("id"), "component": answer(top["component"], top.get("label"))}
            )
        elif "id" in top:
            components.append({"type": kind, "id": top["id"]})
    if remaining:
        known = [c["custom_id"] for c in walk_components(modal.get("components") or []) if "custom_id" in c]
        raise KeyError(f"modal has no inputs {sorted(remaining)}; it has {known}")
    return {"custom_id": modal["custom_id"], "components": components}


def _infer_option_type(value: Any) -> int:
    if isinstance(value, bool):
        return BOOLEAN
    if isinstance(value, int):
        return INTEGER
    if isinstance(value, float):
        return NUMBER
    if isinstance(value, StoredAttachment):
        return ATTACHMENT
    if isinstance(value, FakeUser):
        return USER
    if isinstance(value, FakeChannel):
        return CHANNEL
    if isinstance(value, FakeRole):
        return ROLE
    return STRING


def _option(
    name: str,
    kind: int,
    value: Any,
    resolved: dict[str, dict[str, Any]],
    guild: FakeGuild | None,
    world: World,
) -> dict[str, Any]:
    if kind == ATTACHMENT:
        if not isinstance(value, StoredAttachment):
            raise TypeError(
                f"option {name!r} takes an attachment from server.add_attachment(), not {value!r}"
            )
        resolved.setdefault("attachments", {})[str(value.id)] = value.payload()
        return {"name": name, "type": kind, "value": str(value.id)}
    if kind in (USER, MENTIONABLE) and isinstance(value, (FakeUser, str)) and not isinstance(value, FakeRole):
        user = value if isinstance(value, FakeUser) else world.user(value)
        resolved.setdefault("users", {})[str(user.id)] = user.payload()
        member = guild.member(user.id) if guild else None
        if member is not None:
            member_payload = member.payload(with_user=False)
            member_payload["permissions"] = str(guild.permissions_of(member)) if guild else "0"
            resolved.setdefault("members", {})[str(user.id)] = member_payload
        return {"name": name, "type": kind, "value": str(user.id)}
    if kind in (ROLE, MENTIONABLE):
        if not isinstance(value, FakeRole):
            raise TypeError(f"option {name!r} takes a FakeRole, not {value!r}")
        resolved.setdefault("roles", {})[str(value.id)] = value.payload()
        return {"name": name, "type": kind, "value": str(value.id)}
    if kind == CHANNEL:
        if not isinstance(value, FakeChannel):
            raise TypeError(f"option {name!r} takes a FakeChannel, not {value!r}")
        resolved.setdefault("channels", {})[str(value.id)] = {
            "id": str(value.id),
            "name": value.name,
            "type": value.type,
            "permissions": "0",
            "nsfw": value.nsfw,
            "parent_id": None,
        }
        return {"name": name, "type": kind, "value": str(value.id)}
    return {"name": name, "type": kind, "value": value}


class InteractionHandle:
    """A pushed interaction, for finding what the bot answered through the fake's records."""

    def __init__(self, server: FakeDiscord, record: InteractionRecord) -> None:
        self._server = server
        self.record = record

    def __repr__(self) -> str:
        return f"<InteractionHandle id={self.id} type={self.record.type} response={self.response_type}>"

    @property
    def id(self) -> int:
        return self.record.id

    @property
    def token(self) -> str:
        return self.record.token

    @property
    def payload(self) -> dict[str, Any]:
        return self.record.payload

    @property
    def response_type(self) -> int | None:
        """The callback type the bot answered with (4, 5, 6, 7 or 9), None before it answered."""
        return self.record.response_type

    @property
    def modal(self) -> dict[str, Any] | None:
        """The modal the bot opened (the ``data`` of a type 9 callback)."""
        return self.record.modal

    @property
    def original(self) -> StoredMessage | None:
        """The original response message in its current state."""
        if self.record.original_message_id is None:
            return None
        return self._server.messages.get(self.record.original_message_id)

    @property
    def followups(self) -> list[StoredMessage]:
        """Follow-up messages other than the original, in the order they were sent."""
        found = (self._server.messages.get(mid) for mid in self.record.followup_ids)
        return [message for message in found if message is not None]

    def calls(self, route: str | None = None) -> list[RecordedCall]:
        """Every REST call made with this interaction's token (callback, followups, edits)."""
        return [
            call
            for call in self._server.calls(route)
            if call.params.get("token") == self.token or call.params.get("interaction") == str(self.id)
        ]

    def callbacks(self) -> list[RecordedCall]:
        return self.calls("POST /interactions/{interaction}/{token}/callback")

    async def wait_response(self, *, timeout_s: float = 5.0) -> RecordedCall:
        """The first callback the fake accepted (its ``json["type"]`` is the response type)."""
        return await self._server.wait_for(
            route="POST /interactions/{interaction}/{token}/callback",
            predicate=lambda c: c.params.get("interaction") == str(self.id) and c.ok,
            timeout_s=timeout_s,
        )

    async def wait_followup(self, count: int = 1, *, timeout_s: float = 5.0) -> RecordedCall:
        """The ``count``-th follow-up the fake accepted."""
        return await self._server.wait_for(
            route="POST /webhooks/{app}/{token}",
            predicate=lambda c: c.params.get("token") == self.token and c.ok,
            count=count,
            timeout_s=timeout_s,
        )

    async def wait_call(self, route: str, *, count: int = 1, timeout_s: float = 5.0) -> RecordedCall:
        """The ``count``-th call to ``route`` made with this interaction's token, whatever its answer."""
        return await self._server.wait_for(
            route=route,
            predicate=lambda c: (
                c.params.get("token") == self.token or c.params.get("interaction") == str(self.id)
            ),
            count=count,
            timeout_s=timeout_s,
        )

    def expire(self) -> None:
        """Make the token invalid now: callbacks answer 404 10062, webhooks 401 50027."""
        self.record.revoked = True
