"""Messages and attachments the fake holds, so edits and deletes apply and tests read the current state."""

from __future__ import annotations

import copy
import dataclasses
import io
import mimetypes
from collections.abc import Iterator, Sequence
from typing import Any

from .faults import invalid_form_body
from .records import UploadedFile
from .snowflakes import SnowflakeFactory, iso_timestamp
from .world import FakeChannel, FakeUser

EPHEMERAL = 1 << 6
LOADING = 1 << 7
SUPPRESS_EMBEDS = 1 << 2
SUPPRESS_NOTIFICATIONS = 1 << 12
IS_COMPONENTS_V2 = 1 << 15
# Flags a client may set when sending or editing; the others belong to Discord.
_CLIENT_FLAGS = EPHEMERAL | SUPPRESS_EMBEDS | SUPPRESS_NOTIFICATIONS | IS_COMPONENTS_V2


@dataclasses.dataclass
class StoredAttachment:
    """An attachment's bytes, served at its loopback URL."""

    id: int
    channel_id: int
    filename: str
    data: bytes
    content_type: str | None
    width: int | None = None
    height: int | None = None
    description: str | None = None
    ephemeral: bool = False
    base_url: str = ""
    # What the payload claims instead of the truth (a size that lies, a URL on another host).
    declared_size: int | None = None
    url_override: str | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.declared_size is None else self.declared_size

    @property
    def url(self) -> str:
        if self.url_override is not None:
            return self.url_override
        return f"{self.base_url}/attachments/{self.channel_id}/{self.id}/{self.filename}"

    @property
    def proxy_url(self) -> str:
        return f"{self.base_url}/media/attachments/{self.channel_id}/{self.id}/{self.filename}"

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.proxy_url,
            "content_type": self.content_type,
            "ephemeral": self.ephemeral,
            "flags": 0,
        }
        if self.width is not None and self.height is not None:
            data["width"] = self.width
            data["height"] = self.height
        if self.description is not None:
            data["description"] = self.description
        return data


class AttachmentStore:
    """Every attachment the fake can serve, by id."""

    def __init__(self, snowflakes: SnowflakeFactory) -> None:
        self._snowflakes = snowflakes
        self._by_id: dict[int, StoredAttachment] = {}
        self.base_url = ""

    def add(
        self,
        data: bytes,
        filename: str,
        *,
        channel_id: int = 0,
        content_type: str | None = None,
        width: int | None = None,
        height: int | None = None,
        description: str | None = None,
        ephemeral: bool = False,
    ) -> StoredAttachment:
        """Store bytes; the content type is guessed from the name and image sizes read from the bytes."""
        if content_type is None:
            content_type = mimetypes.guess_type(filename)[0]
        if width is None and height is None and (content_type or "").startswith("image/"):
            width, height = _image_size(data)
        attachment = StoredAttachment(
            id=self._snowflakes.next(),
            channel_id=channel_id,
            filename=filename,
            data=data,
            content_type=content_type,
            width=width,
            height=height,
            description=description,
            ephemeral=ephemeral,
        )
        attachment.base_url = self.base_url
        self._by_id[attachment.id] = attachment
        return attachment

    def set_base_url(self, base_url: str) -> None:
        self.base_url = base_url
        for attachment in self._by_id.values():
            attachment.base_url = base_url

    def get(self, attachment_id: int) -> StoredAttachment | None:
        return self._by_id.get(attachment_id)


@dataclasses.dataclass
class StoredMessage:
    """A message's current state; ``revisions`` keeps each earlier state, oldest first."""

    id: int
    channel_id: int
    author: FakeUser
    created_at: float
    content: str = ""
    embeds: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    components: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    attachments: list[StoredAttachment] = dataclasses.field(default_factory=list)
    flags: int = 0
    type: int = 0
    tts: bool = False
    guild_id: int | None = None
    edited_at: float | None = None
    deleted: bool = False
    webhook_id: int | None = None
    application_id: int | None = None
    interaction_id: int | None = None
    interaction_metadata: dict[str, Any] | None = None
    message_reference: dict[str, Any] | None = None
    revisions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # The sender's nonce, echoed back in the create answer (and used by ``enforce_nonce``).
    nonce: str | None = None

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        """True while the message is a deferred "thinking…" placeholder."""
        return bool(self.flags & LOADING)

    def file(self, filename: str) -> bytes:
        """The bytes of the attachment named ``filename``."""
        for attachment in self.attachments:
            if attachment.filename == filename:
                return attachment.data
        raise KeyError(
            f"message {self.id} has no attachment {filename!r}: {[a.filename for a in self.attachments]}"
        )

    def custom_ids(self) -> list[str]:
        """Every custom_id in the message's components, in order."""
        return [c["custom_id"] for c in walk_components(self.components) if "custom_id" in c]

    def component(self, custom_id: str) -> dict[str, Any] | None:
        return next((c for c in walk_components(self.components) if c.get("custom_id") == custom_id), None)

    def payload(self) -> dict[str, Any]:
        """The message as Discord's REST API returns it."""
        data: dict[str, Any] = {
            "id": str(self.id),
            "channel_id": str(self.channel_id),
            "author": self.author.payload(),
            "content": self.content,
            "timestamp": iso_timestamp(self.created_at),
            "edited_timestamp": None if self.edited_at is None else iso_timestamp(self.edited_at),
            "tts": self.tts,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [a.payload() for a in self.attachments],
            "embeds": copy.deepcopy(self.embeds),
            "components": copy.deepcopy(self.components),
            "pinned": False,
            "type": self.type,
            "flags": self.flags,
        }
        if self.webhook_id is not None:
            data["webhook_id"] = str(self.webhook_id)
        if self.application_id is not None:
            data["application_id"] = str(self.application_id)
        if self.interaction_metadata is not None:
            data["interaction_metadata"] = copy.deepcopy(self.interaction_metadata)
        if self.message_reference is not None:
            data["message_reference"] = copy.deepcopy(self.message_reference)
        if self.nonce is not None:
            data["nonce"] = self.nonce
        return data

    def _snapshot(self) -> dict[str, Any]:
        return {
            "content": self.content,
            "embeds": copy.deepcopy(self.embeds),
            "components": copy.deepcopy(self.components),
            "attachments": [a.filename for a in self.attachments],
            "flags": self.flags,
            "edited_at": self.edited_at,
        }


def walk_components(components: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every component, depth first: rows, sections, containers and labels are opened up."""
    found: list[dict[str, Any]] = []
    for component in components:
        found.append(component)
        found.extend(walk_components(component.get("components", [])))
        if isinstance(component.get("component"), dict):
            found.extend(walk_components([component["component"]]))
        if isinstance(component.get("accessory"), dict):
            found.append(component["accessory"])
    return found


class MessageStore:
    """Every message, by id, in creation order."""

    def __init__(self, snowflakes: SnowflakeFactory, attachments: AttachmentStore) -> None:
        self._snowflakes = snowflakes
        self._attachments = attachments
        self._by_id: dict[int, StoredMessage] = {}

    def __iter__(self) -> Iterator[StoredMessage]:
        return iter(list(self._by_id.values()))

    def get(self, message_id: int) -> StoredMessage | None:
        return self._by_id.get(message_id)

    def by_nonce(self, channel_id: int, author_id: int, nonce: str, *, since: float) -> StoredMessage | None:
        """The message ``author_id`` sent in the channel with ``nonce`` at or after ``since``, if any."""
        for message in self._by_id.values():
            if (
                message.channel_id == channel_id
                and message.author.id == author_id
                and message.nonce == nonce
                and message.created_at >= since
            ):
                return message
        return None

    def in_channel(self, channel_id: int, *, include_deleted: bool = False) -> list[StoredMessage]:
        return [
            m
            for m in self._by_id.values()
            if m.channel_id == channel_id and (include_deleted or not m.deleted)
        ]

    def create(
        self,
        *,
        channel: FakeChannel,
        author: FakeUser,
        now: float,
        body: dict[str, Any] | None,
        files: Sequence[UploadedFile] = (),
        flags: int = 0,
        message_type: int = 0,
        ephemeral_attachments: bool = False,
    ) -> StoredMessage:
        """A new message from a send-message body (content, embeds, components, attachments, flags)."""
        body = body or {}
        message = StoredMessage(
            id=self._snowflakes.next(now),
            channel_id=channel.id,
            guild_id=channel.guild_id,
            author=author,
            created_at=now,
            type=message_type,
            tts=bool(body.get("tts", False)),
            flags=(int(body.get("flags") or 0) & _CLIENT_FLAGS) | flags,
        )
        message.content = body.get("content") or ""
        message.nonce = None if body.get("nonce") is None else str(body["nonce"])
        message.embeds = copy.deepcopy(body.get("embeds") or [])
        message.components = copy.deepcopy(body.get("components") or [])
        if body.get("message_reference"):
            reference = dict(body["message_reference"])
            reference.setdefault("channel_id", str(channel.id))
            if channel.guild_id is not None:
                reference.setdefault("guild_id", str(channel.guild_id))
            message.message_reference = reference
            message.type = 19 if message_type == 0 else message_type
        message.attachments = self._attachments_for(
            channel.id, [], body, files, ephemeral=ephemeral_attachments or message.ephemeral
        )
        self._by_id[message.id] = message
        channel.last_message_id = message.id
        return message

    def edit(
        self,
        message: StoredMessage,
        *,
        now: float,
        body: dict[str, Any] | None,
        files: Sequence[UploadedFile] = (),
    ) -> StoredMessage:
        """Apply an edit body: keys present replace; ``attachments`` lists what stays plus new uploads."""
        body = body or {}
        message.revisions.append(message._snapshot())
        if "content" in body:
            message.content = body["content"] or ""
        if "embeds" in body:
            message.embeds = copy.deepcopy(body["embeds"] or [])
        if "components" in body:
            message.components = copy.deepcopy(body["components"] or [])
        if body.get("flags") is not None:
            # An edit cannot make a message ephemeral or public: that was fixed when it was made.
            kept = message.flags & ~_CLIENT_FLAGS
            asked = int(body["flags"]) & _CLIENT_FLAGS & ~EPHEMERAL
            message.flags = kept | asked | (message.flags & EPHEMERAL)
        if "attachments" in body or files:
            message.attachments = self._attachments_for(
                message.channel_id, message.attachments, body, files, ephemeral=message.ephemeral
            )
        message.flags &= ~LOADING
        message.edited_at = now
        return message

    def delete(self, message: StoredMessage) -> None:
        message.deleted = True

    def _attachments_for(
        self,
        channel_id: int,
        existing: list[StoredAttachment],
        body: dict[str, Any],
        files: Sequence[UploadedFile],
        *,
        ephemeral: bool,
    ) -> list[StoredAttachment]:
        uploads = {_file_index(f.field): f for f in files}
        listed = body.get("attachments")
        if listed is None:
            # No attachments list: keep what was there and add every upload.
            entries = [{"id": str(index)} for index in sorted(uploads)]
            kept = list(existing)
        else:
            entries = list(listed)
            kept = []
        by_id = {a.id: a for a in existing}
        used: set[int] = set()
        result = kept
        for position, entry in enumerate(entries):
            raw_id = entry.get("id")
            try:
                entry_id = int(raw_id)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise invalid_form_body(
                    f"attachments.{position}.id", "NUMBER_TYPE_COERCE", "Not a snowflake."
                ) from None
            if entry_id in by_id:
                result.append(by_id[entry_id])
                continue
            upload = uploads.get(entry_id)
            if upload is None:
                raise invalid_form_body(
                    f"attachments.{position}.id", "ATTACHMENT_NOT_FOUND", f"Unknown attachment {raw_id}."
                )
            used.add(entry_id)
            result.append(
                self._attachments.add(
                    upload.data,
                    entry.get("filename") or upload.filename,
                    channel_id=channel_id,
                    content_type=_guess_type(upload),
                    description=entry.get("description"),
                    ephemeral=ephemeral,
                )
            )
        for index, upload in sorted(uploads.items()):
            if index not in used and listed is not None:
                # discord.py lists every upload; an unlisted one is still attached by Discord.
                result.append(
                    self._attachments.add(
                        upload.data, upload.filename, channel_id=channel_id, content_type=_guess_type(upload)
                    )
                )
        return result


def _file_index(field: str) -> int:
    # "files[3]" -> 3; Discord also accepts "file" and "files[n]"-less names, numbered in order.
    if field.startswith("files[") and field.endswith("]"):
        return int(field[6:-1])
    return 0


def _guess_type(upload: UploadedFile) -> str | None:
    # discord.py labels every upload application/octet-stream; Discord sniffs the real type.
    if upload.content_type and upload.content_type != "application/octet-stream":
        return upload.content_type
    return mimetypes.guess_type(upload.filename)[0] or upload.content_type


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    try:
        from PIL import Image
    except ImportError:
        return None, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None, None
