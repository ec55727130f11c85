"""Text as a reader sees it, for matching banned terms however they are disguised.

Three ways to write a word that a plain match misses: characters that show nothing (a zero-width space or
a soft hyphen inside it), compatibility forms (fullwidth or mathematical letters, ligatures), and letters
of another script that look the same (Cyrillic "е" for Latin "e"). `fold` undoes the first two and case;
`skeleton` reads look-alikes as the ASCII they imitate, after Unicode's confusables data (UTS #39).
"""

from __future__ import annotations

import functools
import unicodedata
from importlib import resources

# Default-ignorable characters (Unicode's DerivedCoreProperties) that are not in category Cf: they draw
# nothing either (the Hangul fillers, variation selectors, the combining grapheme joiner, Khmer inherent
# vowels, Mongolian free variation selectors).
_IGNORABLE_RANGES = (
    (0x034F, 0x034F),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)


def invisible(char: str) -> bool:
    """Whether a character draws nothing: a format character (category Cf: zero-width space and joiners,
    soft hyphen, word joiner, byte order mark, direction marks...) or another default-ignorable one."""
    if unicodedata.category(char) == "Cf":
        return True
    point = ord(char)
    return any(low <= point <= high for low, high in _IGNORABLE_RANGES)


def visible(text: str) -> str:
    """The text without the characters that draw nothing (what is kept of a member's prompt)."""
    if text.isascii():
        return text
    return "".join(char for char in text if not invisible(char))


def fold(text: str) -> str:
    """The text for matching: compatibility forms folded (NFKC), invisible characters removed, case
    folded. Blank exactly when `visible(text)` is (NFKC and case folding never empty a text)."""
    if text.isascii():
        return text.lower()
    folded = visible(unicodedata.normalize("NFKC", text)).casefold()
    return unicodedata.normalize("NFKC", folded)


@functools.cache
def _confusables() -> dict[str, str]:
    """Each look-alike character and the ASCII it reads as (data/confusables.txt says where from)."""
    text = resources.files("i2p2i_bot").joinpath("data/confusables.txt").read_text(encoding="utf-8")
    table: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        source, prototype = line.split(";")
        table[chr(int(source, 16))] = "".join(chr(int(point, 16)) for point in prototype.split())
    return table


def skeleton(folded: str) -> str:
    """A folded text with each look-alike read as the ASCII it imitates: UTS #39's skeleton, on folded
    text."""
    if folded.isascii():
        return folded.translate(_ascii_table())
    return skeleton_with_origins(folded)[0]


def skeleton_with_origins(folded: str) -> tuple[str, list[int]]:
    """The skeleton, and for each of its characters the index of the folded character it came from."""
    table = _confusables()
    out: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(folded):
        for part in char if char.isascii() else unicodedata.normalize("NFD", char):
            read = table.get(part, part)
            out.append(read)
            origin.extend([index] * len(read))
    return "".join(out), origin


@functools.cache
def _ascii_table() -> dict[int, str]:
    return {ord(source): read for source, read in _confusables().items() if source.isascii()}
