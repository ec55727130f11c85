"""Guides as members write them, and as plan() checks them: names, weights, a source, the batch key."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from i2p2i_bot.config import Settings
from i2p2i_bot.guides import (
    GUIDE_KINDS,
    Guide,
    GuideError,
    format_guides,
    guides_from_json,
    guides_json,
    not_offered,
    parse_guides,
)
from i2p2i_bot.request import GenerationError, GenerationRequest, plan

SOURCE = hashlib.sha256(b"source").hexdigest()
OTHER = hashlib.sha256(b"other").hexdigest()
BOTH = ("layout", "edges")


def test_the_text_form_takes_defaults_and_comes_out_in_one_order() -> None:
    """`edges:0.9,layout` is edges at 0.9 and layout at its default; order and spaces do not matter."""
    assert parse_guides("edges:0.9,layout") == (Guide("layout", 0.6), Guide("edges", 0.9))
    assert parse_guides(" Layout : 0.3 , edges ") == (Guide("layout", 0.3), Guide("edges", 0.8))
    assert parse_guides("edges:0") == (Guide("edges", 0.0),)
    assert parse_guides("depth:1.5,layout:0.4,edges") == (
        Guide("layout", 0.4),
        Guide("edges", 0.8),
        Guide("depth", 1.5),
    )
    guides = parse_guides("edges:1.5,layout:1")
    assert format_guides(guides) == "layout:1,edges:1.5"
    assert parse_guides(format_guides(guides)) == guides
    assert guides_from_json(guides_json(guides)) == guides
    defaults = {k.name: k.default_weight for k in GUIDE_KINDS.values()}
    assert defaults == {"layout": 0.6, "edges": 0.8, "depth": 0.8, "look": 0.6}


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        ("pose", "There is no guide called 'pose'; the guides are layout, edges, depth, look."),
        ("layout:0", "The weight of layout must be in (0, 1] (got 0)."),
        ("layout:1.2", "The weight of layout must be in (0, 1] (got 1.2)."),
        ("edges:-0.1", "The weight of edges must be in [0, 2] (got -0.1)."),
        ("edges:2.5", "The weight of edges must be in [0, 2] (got 2.5)."),
        ("edges:nan", "The weight of edges must be in [0, 2] (got nan)."),
        ("edges:lots", "The weight of edges must be a number in [0, 2] (got 'lots')."),
        ("depth:2.1", "The weight of depth must be in [0, 2] (got 2.1)."),
        ("depth,edges,depth:0.5", "The depth guide is named twice; give each guide once."),
        ("edges,layout,edges:1", "The edges guide is named twice; give each guide once."),
        (" , ", "Name at least one guide to keep: layout, edges, depth, look."),
    ],
)
def test_bad_guides_are_one_sentence(text: str, sentence: str) -> None:
    with pytest.raises(GuideError) as info:
        parse_guides(text)
    assert str(info.value) == sentence


def test_plan_checks_the_guides_against_what_is_offered_and_needs_a_source(base_settings: Settings) -> None:
    """Guides need a source and must be on offer; the plan keeps them, in order, and their source."""
    settings = base_settings.generate
    request = GenerationRequest("a fox", keep=(Guide("edges", 1.0), Guide("layout", 0.5)), seed=1)
    with pytest.raises(GenerationError) as info:
        plan(request, settings, "m", BOTH)
    assert str(info.value) == "Keeping layout and edges needs a source image; give one, or keep nothing."
    sourced = dataclasses.replace(request, guide_source=SOURCE)
    with pytest.raises(GenerationError, match=r"does not offer the edges guide \(available: layout\)"):
        plan(sourced, settings, "m", ("layout",))
    with pytest.raises(GenerationError, match=r"does not offer the edges guide \(available: none\)"):
        plan(sourced, settings, "m")
    planned = plan(sourced, settings, "m", BOTH)
    assert planned.planned and planned.keep == (Guide("layout", 0.5), Guide("edges", 1.0))
    assert planned.guide_source == SOURCE and plan(planned, settings, "m", BOTH) == planned
    # A source without guides changes nothing: it is dropped, so the request batches with plain ones.
    unguided = plan(GenerationRequest("a fox", guide_source=SOURCE, seed=1), settings, "m", BOTH)
    assert unguided.guide_source is None and unguided.planned
    assert unguided.params == plan(GenerationRequest("a fox", seed=1), settings, "m").params


def test_a_layout_weight_that_leaves_no_step_is_refused(base_settings: Settings) -> None:
    """Image-to-image runs int(steps × strength) steps: zero of them would return the source itself."""
    request = GenerationRequest("a fox", keep=(Guide("layout", 0.2),), guide_source=SOURCE, steps=4)
    with pytest.raises(GenerationError) as info:
        plan(request, base_settings.generate, "m", BOTH)
    assert str(info.value) == (
        "With 4 steps, layout:0.2 leaves no step to take; raise the steps or the layout weight."
    )
    assert plan(dataclasses.replace(request, steps=5), base_settings.generate, "m", BOTH).steps == 5


def test_the_batch_key_holds_the_guides_and_each_image_its_own_source(base_settings: Settings) -> None:
    """Requests share a batch only with the same guides and weights; their images keep their own source."""
    settings = base_settings.generate

    def planned(keep: str, source: str) -> GenerationRequest:
        request = GenerationRequest("a fox", keep=parse_guides(keep), guide_source=source, count=2)
        return plan(request, settings, "m", BOTH)

    a, b = planned("edges:0.9,layout", SOURCE), planned("layout,edges:0.9", OTHER)
    assert a.params == b.params and hash(a.params) == hash(b.params)
    assert planned("edges:0.8,layout", SOURCE).params != a.params
    assert planned("edges:0.9", SOURCE).params != a.params
    assert plan(GenerationRequest("a fox"), settings, "m").params != a.params
    assert [s.guide_source for s in a.specs()] == [SOURCE, SOURCE]
    assert [s.guide_source for s in b.specs()] == [OTHER, OTHER]


def test_a_guide_not_on_offer_says_why() -> None:
    """Not enabled, or enabled without its weights on the machine: one sentence each, naming the cause."""
    assert not_offered("edges", ["layout", "edges"]) == (
        "Edges needs the ControlNet weights, which this bot has not downloaded."
    )
    assert not_offered("edges", ["layout"]) == (
        "This bot does not offer edges (keeping outlines and pose): its operator has not enabled it."
    )
    assert not_offered("depth", ["depth"]) == (
        "Depth needs a depth ControlNet and a depth estimator, which this bot has not downloaded."
    )
    assert not_offered("depth", ["layout", "edges"]) == (
        "This bot does not offer depth (keeping 3-D arrangement): its operator has not enabled it."
    )
    assert not_offered("layout", []) == (
        "This bot does not offer layout (keeping composition and colours): its operator has not enabled it."
    )
