"""What happens to images Stable Diffusion's safety checker flags: withheld, posted as spoilers, or shown.

The rule: filtered everywhere by default. A server may allow flagged images (as spoilers, or plainly) only in
its age-restricted channels, never in direct messages. A job's policy is fixed when it is submitted, from
the server's `nsfw` setting and the channel it was asked in; it decides whether the generator keeps a flagged
image's pixels at all (a withheld image is blacked out before it is stored). Where the images are shown
later, the stricter of the job's policy and that place's own applies. Torch-free and discord-free.
"""

from __future__ import annotations

import enum
from typing import Literal

# A server's /settings value: what its age-restricted channels may get.
NsfwSetting = Literal["filtered", "spoiler", "unfiltered"]
NSFW_SETTINGS: tuple[NsfwSetting, ...] = ("filtered", "spoiler", "unfiltered")


class FlaggedPolicy(enum.StrEnum):
    """What one job (or one place showing it) does with flagged images, from strictest to least."""

    WITHHOLD = "withhold"
    SPOILER = "spoiler"
    SHOW = "show"

    @property
    def keeps_pixels(self) -> bool:
        """Whether a flagged image keeps its pixels rather than being blacked out."""
        return self is not FlaggedPolicy.WITHHOLD

    def stricter(self, other: FlaggedPolicy) -> FlaggedPolicy:
        order = list(FlaggedPolicy)
        return order[min(order.index(self), order.index(other))]


def policy_for(setting: str, *, in_server: bool, age_restricted: bool) -> FlaggedPolicy:
    """The policy for a place: a server's setting (NSFW_SETTINGS; anything else counts as filtered), whether
    the place is in a server at all, and whether its channel is age-restricted."""
    if not in_server or not age_restricted:
        return FlaggedPolicy.WITHHOLD
    if setting == "spoiler":
        return FlaggedPolicy.SPOILER
    if setting == "unfiltered":
        return FlaggedPolicy.SHOW
    return FlaggedPolicy.WITHHOLD
