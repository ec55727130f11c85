"""Banned terms: words that may never appear in a prompt, whether interrogated or typed."""

from __future__ import annotations

import re
from collections.abc import Iterable
from importlib import resources

from i2p2i_bot.config import InterrogateSettings


def default_banned_terms() -> list[str]:
    """The packaged list (data/banned_terms.txt), without comments and blank lines."""
    text = resources.files("i2p2i_bot").joinpath("data/banned_terms.txt").read_text(encoding="utf-8")
    return [line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class BannedTerms:
    """Matches banned words and phrases as whole words, ignoring case."""

    def __init__(self, terms: Iterable[str]) -> None:
        self.terms = tuple(
            sorted({t.strip().lower() for t in terms if t.strip()}, key=lambda t: (-len(t), t))
        )
        if self.terms:
            alternatives = "|".join(re.escape(t) for t in self.terms)
            self._pattern: re.Pattern[str] | None = re.compile(
                rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE
            )
        else:
            self._pattern = None

    @classmethod
    def from_settings(cls, settings: InterrogateSettings) -> BannedTerms:
        terms = list(settings.banned_terms)
        if settings.use_default_banned_terms:
            terms += default_banned_terms()
        return cls(terms)

    def find(self, text: str) -> list[str]:
        """The distinct banned terms in text, in order of appearance (empty when the text is clean)."""
        if self._pattern is None:
            return []
        found: list[str] = []
        for match in self._pattern.finditer(text):
            term = match.group(0).lower()
            if term not in found:
                found.append(term)
        return found

    def allows(self, text: str) -> bool:
        return self._pattern is None or self._pattern.search(text) is None
