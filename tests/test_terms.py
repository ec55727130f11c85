"""Banned terms match whole words and phrases, ignoring case."""

from __future__ import annotations

from i2p2i_bot.config import InterrogateSettings
from i2p2i_bot.terms import BannedTerms, default_banned_terms


def test_whole_words_only() -> None:
    """A banned word inside a longer word is not a match; the word itself is, in any case."""
    banned = BannedTerms(["nude", "gore"])
    assert banned.find("a NUDE statue") == ["nude"]
    assert banned.find("denuded hills, al gore") == ["gore"]
    assert banned.allows("a nudibranch in gorgeous water")


def test_phrases_and_order() -> None:
    """Multi-word terms match as phrases; findings come once each, in order of appearance."""
    banned = BannedTerms(["big cat", "hat"])
    assert banned.find("a hat on a big cat, big cat again") == ["hat", "big cat"]
    assert banned.find("a big  catalogue") == []


def test_settings_combine_default_and_extra_terms() -> None:
    """The packaged list is used unless switched off, and extra terms add to it."""
    defaults = default_banned_terms()
    assert "nsfw" in defaults and all(not t.startswith("#") for t in defaults)
    with_defaults = BannedTerms.from_settings(InterrogateSettings(banned_terms=["clown"]))
    assert with_defaults.find("nsfw clown") == ["nsfw", "clown"]
    without = BannedTerms.from_settings(
        InterrogateSettings(use_default_banned_terms=False, banned_terms=["clown"])
    )
    assert without.find("nsfw clown") == ["clown"]
    assert BannedTerms([]).allows("anything at all")
