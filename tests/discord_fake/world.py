"""The state the fake Discord serves: the application, guilds with roles, channels and members, and users."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from .snowflakes import SnowflakeFactory, iso_timestamp

# Permission bits, as Discord defines them (not imported from discord.py, so the fake checks the client).
CREATE_INSTANT_INVITE = 1 << 0
ADMINISTRATOR = 1 << 3
MANAGE_CHANNELS = 1 << 4
MANAGE_GUILD = 1 << 5
ADD_REACTIONS = 1 << 6
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
MENTION_EVERYONE = 1 << 17
USE_EXTERNAL_EMOJIS = 1 << 18
CHANGE_NICKNAME = 1 << 26
USE_APPLICATION_COMMANDS = 1 << 31
SEND_MESSAGES_IN_THREADS = 1 << 38
ALL_PERMISSIONS = (1 << 51) - 1

EVERYONE_PERMISSIONS = (
    CREATE_INSTANT_INVITE
    | ADD_REACTIONS
    | VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | USE_EXTERNAL_EMOJIS
    | CHANGE_NICKNAME
    | USE_APPLICATION_COMMANDS
    | SEND_MESSAGES_IN_THREADS
)
BOT_PERMISSIONS = EVERYONE_PERMISSIONS | MANAGE_MESSAGES | MENTION_EVERYONE

# Gateway intents the fake looks at when deciding which events a session receives.
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12

CHANNEL_TEXT = 0
CHANNEL_DM = 1

DEFAULT_UPLOAD_LIMIT_BYTES = 10 * 1024 * 1024


@dataclasses.dataclass
class FakeUser:
    """A Discord user (a member of no guild by itself)."""

    id: int
    username: str
    global_name: str | None = None
    bot: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.username,
            "discriminator": "0",
            "global_name": self.global_name,
            "avatar": None,
            "banner": None,
            "accent_color": None,
            "bot": self.bot,
            "system": False,
            "public_flags": 0,
            "flags": 0,
            "avatar_decoration_data": None,
        }

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"


@dataclasses.dataclass
class FakeRole:
    """A guild role; the @everyone role's id is the guild's id."""

    id: int
    name: str
    permissions: int
    position: int = 0
    managed: bool = False

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": self.managed,
            "mentionable": False,
            "flags": 0,
        }


@dataclasses.dataclass
class FakeChannel:
    """A guild text channel or a DM channel."""

    id: int
    name: str
    guild_id: int | None
    type: int = CHANNEL_TEXT
    nsfw: bool = False
    position: int = 0
    topic: str | None = None
    recipients: list[FakeUser] = dataclasses.field(default_factory=list)
    last_message_id: int | None = None
    # Permissions the bot lacks in this channel (a 403 50013 for actions that need them).
    denied_bot_permissions: int = 0
    # Overwrites as Discord sends them ({"id", "type": 0 role / 1 member, "allow", "deny"}).
    permission_overwrites: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Set when the channel was deleted: REST answers 404 10003 Unknown Channel.
    deleted: bool = False

    @property
    def is_dm(self) -> bool:
        return self.type == CHANNEL_DM

    def payload(self) -> dict[str, Any]:
        if self.is_dm:
            return {
                "id": str(self.id),
                "type": CHANNEL_DM,
                "last_message_id": _str_or_none(self.last_message_id),
                "recipients": [user.payload() for user in self.recipients],
                "flags": 0,
            }
        return {
            "id": str(self.id),
            "type": self.type,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "permission_overwrites": [dict(overwrite) for overwrite in self.permission_overwrites],
            "nsfw": self.nsfw,
            "topic": self.topic,
            "parent_id": None,
            "rate_limit_per_user": 0,
            "last_message_id": _str_or_none(self.last_message_id),
            "flags": 0,
        }


@dataclasses.dataclass
class FakeMember:
    """A user's membership of a guild, with role ids (never the @everyone role)."""

    user: FakeUser
    role_ids: list[int] = dataclasses.field(default_factory=list)
    nick: str | None = None
    joined_at: float = dataclasses.field(default_factory=time.time)

    def payload(self, *, with_user: bool = True) -> dict[str, Any]:
        data: dict[str, Any] = {
            "nick": self.nick,
            "avatar": None,
            "banner": None,
            "roles": [str(role_id) for role_id in self.role_ids],
            "joined_at": iso_timestamp(self.joined_at),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self.user.payload()
        return data


@dataclasses.dataclass
class FakeGuild:
    """A guild with roles, text channels and members."""

    id: int
    name: str
    owner_id: int
    roles: list[FakeRole] = dataclasses.field(default_factory=list)
    channels: list[FakeChannel] = dataclasses.field(default_factory=list)
    members: list[FakeMember] = dataclasses.field(default_factory=list)
    preferred_locale: str = "en-US"
    upload_limit_bytes: int = DEFAULT_UPLOAD_LIMIT_BYTES

    def channel(self, name: str) -> FakeChannel:
        for channel in self.channels:
            if channel.name == name:
                return channel
        raise KeyError(
            f"guild {self.name!r} has no channel {name!r}; it has {[c.name for c in self.channels]}"
        )

    def role(self, name: str) -> FakeRole:
        for role in self.roles:
            if role.name == name:
                return role
        raise KeyError(f"guild {self.name!r} has no role {name!r}")

    def member(self, user_id: int) -> FakeMember | None:
        return next((m for m in self.members if m.user.id == user_id), None)

    def permissions_of(self, member: FakeMember) -> int:
        """Guild-level permissions: @everyone plus the member's roles; owner and admins get all."""
        if member.user.id == self.owner_id:
            return ALL_PERMISSIONS
        value = 0
        for role in self.roles:
            if role.id == self.id or role.id in member.role_ids:
                value |= role.permissions
        return ALL_PERMISSIONS if value & ADMINISTRATOR else value

    def payload(self, *, joined_at: float) -> dict[str, Any]:
        """The full GUILD_CREATE payload (member_count == len(members), so discord.py sees it as chunked)."""
        return {
            "id": str(self.id),
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": self.preferred_locale,
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "vanity_url_code": None,
            "application_id": None,
            "max_members": 500000,
            "features": [],
            "roles": [role.payload() for role in self.roles],
            "emojis": [],
            "stickers": [],
            "joined_at": iso_timestamp(joined_at),
            "large": False,
            "unavailable": False,
            "member_count": len(self.members),
            "members": [member.payload() for member in self.members],
            "channels": [channel.payload() for channel in self.channels if not channel.deleted],
            "threads": [],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }


@dataclasses.dataclass
class World:
    """Everything the fake knows about: the bot's application and user, guilds, other users and DMs."""

    snowflakes: SnowflakeFactory
    application_id: int
    bot_user: FakeUser
    owner: FakeUser
    guilds: list[FakeGuild] = dataclasses.field(default_factory=list)
    users: dict[int, FakeUser] = dataclasses.field(default_factory=dict)
    dm_channels: dict[int, FakeChannel] = dataclasses.field(default_factory=dict)
    application_name: str = "i2p2i-test"
    bot_permissions: int = BOT_PERMISSIONS

    @classmethod
    def default(cls, *, guild_count: int = 1, snowflakes: SnowflakeFactory | None = None) -> World:
        """One application and bot user, and ``guild_count`` guilds like a small art server.

        Each guild has channels #general, #art-nsfw (age-restricted, ``nsfw: true``) and #bot-log; roles
        @everyone, Artist, Moderator, Admin and the bot's managed role; members owner (the guild owner),
        alice (Artist), bob (no role), mod (Moderator) and the bot.
        """
        ids = snowflakes or SnowflakeFactory()
        bot_user = FakeUser(ids.next(), "i2p2i-test", bot=True)
        owner = FakeUser(ids.next(), "owner", global_name="Owner")
        world = cls(snowflakes=ids, application_id=bot_user.id, bot_user=bot_user, owner=owner)
        for user in (
            bot_user,
            owner,
            FakeUser(ids.next(), "alice", global_name="Alice"),
            FakeUser(ids.next(), "bob", global_name="Bob"),
            FakeUser(ids.next(), "mod", global_name="Mod"),
        ):
            world.users[user.id] = user
        for index in range(guild_count):
            world.add_guild("Fake Guild" if index == 0 else f"Fake Guild {index + 1}")
        return world

    def add_guild(self, name: str) -> FakeGuild:
        ids = self.snowflakes
        guild = FakeGuild(id=ids.next(), name=name, owner_id=self.owner.id)
        everyone = FakeRole(guild.id, "@everyone", EVERYONE_PERMISSIONS, position=0)
        artist = FakeRole(ids.next(), "Artist", 0, position=1)
        moderator = FakeRole(ids.next(), "Moderator", MANAGE_MESSAGES, position=2)
        admin = FakeRole(ids.next(), "Admin", ADMINISTRATOR, position=3)
        bot_role = FakeRole(ids.next(), self.application_name, self.bot_permissions, position=4, managed=True)
        guild.roles = [everyone, artist, moderator, admin, bot_role]
        guild.channels = [
            FakeChannel(ids.next(), "general", guild.id, position=0, topic="Say hi"),
            FakeChannel(ids.next(), "art-nsfw", guild.id, nsfw=True, position=1, topic="Age-restricted"),
            FakeChannel(ids.next(), "bot-log", guild.id, position=2),
        ]
        by_name = {user.username: user for user in self.users.values()}
        guild.members = [
            FakeMember(self.owner, [admin.id]),
            FakeMember(by_name["alice"], [artist.id]),
            FakeMember(by_name["bob"], []),
            FakeMember(by_name["mod"], [moderator.id]),
            FakeMember(self.bot_user, [bot_role.id]),
        ]
        self.guilds.append(guild)
        return guild

    def user(self, name_or_id: str | int) -> FakeUser:
        """A user by username or id."""
        if isinstance(name_or_id, int):
            return self.users[name_or_id]
        for user in self.users.values():
            if user.username == name_or_id:
                return user
        raise KeyError(f"no user {name_or_id!r}; users are {[u.username for u in self.users.values()]}")

    def add_user(
        self, username: str, *, guild: FakeGuild | None = None, roles: Sequence[str] = ()
    ) -> FakeUser:
        user = FakeUser(self.snowflakes.next(), username, global_name=username.title())
        self.users[user.id] = user
        if guild is not None:
            guild.members.append(FakeMember(user, [guild.role(name).id for name in roles]))
        return user

    def guild(self, guild_id: int | None = None) -> FakeGuild:
        """A guild by id; the first guild when no id is given."""
        if guild_id is None:
            return self.guilds[0]
        for guild in self.guilds:
            if guild.id == guild_id:
                return guild
        raise KeyError(f"no guild {guild_id}")

    def find_channel(self, channel_id: int) -> FakeChannel | None:
        """A guild or DM channel by id, deleted ones included."""
        for guild in self.guilds:
            for channel in guild.channels:
                if channel.id == channel_id:
                    return channel
        return next((c for c in self.dm_channels.values() if c.id == channel_id), None)

    def bot_permissions_in(self, channel: FakeChannel) -> int:
        """What the bot may do in ``channel``: its roles in the guild, less what the channel denies it.

        A DM channel allows everything a DM can do.
        """
        if channel.guild_id is None:
            return ALL_PERMISSIONS
        guild = self.guild(channel.guild_id)
        member = guild.member(self.bot_user.id)
        granted = 0 if member is None else guild.permissions_of(member)
        if granted == ALL_PERMISSIONS:
            return granted  # administrators ignore overwrites
        return granted & ~channel.denied_bot_permissions

    def dm_channel_for(self, user: FakeUser) -> FakeChannel:
        """The DM channel between the bot and ``user``, made on first use."""
        channel = self.dm_channels.get(user.id)
        if channel is None:
            channel = FakeChannel(self.snowflakes.next(), "", None, type=CHANNEL_DM, recipients=[user])
            self.dm_channels[user.id] = channel
        return channel

    def application_payload(self) -> dict[str, Any]:
        """GET /oauth2/applications/@me."""
        return {
            "id": str(self.application_id),
            "name": self.application_name,
            "icon": None,
            "description": "A fake application served by the loopback Discord.",
            "summary": "",
            "type": None,
            "rpc_origins": [],
            "bot_public": True,
            "bot_require_code_grant": False,
            "bot": self.bot_user.payload(),
            "owner": self.owner.payload(),
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "tags": [],
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "approximate_guild_count": len(self.guilds),
            "integration_types_config": {"0": {}},
        }


def _str_or_none(value: int | None) -> str | None:
    return None if value is None else str(value)
