"""Banned terms: words that may never appear in a prompt, whether interrogated or typed."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from importlib import resources

from i2p2i_bot.config import InterrogateSettings
from i2p2i_bot.lookalikes import fold, skeleton, skeleton_with_origins


def default_banned_terms() -> list[str]:
    """The packaged list (data/banned_terms.txt), without comments and blank lines."""
    text = resources.files("i2p2i_bot").joinpath("data/banned_terms.txt").read_text(encoding="utf-8")
    return [line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#")]


class BannedTerms:
    """Matches banned words and phrases as whole words, however they are written.

    Text and terms are both folded (lookalikes.fold: fullwidth letters, zero-width characters, soft
    hyphens and case make no difference), then matched again as skeletons (look-alikes read as the ASCII
    they imitate): "nudе" with a Cyrillic "е" is "nude". A skeleton match between ASCII text and an ASCII
    term does not count, since the skeleton also reads some ASCII as other ASCII and "pom" is not "porn"
    ("m" reads as "rn"). Accents are letters of their own: "göre" is not "gore".
    """

    def __init__(self, terms: Iterable[str]) -> None:
        self.terms = tuple(
            sorted({t.strip().lower() for t in terms if fold(t).strip()}, key=lambda t: (-len(t), t))
        )
        self._folded = {fold(t).strip(): t for t in reversed(self.terms)}
        self._skeletons = {skeleton(folded): t for folded, t in self._folded.items()}
        self._ascii_terms = all(folded.isascii() for folded in self._folded)
        self._pattern = _whole_words(self._folded)
        self._skeleton_pattern = _whole_words(self._skeletons)

    @classmethod
    def from_settings(cls, settings: InterrogateSettings) -> BannedTerms:
        terms = list(settings.banned_terms)
        if settings.use_default_banned_terms:
            terms += default_banned_terms()
        return cls(terms)

    def find(self, text: str) -> list[str]:
        """The distinct banned terms in text, in order of appearance (empty when the text is clean)."""
        if self._pattern is None or self._skeleton_pattern is None:
            return []
        folded = fold(text)
        hits = [(m.start(), self._folded[m.group(0)]) for m in self._pattern.finditer(folded)]
        if not (folded.isascii() and self._ascii_terms) and self._skeleton_pattern.search(skeleton(folded)):
            read, origin = skeleton_with_origins(folded)
            for m in self._skeleton_pattern.finditer(read):
                start, end = origin[m.start()], origin[m.end() - 1] + 1
                term = self._skeletons[m.group(0)]
                if not (folded[start:end].isascii() and fold(term).isascii()):
                    hits.append((start, term))
        return list(dict.fromkeys(term for _, term in sorted(hits)))

    def allows(self, text: str) -> bool:
        return not self.find(text)


def _whole_words(terms: Mapping[str, str]) -> re.Pattern[str] | None:
    """One pattern matching any of the (folded) terms as whole words, longest first."""
    if not terms:
        return None
    alternatives = "|".join(re.escape(t) for t in sorted(terms, key=lambda t: (-len(t), t)))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")
