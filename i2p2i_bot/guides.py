"""Guides: what a new image keeps of its source image besides what the prompt says, each with a weight.

`layout` keeps composition and colours (image-to-image from the source; its weight is the strength, how
much may change); `edges` keeps outlines and pose (ControlNet on the source's Canny edges) and `depth` its
3-D arrangement (ControlNet on a depth map estimated from the source), each weighted by the ControlNet's
conditioning scale; `look` keeps the subject's look and style (an IP-Adapter fed the source; its weight
the adapter's scale). A member writes a set of guides as
`NAME[:WEIGHT][,NAME[:WEIGHT]...]`, e.g. `edges:0.9,layout`; a name without a weight takes the kind's
default. Layout runs each family's own image-to-image pipeline, so every preset may keep it; the
ControlNets and the IP-Adapter are SD 1.x weights, so only SD 1.x presets may keep edges, depth and look.
Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from i2p2i_bot.i18n import N_, tr

# Every guide this version knows; the order is the one sets are written and stored in.
GuideName = Literal["layout", "edges", "depth", "look"]
GUIDE_NAMES: tuple[GuideName, ...] = get_args(GuideName)
# The families the ControlNets' and the IP-Adapter's weights fit, as [guides] loads them.
SD1_ONLY = frozenset({"sd1"})


class GuideError(Exception):
    """A set of guides a member can fix (unknown name, weight out of range, twice); one sentence for them."""


@dataclass(frozen=True)
class GuideKind:
    """One kind of guide: what it keeps, its default weight, and the weights it takes."""

    name: GuideName
    keeps: str
    default_weight: float
    min_weight: float
    max_weight: float
    # Whether min_weight itself is allowed: a layout of strength 0 would change nothing at all.
    min_inclusive: bool
    # The weights the guide needs beyond the generator's, as a member reads it; None: nothing more.
    needs: str | None = None
    # The model families (presets.Family) those weights fit; None: every family (nothing more needed).
    families: frozenset[str] | None = None

    def fits(self, family: str) -> bool:
        """Whether a preset of this model family may keep this guide."""
        return self.families is None or family in self.families

    def accepts(self, weight: float) -> bool:
        low_ok = weight >= self.min_weight if self.min_inclusive else weight > self.min_weight
        return low_ok and weight <= self.max_weight

    @property
    def weight_range(self) -> str:
        opening = "[" if self.min_inclusive else "("
        return f"{opening}{self.min_weight:g}, {self.max_weight:g}]"


GUIDE_KINDS: dict[GuideName, GuideKind] = {
    "layout": GuideKind("layout", N_("composition and colours"), 0.6, 0.0, 1.0, min_inclusive=False),
    "edges": GuideKind(
        "edges",
        N_("outlines and pose"),
        0.8,
        0.0,
        2.0,
        min_inclusive=True,
        needs=N_("the ControlNet weights"),
        families=SD1_ONLY,
    ),
    "depth": GuideKind(
        "depth",
        N_("3-D arrangement"),
        0.8,
        0.0,
        2.0,
        min_inclusive=True,
        needs=N_("a depth ControlNet and a depth estimator"),
        families=SD1_ONLY,
    ),
    "look": GuideKind(
        "look",
        N_("subject look and style"),
        0.6,
        0.0,
        1.0,
        min_inclusive=True,
        needs=N_("the IP-Adapter weights and its image encoder"),
        families=SD1_ONLY,
    ),
}


@dataclass(frozen=True)
class Guide:
    """One guide of a request and its weight (see GUIDE_KINDS for what the weight means)."""

    name: GuideName
    weight: float

    @property
    def kind(self) -> GuideKind:
        return GUIDE_KINDS[self.name]

    def __str__(self) -> str:
        return f"{self.name}:{self.weight:g}"


def parse_guides(text: str) -> tuple[Guide, ...]:
    """Guides from their text form, `NAME[:WEIGHT][,NAME[:WEIGHT]...]`, checked and in canonical order."""
    guides = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, weight_text = (s.strip() for s in part.partition(":"))
        kind = _kind(name.lower())
        if not sep:
            weight = kind.default_weight
        else:
            try:
                weight = float(weight_text)
            except ValueError:
                raise GuideError(
                    f"The weight of {kind.name} must be a number in {kind.weight_range} "
                    f"(got {weight_text!r})."
                ) from None
        guides.append(Guide(kind.name, weight))
    if not guides:
        raise GuideError(f"Name at least one guide to keep: {', '.join(GUIDE_NAMES)}.")
    return check_guides(guides)


def check_guides(guides: Iterable[Guide], offered: Collection[str] | None = None) -> tuple[Guide, ...]:
    """The guides in canonical order, once each, each weight in its range and (given `offered`) on offer."""
    seen: dict[str, Guide] = {}
    for guide in guides:
        kind = _kind(guide.name)
        if guide.name in seen:
            raise GuideError(f"The {guide.name} guide is named twice; give each guide once.")
        weight = float(guide.weight)
        if weight != weight or not kind.accepts(weight):  # NaN too
            raise GuideError(
                f"The weight of {kind.name} must be in {kind.weight_range} (got {guide.weight:g})."
            )
        if offered is not None and guide.name not in offered:
            available = ", ".join(name for name in GUIDE_NAMES if name in offered) or "none"
            raise GuideError(f"This bot does not offer the {guide.name} guide (available: {available}).")
        seen[guide.name] = Guide(kind.name, weight)
    return tuple(seen[name] for name in GUIDE_NAMES if name in seen)


def not_offered(name: GuideName, enabled: Collection[str]) -> str:
    """Why a guide this version knows is not on offer, in one sentence for a member."""
    kind = GUIDE_KINDS[name]
    if name in enabled and kind.needs is not None:
        return tr(
            None,
            "{guide} needs {weights}, which this bot has not downloaded.",
            guide=name.capitalize(),
            weights=kind.needs,
        )
    return tr(
        None,
        "This bot does not offer {guide} (keeping {keeps}): its operator has not enabled it.",
        guide=name,
        keeps=kind.keeps,
    )


def fitting(names: Iterable[GuideName], family: str) -> tuple[GuideName, ...]:
    """Those of `names` a preset of this model family may keep, in their order."""
    return tuple(name for name in names if GUIDE_KINDS[name].fits(family))


def format_guides(guides: Iterable[Guide]) -> str:
    """The text form parse_guides reads back: `edges:0.9,layout:0.6`."""
    return ",".join(str(g) for g in guides)


def guides_json(guides: Iterable[Guide]) -> list[dict[str, object]]:
    """Guides as JSON values: what the store and the command line's records hold."""
    return [{"name": g.name, "weight": g.weight} for g in guides]


def guides_from_json(values: Iterable[dict[str, object]]) -> tuple[Guide, ...]:
    """guides_json's values back, as they were stored (not checked against today's ranges)."""
    found = []
    for value in values:
        name, weight = value["name"], value["weight"]
        if name not in _BY_NAME or not isinstance(weight, int | float):
            raise ValueError(f"not a stored guide: {value!r}")
        found.append(Guide(_kind(str(name)).name, float(weight)))
    return tuple(found)


_BY_NAME: dict[str, GuideKind] = {kind.name: kind for kind in GUIDE_KINDS.values()}


def _kind(name: str) -> GuideKind:
    kind = _BY_NAME.get(name)
    if kind is None:
        raise GuideError(f"There is no guide called {name!r}; the guides are {', '.join(GUIDE_NAMES)}.")
    return kind
