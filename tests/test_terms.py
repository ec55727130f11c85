"""Banned terms match whole words and phrases, ignoring case and however they are disguised."""

from __future__ import annotations

import pytest

from i2p2i_bot.config import ConfigError, InterrogateSettings
from i2p2i_bot.lookalikes import fold, visible
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


@pytest.mark.parametrize(
    "text",
    [
        "a ｎｕｄｅ statue",  # fullwidth letters
        "a 𝐧𝐮𝐝𝐞 statue",  # mathematical bold letters
        "a nu\u200bde statue",  # zero-width space
        "a n\u200du\u200cde statue",  # zero-width joiner and non-joiner
        "a nu\u00adde statue",  # soft hyphen
        "a nu\u2060de\ufeff statue",  # word joiner, byte order mark
        "a nu\ufe0fde statue",  # variation selector
        "a nud\u0435 statue",  # Cyrillic е
        "a NUD\u0415 statue",  # Cyrillic Е, upper case
        "a nud\u0435\u200b statue",  # Cyrillic е and a zero-width space
    ],
)
def test_disguised_terms_are_found(text: str) -> None:
    """Fullwidth and styled letters, characters that draw nothing and Cyrillic look-alikes all read as the
    banned word they spell, which is named as configured."""
    banned = BannedTerms(["Nude", "gore"])
    assert banned.find(text) == ["nude"]
    assert not banned.allows(text)


def test_lookalikes_in_other_scripts_and_phrases() -> None:
    """Greek and Cyrillic look-alikes inside a phrase, and a term configured in another script, match."""
    banned = BannedTerms(["big cat", "\u0440\u043e\u0440"])  # "рор" in Cyrillic
    assert banned.find("a b\u0456g \u03bfat? no: a b\u0456g c\u03b1t") == ["big cat"]
    assert banned.find("pop art") == ["\u0440\u043e\u0440"]  # Latin letters imitating the Cyrillic term


@pytest.mark.parametrize(
    "text",
    [
        "a Nüde statue",  # an accent is a letter of its own, not a disguise
        "göre ve café crème",  # accented words that only lose their accents to become a banned one
        "pom pom hat",  # plain ASCII is not read through look-alikes ("m" reads as "rn")
        "g0re and p0rn in leetspeak",  # ASCII stand-ins are not look-alikes of another script
        "\u043e\u0431\u043d\u0430\u0436\u0451\u043d\u043d\u0430\u044f \u043d\u0430\u0442\u0443\u0440\u0430",
        "denuded hills, a nudibranch",
    ],
)
def test_ordinary_words_pass(text: str) -> None:
    """Accented words, other scripts and plain ASCII that only the skeleton would bend stay allowed."""
    assert BannedTerms(["nude", "gore", "porn"]).find(text) == []


def test_folding_keeps_what_draws_and_drops_what_does_not() -> None:
    """A prompt of only invisible characters folds to nothing; a member's text keeps all it shows."""
    assert fold("\u200b\u200d\u00ad\u2060\ufeff") == ""
    assert visible("\u200b \u00ad") == " "
    assert visible("a re\u00add kite\u200b") == "a red kite"
    assert visible("a naïve ｋｉｔｅ, Ελλάδα") == "a naïve ｋｉｔｅ, Ελλάδα"


def test_a_term_of_invisible_characters_is_refused_by_the_settings() -> None:
    """A configured term that folds to nothing would match nothing: the settings say it is empty."""
    with pytest.raises(ConfigError, match="must not contain empty strings"):
        InterrogateSettings(banned_terms=["\u200b\u200b"]).validate()
