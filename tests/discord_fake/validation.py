"""Discord's documented limits, checked on what the client sends, so a body Discord would refuse is refused.

Each check raises the 400 50035 "Invalid Form Body" (or 413 40005 for an oversize upload) Discord answers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .faults import REQUEST_TOO_LARGE, ApiError, invalid_form_body
from .messages import IS_COMPONENTS_V2, walk_components
from .records import UploadedFile

MAX_CONTENT_CHARS = 2000
MAX_EMBEDS = 10
MAX_EMBED_TOTAL_CHARS = 6000
MAX_FILES = 10
MAX_ACTION_ROWS = 5
MAX_ROW_BUTTONS = 5
MAX_COMPONENTS_V2 = 40
MAX_CUSTOM_ID_CHARS = 100
MAX_BUTTON_LABEL_CHARS = 80
MAX_SELECT_OPTIONS = 25
MAX_MODAL_TITLE_CHARS = 45
MAX_MODAL_COMPONENTS = 5
MAX_TEXT_INPUT_LABEL_CHARS = 45
MAX_TEXT_INPUT_CHARS = 4000
MAX_COMMANDS = 100
MAX_MESSAGE_CONTEXT_MENUS = 5
MAX_COMMAND_OPTIONS = 25
MAX_COMMAND_DESCRIPTION_CHARS = 100

_EMBED_LIMITS = {"title": 256, "description": 4096}
_CHAT_INPUT_NAME = re.compile(r"^[-_\w]{1,32}$")

BUTTON = 2
STRING_SELECT = 3
TEXT_INPUT = 4
ACTION_ROW = 1
LABEL = 18


def check_message(
    body: dict[str, Any] | None,
    files: Sequence[UploadedFile],
    *,
    upload_limit_bytes: int,
    creating: bool,
) -> None:
    """Content, embeds, components and files of a message being sent (``creating``) or edited."""
    body = body or {}
    content = body.get("content") or ""
    if len(content) > MAX_CONTENT_CHARS:
        raise invalid_form_body(
            "content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT_CHARS} or fewer in length."
        )
    _check_embeds(body.get("embeds") or [])
    components = body.get("components") or []
    _check_components(components, components_v2=bool(int(body.get("flags") or 0) & IS_COMPONENTS_V2))
    if len(files) > MAX_FILES:
        raise invalid_form_body("files", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_FILES} or fewer in length.")
    for upload in files:
        if upload.size > upload_limit_bytes:
            raise ApiError(413, REQUEST_TOO_LARGE, "Request entity too large")
    if creating and not (content or body.get("embeds") or components or files or body.get("sticker_ids")):
        raise ApiError(400, 50006, "Cannot send an empty message")


def check_modal(data: dict[str, Any] | None) -> None:
    """A modal's title, custom_id and inputs."""
    data = data or {}
    title = data.get("title") or ""
    if not 1 <= len(title) <= MAX_MODAL_TITLE_CHARS:
        raise invalid_form_body(
            "data.title", "BASE_TYPE_BAD_LENGTH", f"Must be between 1 and {MAX_MODAL_TITLE_CHARS} in length."
        )
    _check_custom_id("data.custom_id", data.get("custom_id"))
    components = data.get("components") or []
    if not 1 <= len(components) <= MAX_MODAL_COMPONENTS:
        raise invalid_form_body(
            "data.components",
            "BASE_TYPE_BAD_LENGTH",
            f"Must be between 1 and {MAX_MODAL_COMPONENTS} in length.",
        )
    for position, component in enumerate(components):
        label = component.get("label")
        if label is not None and len(label) > MAX_TEXT_INPUT_LABEL_CHARS:
            raise invalid_form_body(
                f"data.components.{position}.label",
                "BASE_TYPE_MAX_LENGTH",
                f"Must be {MAX_TEXT_INPUT_LABEL_CHARS} or fewer in length.",
            )
    for component in walk_components(components):
        if component.get("type") == TEXT_INPUT:
            _check_custom_id("data.components.custom_id", component.get("custom_id"))
            label = component.get("label")
            if label is not None and len(label) > MAX_TEXT_INPUT_LABEL_CHARS:
                raise invalid_form_body(
                    "data.components.label",
                    "BASE_TYPE_MAX_LENGTH",
                    f"Must be {MAX_TEXT_INPUT_LABEL_CHARS} or fewer in length.",
                )
            for key in ("max_length", "min_length"):
                if int(component.get(key) or 0) > MAX_TEXT_INPUT_CHARS:
                    raise invalid_form_body(
                        f"data.components.{key}",
                        "NUMBER_TYPE_MAX",
                        f"int value should be less than or equal to {MAX_TEXT_INPUT_CHARS}.",
                    )
            if len(component.get("value") or "") > MAX_TEXT_INPUT_CHARS:
                raise invalid_form_body(
                    "data.components.value",
                    "BASE_TYPE_MAX_LENGTH",
                    f"Must be {MAX_TEXT_INPUT_CHARS} or fewer in length.",
                )


def check_commands(commands: Any) -> None:
    """A bulk command overwrite: names, descriptions, option counts and the per-type command limits."""
    if not isinstance(commands, list):
        raise invalid_form_body("_", "LIST_TYPE_CONVERT", "Only iterables may be used in a ListType")
    by_type = {1: 0, 2: 0, 3: 0}
    for position, command in enumerate(commands):
        kind = int(command.get("type", 1))
        by_type[kind] = by_type.get(kind, 0) + 1
        name = command.get("name") or ""
        if kind == 1:
            if not _CHAT_INPUT_NAME.match(name) or name != name.lower():
                raise invalid_form_body(
                    f"{position}.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid"
                )
            description = command.get("description") or ""
            if not 1 <= len(description) <= MAX_COMMAND_DESCRIPTION_CHARS:
                raise invalid_form_body(
                    f"{position}.description",
                    "BASE_TYPE_BAD_LENGTH",
                    f"Must be between 1 and {MAX_COMMAND_DESCRIPTION_CHARS} in length.",
                )
        elif not 1 <= len(name) <= 32:
            raise invalid_form_body(
                f"{position}.name", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 32 in length."
            )
        if len(command.get("options") or []) > MAX_COMMAND_OPTIONS:
            raise invalid_form_body(
                f"{position}.options",
                "BASE_TYPE_MAX_LENGTH",
                f"Must be {MAX_COMMAND_OPTIONS} or fewer in length.",
            )
    if by_type[1] > MAX_COMMANDS:
        raise ApiError(400, 30032, "Maximum number of application commands reached")
    if by_type[3] > MAX_MESSAGE_CONTEXT_MENUS:
        raise ApiError(400, 30032, "Maximum number of message context menu commands reached")


def _check_embeds(embeds: list[dict[str, Any]]) -> None:
    if len(embeds) > MAX_EMBEDS:
        raise invalid_form_body("embeds", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBEDS} or fewer in length.")
    total = 0
    for position, embed in enumerate(embeds):
        for key, limit in _EMBED_LIMITS.items():
            value = embed.get(key) or ""
            total += len(value)
            if len(value) > limit:
                raise invalid_form_body(
                    f"embeds.{position}.{key}", "BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length."
                )
        for field in embed.get("fields") or []:
            total += len(field.get("name") or "") + len(field.get("value") or "")
        total += len((embed.get("footer") or {}).get("text") or "")
        total += len((embed.get("author") or {}).get("name") or "")
    if total > MAX_EMBED_TOTAL_CHARS:
        raise invalid_form_body("embeds", "BASE_TYPE_MAX_LENGTH", "Embed size exceeds maximum size of 6000")


def _check_components(components: list[dict[str, Any]], *, components_v2: bool) -> None:
    if components_v2:
        if len(walk_components(components)) > MAX_COMPONENTS_V2:
            raise invalid_form_body(
                "components", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_COMPONENTS_V2} or fewer in length."
            )
    elif len(components) > MAX_ACTION_ROWS:
        raise invalid_form_body(
            "components", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_ACTION_ROWS} or fewer in length."
        )
    for position, component in enumerate(components):
        if component.get("type") == ACTION_ROW:
            children = component.get("components") or []
            buttons = [c for c in children if c.get("type") == BUTTON]
            if len(buttons) > MAX_ROW_BUTTONS or (len(children) > 1 and len(buttons) != len(children)):
                raise invalid_form_body(
                    f"components.{position}.components", "BASE_TYPE_MAX_LENGTH", "Row is too wide."
                )
    for component in walk_components(components):
        if "custom_id" in component:
            _check_custom_id("components.custom_id", component["custom_id"])
        if component.get("type") == BUTTON and len(component.get("label") or "") > MAX_BUTTON_LABEL_CHARS:
            raise invalid_form_body(
                "components.label",
                "BASE_TYPE_MAX_LENGTH",
                f"Must be {MAX_BUTTON_LABEL_CHARS} or fewer in length.",
            )
        if len(component.get("options") or []) > MAX_SELECT_OPTIONS:
            raise invalid_form_body(
                "components.options",
                "BASE_TYPE_MAX_LENGTH",
                f"Must be {MAX_SELECT_OPTIONS} or fewer in length.",
            )


def _check_custom_id(field: str, custom_id: Any) -> None:
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        raise invalid_form_body(
            field, "BASE_TYPE_BAD_LENGTH", f"Must be between 1 and {MAX_CUSTOM_ID_CHARS} in length."
        )
