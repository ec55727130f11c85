"""Guided generation: the pipelines and inputs that make images keep elements of their source.

- layout: image-to-image from the source, its weight the strength (how much may change);
- edges: a ControlNet on the source's Canny edges, its weight the conditioning scale;
- both: ControlNet image-to-image.

Each pipeline is made from the resident one's components, so the UNet, VAE and text encoder exist once in
memory; only the ControlNet is added, and only when edges is enabled. Every image of a batch
brings its own source (by hash): the init and control images are made per image, scaled to cover the
image size and centre-cropped, and kept for the next batches from the same source.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, ImageOps

from i2p2i_bot.acceleration import pipeline_class
from i2p2i_bot.config import GuideSettings
from i2p2i_bot.guides import GUIDE_NAMES, Guide, GuideName
from i2p2i_bot.models import ModelSources, ModelUnavailable, controlnet_folder
from i2p2i_bot.request import GenerationParams, ImageSpec
from i2p2i_bot.source_images import SourceImages

log = logging.getLogger(__name__)

# The thresholds of ControlNet's own Canny annotator, which its canny model was trained on.
CANNY_LOW, CANNY_HIGH = 100, 200
# Prepared init and control images kept, by (what, source, width, height): a member's rerolls and the
# images of one request reuse them.
PREPARED_CACHE_SIZE = 64


@dataclass(frozen=True)
class GuideModels:
    """The guides a generator offers, and the weights beyond the pipeline's that they need."""

    layout: bool = False
    # The edges guide's ControlNetModel, on the pipeline's device and in its dtype; None: not offered.
    edges: Any | None = None
    # The model each guide's weights come from, as results record it.
    recorded: dict[str, str] = field(default_factory=dict)

    @property
    def offered(self) -> tuple[GuideName, ...]:
        on = {"layout": self.layout, "edges": self.edges is not None}
        return tuple(name for name in GUIDE_NAMES if on[name])


def load_guide_models(
    settings: GuideSettings, sources: ModelSources, device: torch.device, dtype: torch.dtype
) -> GuideModels:
    """The enabled guides' weights, from this machine only; a guide whose weights are missing is left out
    with one log line, and everything else goes on."""
    from diffusers import ControlNetModel

    edges = None
    recorded = {}
    if sources.edges is not None:
        try:
            folder = controlnet_folder(sources.edges)
            edges = ControlNetModel.from_pretrained(folder, dtype=dtype).to(device)
        except (ModelUnavailable, OSError, ValueError) as exc:
            log.warning("the edges guide is not offered: its ControlNet could not be loaded (%s)", exc)
        else:
            edges.requires_grad_(False)
            recorded["edges"] = sources.recorded_guide("edges", sources.edges)
    return GuideModels(layout="layout" in settings.enabled, edges=edges, recorded=recorded)


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """The image scaled to cover width × height and centre-cropped to it, as every guide sees its source."""
    return ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)


def canny_edges(image: Image.Image) -> Image.Image:
    """The Canny edge map of an RGB image, white on black, in three channels: ControlNet canny's input.

    OpenCV's Canny is the one ControlNet's annotator runs, with the same thresholds.
    """
    import cv2
    import numpy as np

    edges = cv2.Canny(np.asarray(image.convert("RGB")), CANNY_LOW, CANNY_HIGH)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def compiles(keep: Sequence[Guide]) -> bool:
    """Whether a batch with these guides may run the compiled UNet: ControlNet residuals are UNet inputs
    the compiled code was not made for, so edges runs eager."""
    return all(guide.name == "layout" for guide in keep)


class GuidedPipelines:
    """The guided pipelines over one resident pipeline, and each batch's inputs for them. GPU thread only."""

    def __init__(self, pipe: Any, models: GuideModels, sources: SourceImages) -> None:
        self.models = models
        self.sources = sources
        self._pipes: dict[frozenset[str], Any] = {}
        if models.layout:
            self._pipes[frozenset({"layout"})] = _derived(pipe, "StableDiffusionImg2ImgPipeline")
        if models.edges is not None:
            for names, stock in (
                ({"edges"}, "StableDiffusionControlNetPipeline"),
                ({"edges", "layout"}, "StableDiffusionControlNetImg2ImgPipeline"),
            ):
                if names <= set(models.offered):
                    self._pipes[frozenset(names)] = _derived(pipe, stock, controlnet=models.edges)
        self._prepared: OrderedDict[tuple[str, str, int, int], Image.Image] = OrderedDict()

    def pipeline(self, keep: Sequence[Guide]) -> Any:
        """The pipeline that keeps these guides."""
        names = frozenset(guide.name for guide in keep)
        found = self._pipes.get(names)
        if found is None:
            raise ValueError(f"no pipeline keeps {', '.join(sorted(names))}; plan() offers only what is here")
        return found

    def inputs(self, params: GenerationParams, specs: Sequence[ImageSpec]) -> dict[str, Any]:
        """The guided pipeline's arguments for these images: each its own source's init or control image."""
        weights = {guide.name: guide.weight for guide in params.keep}
        size = (params.width, params.height)
        args: dict[str, Any] = {}
        if "layout" in weights:
            args["image"] = [self._prepared_image("init", spec, *size) for spec in specs]
            args["strength"] = weights["layout"]
        if "edges" in weights:
            control = [self._prepared_image("edges", spec, *size) for spec in specs]
            # The ControlNet pipelines take the size; their image-to-image one calls the control image
            # control_image, the plain one image.
            args["control_image" if "layout" in weights else "image"] = control
            args["controlnet_conditioning_scale"] = weights["edges"]
            args["width"], args["height"] = size
        return args

    def _prepared_image(self, what: str, spec: ImageSpec, width: int, height: int) -> Image.Image:
        if spec.guide_source is None:
            raise ValueError("a guided image needs its source; plan() gives every one its request's")
        key = (what, spec.guide_source, width, height)
        found = self._prepared.get(key)
        if found is not None:
            self._prepared.move_to_end(key)
            return found
        fitted = fit(self.sources.open(spec.guide_source), width, height)
        prepared = canny_edges(fitted) if what == "edges" else fitted
        self._prepared[key] = prepared
        if len(self._prepared) > PREPARED_CACHE_SIZE:
            self._prepared.popitem(last=False)
        return prepared


def _derived(pipe: Any, stock: str, **components: Any) -> Any:
    """A pipeline of another kind over `pipe`'s own modules, plus `components`.

    What diffusers' from_pipe does, less its closing cast of every module to one dtype (float32 unless
    told), which would rewrite the shared weights of a half-precision pipeline in place.
    """
    cls: Any = pipeline_class(stock)
    modules, options = cls._get_signature_keys(cls)
    kwargs = {name: module for name, module in pipe.components.items() if name in modules}
    kwargs.update({name: pipe.config[name] for name in options if name in pipe.config})
    derived = cls(**kwargs, **components)
    derived.set_progress_bar_config(disable=True)
    return derived
