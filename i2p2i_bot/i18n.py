"""Member-facing text in the member's language: English, and Simplified Chinese (zh-CN) from a catalogue.

The English sentences are the keys (gettext's msgid), so a sentence is written once, in English, where it
is made. A key may hold `{name}` placeholders. Two doors lead into the one catalogue:

- `tr(locale, key, **params)` for text the code composes (a card's field names, a button's label, a job's
  status line): the key is looked up as written and its placeholders filled in, in the reader's language.
  `N_(key)` marks a key held in a table for a later `tr`, as gettext's N_ does.
- `translate(sentence, locale)` for a sentence finished elsewhere (an error raised deep in the engine: "Steps
  must be between 1 and 100 (got 120)."): it is matched against the keys with placeholders and the parts it
  filled in are carried into the translation, so such errors need no locale of their own. A part that is
  itself text of the catalogue (a bound's name, a failure's reason, reasons joined with LIST_AND) is
  translated in turn; so a sentence says numbers and names its own way rather than holding English pieces
  ("2 jobs"), one entry for one and one for many where English needs both.

A sentence without an entry stays English. Which locale a message gets (the member's, or the server's for
what the whole channel reads) is decided where it is sent: replies.py. Torch- and discord-free.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from importlib import resources

# Locales with a catalogue, as Discord names them; any other locale reads English.
CATALOGUES = ("zh-CN",)
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
# How deep a sentence's parts are looked up in turn (a reason inside a reason inside a sentence).
_MAX_NESTING = 4


@dataclass(frozen=True)
class Catalogue:
    """One language's commands (descriptions and choice names) and messages (sentences, with templates)."""

    commands: dict[str, str]
    messages: dict[str, str]

    @functools.cached_property
    def _templates(self) -> list[tuple[re.Pattern[str], str]]:
        found = []
        for key, text in self.messages.items():
            if _PLACEHOLDER.search(key):
                pattern = "".join(
                    f"(?P<{part}>.+?)" if i % 2 else re.escape(part)
                    for i, part in enumerate(_PLACEHOLDER.split(key))
                )
                found.append((key, re.compile(pattern, re.DOTALL), text))
        # A placeholder matches any text, so a general template ("{name} must be between {low} and {high}
        # (got {value}).") also matches what a more particular one was written for: the template with the
        # most fixed words is tried first.
        found.sort(key=lambda entry: -len(_PLACEHOLDER.sub("", entry[0])))
        return [(pattern, text) for _, pattern, text in found]

    def message(self, text: str, *, _depth: int = 0) -> str | None:
        """The translation of a finished sentence, or None when the catalogue has none."""
        exact = self.messages.get(text)
        if exact is not None:
            return exact
        if _depth > _MAX_NESTING:
            return None
        for pattern, translated in self._templates:
            match = pattern.fullmatch(text)
            if match is not None:
                # A part that is itself text of the catalogue ("…: this interaction has expired.", a bound's
                # name, a failure's reason) is carried over translated too.
                parts = {
                    name: self.message(part, _depth=_depth + 1) or part
                    for name, part in match.groupdict().items()
                }
                return translated.format(**parts)
        return self._listed(text, _depth)

    def _listed(self, text: str, depth: int) -> str | None:
        """Reasons joined with LIST_AND ("the channel no longer exists and your DMs are closed to me"),
        each of them text of the catalogue; None when any is not, so a member's own words are never split."""
        pieces = text.split(LIST_AND)
        joiner = self.messages.get(LIST_AND)
        if len(pieces) < 2 or joiner is None:
            return None
        translated = [self.message(piece, _depth=depth + 1) for piece in pieces]
        if any(piece is None for piece in translated):
            return None
        return joiner.join(piece for piece in translated if piece is not None)


@functools.cache
def catalogue(locale: str) -> Catalogue | None:
    """The catalogue of a locale ("zh-CN"), or None for English and locales without one."""
    if locale not in CATALOGUES:
        return None
    raw = resources.files("i2p2i_bot").joinpath(f"data/locales/{locale}.json").read_text(encoding="utf-8")
    data = json.loads(raw)
    return Catalogue(commands=dict(data["commands"]), messages=dict(data["messages"]))


def translate(text: str, locale: str | None) -> str:
    """`text` (an English sentence) in `locale`'s language where the catalogue has it, else as it is."""
    found = catalogue(locale) if locale else None
    if found is None:
        return text
    return found.message(text) or text


def tr(locale: str | None, key: str, /, **params: object) -> str:
    """The catalogue's text for `key` in `locale` (English where it has none), `params` filled in."""
    found = catalogue(locale) if locale else None
    text = key
    if found is not None:
        # A command string (a mode's description) may also label a control: one entry serves both.
        text = found.messages.get(key) or found.commands.get(key) or key
    return text.format(**params) if params else text


def N_(key: str) -> str:
    """Mark `key` as a catalogue key that a later `tr` translates; it stays as it is."""
    return key


# Joins reasons a member reads in one sentence; translate() joins them the catalogue's way.
LIST_AND = N_(" and ")


def placeholders(template: str) -> set[str]:
    return set(_PLACEHOLDER.findall(template))
