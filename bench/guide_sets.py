"""The guide sets a benchmark compares (`--keep none,layout,edges+depth`), and a generator that offers them.

Each set is written as the command line's `--keep` writes one, with `+` between guides instead of `,`
(the comma separates the sets): `edges:0.9+look`. `none` is the prompt alone, the baseline every other set
is compared with; it is always measured, first. The generator loads the guides' models from the bench
models (bench/models.py) through the production loader, and holds one source photograph (scikit-image's
astronaut) under a hash that warms each set's caches, and under one fresh hash per set on demand: a
source that set has not seen, whose edge map, depth map and image embedding are made anew.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from models import BenchModels

from i2p2i_bot.config import GuideSettings
from i2p2i_bot.guided import GuideModels, load_guide_models
from i2p2i_bot.guides import GUIDE_NAMES, Guide, GuideError, GuideName, parse_guides
from i2p2i_bot.models import ModelSources
from i2p2i_bot.request import GenerationParams, GenerationRequest, ImageSpec

NONE = "none"
# The hash the source photograph is held under for the runs that may reuse what earlier ones made of it.
WARM_SOURCE = hashlib.sha256(b"bench source: warm").hexdigest()


@dataclass(frozen=True)
class GuideSet:
    """One set of guides to measure: as written on the command line, and parsed."""

    label: str
    guides: tuple[Guide, ...]

    @property
    def key(self) -> str:
        """The label as a headline key: `edges+depth` → `edges_depth`."""
        return re.sub(r"[^a-z0-9]+", "_", self.label.lower()).strip("_")


def parse_guide_sets(text: str) -> list[GuideSet]:
    """`none,layout,edges+depth` as guide sets, `none` first (added when not named); SystemExit otherwise."""
    sets = [GuideSet(NONE, ())]
    for part in (p.strip() for p in text.split(",")):
        if not part or part.lower() == NONE:
            continue
        try:
            guides = parse_guides(part.replace("+", ","))
        except GuideError as exc:
            raise SystemExit(f"--keep {part!r}: {exc}") from None
        if any(s.guides == guides for s in sets):
            continue
        sets.append(GuideSet(part, guides))
    return sets


def guides_needed(sets: Sequence[GuideSet]) -> list[GuideName]:
    """Every guide any of the sets keeps, in canonical order."""
    named = {guide.name for s in sets for guide in s.guides}
    return [name for name in GUIDE_NAMES if name in named]


def components_for(names: Sequence[GuideName]) -> list[str]:
    """The bench model components (bench/models.py's GUIDE_COMPONENTS) these guides load."""
    wanted = []
    if "edges" in names or "depth" in names:
        wanted.append("controlnet")
    if "depth" in names:
        wanted.append("depth_estimator")
    if "look" in names:
        wanted.append("ip_adapter")
    return wanted


def load_guides(
    models: BenchModels, names: Sequence[GuideName], device: torch.device, dtype: torch.dtype
) -> GuideModels:
    """The named guides' models, loaded as the engine loads them; SystemExit when one is not offered."""
    sources = ModelSources(
        str(models.generator),
        str(models.clip),
        str(models.caption),
        edges=str(models.edges) if "edges" in names else None,
        depth=str(models.depth) if "depth" in names else None,
        depth_estimator=str(models.depth_estimator) if "depth" in names else None,
        look=str(models.look) if "look" in names else None,
        look_weights=models.look_weights if "look" in names else None,
    )
    loaded = load_guide_models(GuideSettings(enabled=list(names)), sources, device, dtype)
    missing = [name for name in names if name not in loaded.offered]
    if missing:
        raise SystemExit(f"the {', '.join(missing)} guide models did not load (see the log above)")
    return loaded


def hold_source(generator: Any, source: str = WARM_SOURCE) -> str:
    """The source photograph held in the generator's source images under `source`; returns the hash."""
    import skimage.data
    from PIL import Image

    generator.source_images.hold(source, Image.fromarray(skimage.data.astronaut()))
    return source


def hold_fresh_source(generator: Any, guide_set: GuideSet) -> str:
    """The source photograph under a hash of this set's own, so its first batch makes everything anew."""
    return hold_source(generator, hashlib.sha256(f"bench source: {guide_set.label}".encode()).hexdigest())


def guided_batch(
    generator: Any,
    guide_set: GuideSet,
    prompts: Sequence[str],
    first_seed: int,
    batch: int,
    source: str = WARM_SOURCE,
) -> tuple[GenerationParams, list[ImageSpec]]:
    """A batch of `batch` images keeping these guides of `source`, planned as the bot plans a request."""
    planned = generator.plan(
        GenerationRequest(
            prompts[0],
            count=batch,
            seed=first_seed,
            keep=guide_set.guides,
            guide_source=source if guide_set.guides else None,
        )
    )
    specs = [
        ImageSpec(prompts[i % len(prompts)], "", first_seed + i, None, planned.spec(i).guide_source)
        for i in range(batch)
    ]
    return planned.params, specs
