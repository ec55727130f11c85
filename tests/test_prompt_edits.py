"""Reading a member's reply as a prompt edit."""

from __future__ import annotations

import pytest

from i2p2i_bot.prompt_edits import ReplyError, read_reply

PROMPT = "a lighthouse at dusk, oil painting, dramatic clouds"


@pytest.mark.parametrize(
    ("reply", "prompt", "negative"),
    [
        ("a red kite over the sea", "a red kite over the sea", None),
        ("+ golden hour, film grain", PROMPT + ", golden hour, film grain", None),
        ("- oil painting", "a lighthouse at dusk, dramatic clouds", None),
        ("- dramatic, dusk", "a lighthouse at, oil painting, clouds", None),
        ("--neg blurry, lowres", PROMPT, "blurry, lowres"),
        ("--neg", PROMPT, ""),
        ("--negative none", PROMPT, ""),
        ("a red kite\nover the sea\n+ at noon\n--neg fog", "a red kite over the sea, at noon", "fog"),
        ("- clouds\n+ stars", "a lighthouse at dusk, oil painting, dramatic, stars", None),
    ],
)
def test_each_kind_of_line(reply: str, prompt: str, negative: str | None) -> None:
    edit = read_reply(reply, PROMPT)
    assert (edit.prompt, edit.negative, edit.changed) == (prompt, negative, True)


def test_an_empty_reply_changes_nothing_and_an_unknown_option_is_one_sentence() -> None:
    assert read_reply("  \n ", PROMPT).changed is False
    with pytest.raises(ReplyError) as info:
        read_reply("--ar 16:9", PROMPT)
    assert str(info.value) == (
        "I do not know the option --ar; a reply edits with a new prompt, + words, - words or --neg text."
    )
