"""A1111's emphasis syntax read into weighted fragments, and the weights a request may give."""

from __future__ import annotations

import pytest

from i2p2i_bot.config import Settings
from i2p2i_bot.prompt_syntax import Fragment, is_weighted, parse, plain_text
from i2p2i_bot.request import GenerationError, GenerationRequest, plan


@pytest.mark.parametrize(
    ("prompt", "fragments"),
    [
        ("a red car", [("a red car", 1.0)]),
        ("a (red) car", [("a ", 1.0), ("red", 1.1), (" car", 1.0)]),
        ("((red))", [("red", 1.21)]),
        ("[red]", [("red", 0.9091)]),
        ("(red:1.3) car", [("red", 1.3), (" car", 1.0)]),
        ("( red : 0.5 )", [(" red ", 0.5)]),
        ("((red:1.5) car)", [("red", 1.65), (" car", 1.1)]),
        ("[(red)]", [("red", 1.0)]),
        ("a (red:1.0) car", [("a red car", 1.0)]),
        (r"a \(red\) \[car\] \\", [("a (red) [car] \\", 1.0)]),
        ("(open to the end", [("open to the end", 1.1)]),
        ("closed) without [an opening]", [("closed) without ", 1.0), ("an opening", 0.9091)]),
        ("(time: noon)", [("time: noon", 1.1)]),
        ("<lora:x:1>, 4:3", [("<lora:x:1>, 4:3", 1.0)]),
    ],
)
def test_a1111_emphasis_is_read_as_a1111_reads_it(prompt: str, fragments: list[tuple[str, float]]) -> None:
    """Brackets multiply by 1.1 (round) or 1/1.1 (square), a number after a colon sets the weight, escapes
    and unmatched closers are text, an unclosed bracket weighs the rest."""
    assert parse(prompt) == tuple(Fragment(text, weight) for text, weight in fragments)


def test_weight_one_is_the_plain_prompt() -> None:
    """(word:1.0) and [(word)] are the word as written: the same text, nothing weighted."""
    for prompt in ("a (red:1.0) car", "a [(red)] car", "a red car"):
        assert plain_text(parse(prompt)) == "a red car"
        assert not is_weighted(parse(prompt))
    assert is_weighted(parse("a (red) car"))


@pytest.mark.parametrize(
    ("prompt", "negative", "needle"),
    [
        ("a (red:-1) car", "", "In the prompt, “red” weighs -1; weights go from 0 to 3, as in (word:1.3)."),
        ("a car", "(blurry:4)", "In the negative prompt, “blurry” weighs 4;"),
    ],
)
def test_weights_out_of_range_are_one_sentence(
    base_settings: Settings, prompt: str, negative: str, needle: str
) -> None:
    """A negative weight, or one far past what the text encoder can be scaled by, is refused at plan()."""
    with pytest.raises(GenerationError) as info:
        plan(GenerationRequest(prompt, negative_prompt=negative), base_settings.generate, "m")
    assert needle in str(info.value)
    assert plan(GenerationRequest("(red:0) (car:3)"), base_settings.generate, "m").prompt == "(red:0) (car:3)"
