"""Editing a prompt with a few words rather than retyping it: the command line's --append and --remove,
and the reading of a member's reply to a card or a result (discord.reply_edits)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# A reply line that sets the negative prompt: "--neg blurry, lowres" (empty or "none" clears it).
_NEGATIVE = re.compile(r"--neg(?:ative)?(?:\s+(?P<text>.*))?", re.IGNORECASE | re.DOTALL)


def edit_prompt(prompt: str, *, append: str | None = None, remove: Sequence[str] = ()) -> str:
    """Apply the batch edits: drop every comma-separated part equal to a removed term, delete the term as
    a whole word elsewhere, then append text. Matching ignores case."""
    parts = [p.strip() for p in prompt.split(",")]
    for term in (t.strip() for t in remove):
        if not term:
            continue
        pattern = re.compile(rf"(?<!\w){re.escape(term)}(?!\w)", re.IGNORECASE)
        parts = [re.sub(r"\s{2,}", " ", pattern.sub("", p)).strip() for p in parts]
    parts = [p for p in parts if p]
    if append:
        parts.extend(p.strip() for p in append.split(",") if p.strip())
    return ", ".join(parts)


class ReplyError(ValueError):
    """A reply that cannot be read as an edit; the message is one sentence for the member."""


@dataclass(frozen=True)
class ReplyEdit:
    """A prompt after a member's reply; `negative` None: the reply did not touch the negative prompt."""

    prompt: str
    negative: str | None
    changed: bool


def read_reply(text: str, prompt: str) -> ReplyEdit:
    """Read a reply line by line, in order: a plain line replaces the prompt (plain lines in a row are one
    prompt), "+ words" appends them, "- words" removes them (comma-separated terms, as --remove), and
    "--neg text" sets the negative prompt ("--neg" alone or "--neg none" clears it)."""
    negative: str | None = None
    replacing: list[str] | None = None
    changed = False

    def flush() -> None:
        nonlocal prompt, replacing
        if replacing:
            prompt = " ".join(replacing)
        replacing = None

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            flush()
            continue
        negative_line = _NEGATIVE.fullmatch(line)
        if negative_line is not None:
            flush()
            value = (negative_line["text"] or "").strip()
            negative = "" if value.lower() in ("", "none") else value
            changed = True
        elif line.startswith("+"):
            flush()
            prompt = edit_prompt(prompt, append=line[1:])
            changed = True
        elif line.startswith("--"):
            option = line.split()[0]
            raise ReplyError(
                f"I do not know the option {option[:20]}; a reply edits with a new prompt, "
                "+ words, - words or --neg text."
            )
        elif line.startswith("-"):
            flush()
            prompt = edit_prompt(prompt, remove=line[1:].split(","))
            changed = True
        else:
            replacing = [*(replacing or []), line]
            changed = True
    flush()
    return ReplyEdit(prompt, negative, changed)
