"""A1111's emphasis syntax: which words of a prompt weigh more or less, read into weighted fragments.

- `(words)` weighs 1.1 times, `((words))` 1.21, and so on; `[words]` weighs 1/1.1;
- `(words:1.3)` weighs 1.3 (times the brackets around it);
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the characters themselves;
- a bracket left open weighs the rest of the prompt, and a closing one without its opening is text,
  as in A1111.

A1111's prompt editing (`[a:b:step]`), `AND` and `BREAK` are not read: they stay text. Nothing here
imports torch: requests are checked with it before the queue.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMPHASIS = 1.1
# The weights a prompt may give: below 0 and far above 2 the text encoder's output stops meaning anything.
MIN_WEIGHT, MAX_WEIGHT = 0.0, 3.0
# `:1.3)` closing a round bracket: the weight of what the bracket holds.
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)")
_ESCAPED = frozenset("()[]\\")
# Products of 1.1 and 1/1.1 are rounded, so that `[(word)]` weighs exactly 1 again.
_WEIGHT_DIGITS = 4


class PromptSyntaxError(Exception):
    """A weight a member wrote that cannot be used; the message is one sentence for them."""


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text and the weight its words are read with (1.0: as written)."""

    text: str
    weight: float = 1.0


def parse(prompt: str) -> tuple[Fragment, ...]:
    """The prompt's text in runs of equal weight, brackets and escapes taken out."""
    pieces: list[list[str | float]] = []
    buffer: list[str] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def flush() -> None:
        if buffer:
            pieces.append(["".join(buffer), 1.0])
            buffer.clear()

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] = float(piece[1]) * factor

    i = 0
    while i < len(prompt):
        char = prompt[i]
        if char == "\\" and i + 1 < len(prompt) and prompt[i + 1] in _ESCAPED:
            buffer.append(prompt[i + 1])
            i += 2
            continue
        closing = _WEIGHT_CLOSE.match(prompt, i) if char == ":" and round_open else None
        if closing is not None:
            flush()
            weigh(round_open.pop(), float(closing.group(1)))
            i = closing.end()
            continue
        if char in "([":
            flush()
            (round_open if char == "(" else square_open).append(len(pieces))
        elif char == ")" and round_open:
            flush()
            weigh(round_open.pop(), EMPHASIS)
        elif char == "]" and square_open:
            flush()
            weigh(square_open.pop(), 1 / EMPHASIS)
        else:
            buffer.append(char)
        i += 1
    flush()
    for start in round_open:
        weigh(start, EMPHASIS)
    for start in square_open:
        weigh(start, 1 / EMPHASIS)
    fragments: list[Fragment] = []
    for text, raw in pieces:
        text, weight = str(text), round(float(raw), _WEIGHT_DIGITS)
        if fragments and fragments[-1].weight == weight:
            fragments[-1] = Fragment(fragments[-1].text + text, weight)
        else:
            fragments.append(Fragment(text, weight))
    return tuple(fragments)


def plain_text(fragments: tuple[Fragment, ...]) -> str:
    """The words alone, as the text encoder reads them."""
    return "".join(f.text for f in fragments)


def is_weighted(fragments: tuple[Fragment, ...]) -> bool:
    """Whether any words weigh other than 1: `(word:1.0)` does not."""
    return any(f.weight != 1.0 for f in fragments if f.text.strip())


def check_weights(prompt: str, label: str = "prompt") -> None:
    """Refuse, with one sentence, a weight the text encoder's output cannot be scaled by."""
    for fragment in parse(prompt):
        if fragment.text.strip() and not MIN_WEIGHT <= fragment.weight <= MAX_WEIGHT:
            raise PromptSyntaxError(
                f"In the {label}, “{fragment.text.strip()[:40]}” weighs {fragment.weight:g}; "
                f"weights go from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, as in (word:1.3)."
            )
