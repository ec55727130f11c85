"""Per-server settings: what a Discord server's admins change over the config file's defaults and bounds.

The config file (`[generate]`, `[interrogate]`) holds the host's settings for every server; a server may
change its defaults within them and narrow its bounds, never widen them past what the host allows. A server
with no row has exactly the config file's settings. Torch-free and discord-free: the bot reads and writes
these through `ServerSettingsBook`, and the engine applies them to a request in `plan()`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from i2p2i_bot.config import GenerateSettings
from i2p2i_bot.flagged import NSFW_SETTINGS, FlaggedPolicy, NsfwSetting, policy_for
from i2p2i_bot.i18n import N_
from i2p2i_bot.lookalikes import fold
from i2p2i_bot.request import GenerationError, check_length, whole_number
from i2p2i_bot.terms import BannedTerms

if TYPE_CHECKING:
    from i2p2i_bot.presets import Presets
    from i2p2i_bot.store import Store

SettingKey = Literal[
    "steps",
    "max_steps",
    "count",
    "max_count",
    "size",
    "max_side",
    "negative_prompt",
    "banned_terms",
    "channels",
    "nsfw",
    "model",
]
# What /settings lists, in this order, with a line on what each means.
KEYS: dict[SettingKey, str] = {
    "steps": N_("denoising steps a request gets by default"),
    "max_steps": N_("most denoising steps a member may ask for"),
    "count": N_("images a request makes by default"),
    "max_count": N_("most images in one request"),
    "size": N_("default image size, WIDTHxHEIGHT"),
    "max_side": N_("largest width or height a member may ask for"),
    "negative_prompt": N_("negative prompt used when a request gives none"),
    "banned_terms": N_("terms refused in prompts here, besides the bot's own list"),
    "channels": N_("the channels the bot answers commands in (all when empty)"),
    "nsfw": N_(
        "images the safety checker flags: filtered (withheld everywhere), or spoiler or unfiltered "
        "in age-restricted channels only"
    ),
    "model": N_("the model preset a request gets when the member names none"),
}
DEFAULT_COUNT = 4
MAX_BANNED_TERMS = 200
MAX_TERM_CHARS = 100
MAX_CHANNELS = 50
_CHANNEL = re.compile(r"<#(\d{1,20})>|(\d{1,20})")
_SIZE = re.compile(r"\s*(\d{1,5})\s*[x×*]\s*(\d{1,5})\s*")


class SettingError(ValueError):
    """A /settings value that cannot be used; the message is one sentence for the admin."""


@dataclass(frozen=True)
class ServerSettings:
    """One server's changes; None (or empty) keeps the config file's value."""

    steps: int | None = None
    max_steps: int | None = None
    count: int | None = None
    max_count: int | None = None
    width: int | None = None
    height: int | None = None
    max_side: int | None = None
    negative_prompt: str | None = None
    banned_terms: tuple[str, ...] = ()
    channel_ids: tuple[int, ...] = ()
    # What age-restricted channels get of flagged images (flagged.py); None: filtered, as everywhere else.
    nsfw: NsfwSetting | None = None
    # The preset a request gets when its member names none; None: the bot's default preset.
    model: str | None = None

    @property
    def empty(self) -> bool:
        return self == ServerSettings()

    def generate(self, base: GenerateSettings) -> GenerateSettings:
        """The config file's generation settings with this server's changes applied."""
        changes: dict[str, Any] = {
            name: value
            for name in ("steps", "max_steps", "max_count", "width", "height", "max_side", "negative_prompt")
            if (value := getattr(self, name)) is not None
        }
        return dataclasses.replace(base, **changes)

    def default_count(self, base: GenerateSettings) -> int:
        """How many images a request makes when the member does not say."""
        settings = self.generate(base)
        return self.count if self.count is not None else min(DEFAULT_COUNT, settings.max_count)

    def allows_channel(self, channel_id: int | None) -> bool:
        return not self.channel_ids or channel_id in self.channel_ids

    def flagged_policy(self, *, in_server: bool, age_restricted: bool) -> FlaggedPolicy:
        """What a job asked (or a result shown) in such a place does with flagged images."""
        return policy_for(self.nsfw or "filtered", in_server=in_server, age_restricted=age_restricted)

    def changed(
        self, key: SettingKey, text: str, base: GenerateSettings, presets: Presets | None = None
    ) -> ServerSettings:
        """These settings with `key` set from an admin's text; SettingError names what is wrong.

        The result is checked as a whole: a default may not lie outside a bound (say, a default of 8 images
        under a maximum of 4), and no bound may go past the config file's. A model is checked against
        `presets`, the bot's own; naming the bot's default clears the server's.
        """
        text = text.strip()
        if key == "steps":
            updated = dataclasses.replace(self, steps=_whole(text, N_("Steps")))
        elif key == "max_steps":
            value = _whole(text, N_("The most steps"))
            _within(N_("The most steps"), value, 1, base.max_steps)
            updated = dataclasses.replace(self, max_steps=value)
        elif key == "count":
            updated = dataclasses.replace(self, count=_whole(text, N_("The default number of images")))
        elif key == "max_count":
            value = _whole(text, N_("The most images"))
            _within(N_("The most images"), value, 1, base.max_count)
            updated = dataclasses.replace(self, max_count=value)
        elif key == "size":
            width, height = _size(text)
            updated = dataclasses.replace(self, width=width, height=height)
        elif key == "max_side":
            value = _whole(text, N_("The largest side"))
            _multiple_of_8(N_("The largest side"), value)
            _within(N_("The largest side"), value, base.min_side, base.max_side)
            updated = dataclasses.replace(self, max_side=value)
        elif key == "negative_prompt":
            try:
                check_length(text, negative=True)
            except GenerationError as exc:
                raise SettingError(str(exc)) from None
            updated = dataclasses.replace(self, negative_prompt="" if text.lower() == "none" else text)
        elif key == "banned_terms":
            updated = dataclasses.replace(self, banned_terms=_terms(text))
        elif key == "channels":
            updated = dataclasses.replace(self, channel_ids=_channels(text))
        elif key == "nsfw":
            updated = dataclasses.replace(self, nsfw=_nsfw(text))
        elif key == "model":
            if presets is None:
                raise TypeError("a model is checked against the bot's presets")
            try:
                name = presets.get(text).name
            except GenerationError as exc:  # UnknownPreset: its sentence lists the presets there are
                raise SettingError(str(exc)) from None
            updated = dataclasses.replace(self, model=None if name == presets.default else name)
        else:
            raise SettingError(f"There is no setting called {key!r}.")
        updated.check(base)
        return updated.without_defaults(base)

    def without_defaults(self, base: GenerateSettings) -> ServerSettings:
        """These settings less every value the server would have anyway: a key set to the bot's default
        follows the default from then on, as after /settings reset, and reads so in /settings show."""
        changes: dict[str, Any] = {
            name: None
            for name in ("steps", "max_steps", "max_count", "max_side", "negative_prompt")
            if getattr(self, name) == getattr(base, name)
        }
        if (self.width, self.height) == (base.width, base.height):
            changes.update(width=None, height=None)
        if self.nsfw == "filtered":
            changes["nsfw"] = None
        plain = dataclasses.replace(self, **changes)
        unset_count = dataclasses.replace(plain, count=None)
        return unset_count if plain.count == unset_count.default_count(base) else plain

    def reset(self, key: SettingKey | Literal["all"]) -> ServerSettings:
        """These settings with `key` (or everything) back to the config file's."""
        if key == "all":
            return ServerSettings()
        fields = {"size": ("width", "height"), "channels": ("channel_ids",)}.get(key, (key,))
        defaults = {name: getattr(ServerSettings(), name) for name in fields}
        return dataclasses.replace(self, **defaults)

    def check(self, base: GenerateSettings) -> None:
        """Every default within every bound, and no bound past the config file's."""
        settings = self.generate(base)
        _within(N_("Steps"), settings.steps, 1, settings.max_steps, bound=N_("the most steps"))
        if self.count is not None:
            _within(
                N_("The default number of images"),
                self.count,
                1,
                settings.max_count,
                bound=N_("the most images"),
            )
        for name, side in (
            (N_("The default width"), settings.width),
            (N_("The default height"), settings.height),
        ):
            _within(name, side, settings.min_side, settings.max_side, bound=N_("the largest side"))

    def describe(
        self, key: SettingKey, base: GenerateSettings, presets: Presets | None = None
    ) -> tuple[str, bool]:
        """The value `key` has on this server, as text, and whether the server changed it."""
        settings = self.generate(base)
        if key == "model":
            default = presets.default if presets is not None else "default"
            if presets is not None and self.model not in presets.by_name:
                return default, False  # none set, or a preset the config no longer has
            return (self.model or default), self.model is not None
        if key == "size":
            return f"{settings.width}x{settings.height}", self.width is not None
        if key == "count":
            return str(self.default_count(base)), self.count is not None
        if key == "banned_terms":
            return (", ".join(self.banned_terms) or "none"), bool(self.banned_terms)
        if key == "channels":
            return (" ".join(f"<#{c}>" for c in self.channel_ids) or "all"), bool(self.channel_ids)
        if key == "negative_prompt":
            return (settings.negative_prompt or "none"), self.negative_prompt is not None
        if key == "nsfw":
            return (self.nsfw or "filtered"), self.nsfw is not None
        return str(getattr(settings, key)), getattr(self, key) is not None

    # -- storage ---------------------------------------------------------------------------------------

    def to_json(self) -> str:
        values = {
            f.name: list(value) if isinstance(value, tuple) else value
            for f in dataclasses.fields(self)
            if (value := getattr(self, f.name)) != f.default
        }
        return json.dumps(values, ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServerSettings:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in raw.items():
            if name in known:  # a field a later version dropped is ignored, not fatal
                values[name] = tuple(value) if isinstance(value, list) else value
        return cls(**values)


class ServerSettingsBook:
    """Every server's settings, read once at start and written through to the store on each change."""

    def __init__(
        self,
        store: Store,
        base: GenerateSettings,
        banned: BannedTerms,
        rows: Mapping[int, ServerSettings],
    ) -> None:
        self._store = store
        self.base = base
        self._banned = banned
        self._servers = dict(rows)
        self._server_banned: dict[int, BannedTerms] = {}

    @classmethod
    async def open(cls, store: Store, base: GenerateSettings, banned: BannedTerms) -> ServerSettingsBook:
        rows = {guild_id: ServerSettings.from_json(text) for guild_id, text in await store.server_settings()}
        return cls(store, base, banned, rows)

    def get(self, guild_id: int | None) -> ServerSettings:
        """A server's settings; direct messages and unknown servers have the config file's."""
        if guild_id is None:
            return ServerSettings()
        return self._servers.get(guild_id, ServerSettings())

    def generate(self, guild_id: int | None) -> GenerateSettings:
        return self.get(guild_id).generate(self.base)

    def default_count(self, guild_id: int | None) -> int:
        return self.get(guild_id).default_count(self.base)

    def flagged_policy(self, guild_id: int | None, *, age_restricted: bool) -> FlaggedPolicy:
        """What flagged images get in a channel of this server (None: a direct message, which never
        gets them)."""
        return self.get(guild_id).flagged_policy(
            in_server=guild_id is not None, age_restricted=age_restricted
        )

    def banned(self, guild_id: int | None) -> BannedTerms:
        """The bot's banned terms and the server's own."""
        extra = self.get(guild_id).banned_terms
        if guild_id is None or not extra:
            return self._banned
        if guild_id not in self._server_banned:
            self._server_banned[guild_id] = BannedTerms([*self._banned.terms, *extra])
        return self._server_banned[guild_id]

    async def put(self, guild_id: int, settings: ServerSettings, *, by: int) -> None:
        """Store a server's settings (an empty set removes its row) and use them from now on."""
        await self._store.put_server_settings(
            guild_id, None if settings.empty else settings.to_json(), updated_by=by, updated_at=time.time()
        )
        if settings.empty:
            self._servers.pop(guild_id, None)
        else:
            self._servers[guild_id] = settings
        self._server_banned.pop(guild_id, None)


def _whole(text: str, name: str) -> int:
    value = whole_number(text)
    if value is None:
        raise SettingError(f"{name} must be a whole number (you typed “{text[:40]}”).")
    return value


def _within(name: str, value: int, low: int, high: int, *, bound: str | None = None) -> None:
    """`name` and `bound` are catalogue keys (N_): translate() carries them into the member's language."""
    if low <= value <= high:
        return
    if bound is None:
        raise SettingError(f"{name} must be between {low} and {high} (got {value}).")
    raise SettingError(f"{name} must be between {low} and {high}, which is {bound} here (got {value}).")


def _multiple_of_8(name: str, value: int) -> None:
    if value % 8:
        raise SettingError(f"{name} must be a multiple of 8 (got {value}).")


def _size(text: str) -> tuple[int, int]:
    match = _SIZE.fullmatch(text)
    if match is None:
        raise SettingError(f"Write the size as WIDTHxHEIGHT, like 512x512 (you typed “{text[:40]}”).")
    width, height = int(match[1]), int(match[2])
    _multiple_of_8(N_("The width"), width)
    _multiple_of_8(N_("The height"), height)
    return width, height


def _terms(text: str) -> tuple[str, ...]:
    if text.lower() == "none":
        return ()
    # A term of invisible characters alone would match nothing (lookalikes.fold drops them).
    terms = tuple(dict.fromkeys(term.strip() for term in text.split(",") if fold(term).strip()))
    if not terms:
        raise SettingError("List the banned terms separated by commas, or write none.")
    if len(terms) > MAX_BANNED_TERMS:
        raise SettingError(f"A server may ban at most {MAX_BANNED_TERMS} terms (got {len(terms)}).")
    long = next((term for term in terms if len(term) > MAX_TERM_CHARS), None)
    if long is not None:
        raise SettingError(
            f"A banned term may be at most {MAX_TERM_CHARS} characters (“{long[:40]}…” is longer)."
        )
    return terms


def _channels(text: str) -> tuple[int, ...]:
    if text.lower() in ("all", "none", ""):
        return ()
    ids: list[int] = []
    rest = text
    for match in _CHANNEL.finditer(text):
        ids.append(int(match[1] or match[2]))
        rest = rest.replace(match[0], " ", 1)
    if rest.replace(",", " ").strip() or not ids:
        raise SettingError("Name the channels as #mentions (or their ids) separated by spaces, or write all.")
    unique = tuple(dict.fromkeys(ids))
    if len(unique) > MAX_CHANNELS:
        raise SettingError(f"A server may list at most {MAX_CHANNELS} channels (got {len(unique)}).")
    return unique


def _nsfw(text: str) -> NsfwSetting:
    for value in NSFW_SETTINGS:
        if text.lower() == value:
            return value
    raise SettingError(
        "nsfw must be filtered, spoiler or unfiltered (spoiler and unfiltered apply in age-restricted "
        f"channels only; you typed “{text[:40]}”)."
    )


def channel_list(ids: Iterable[int]) -> str:
    """Channel mentions for a sentence: "<#1>, <#2>"."""
    return ", ".join(f"<#{c}>" for c in ids)
