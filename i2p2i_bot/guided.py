"""Guided generation: the pipelines and inputs that make images keep elements of their source.

- layout: image-to-image from the source, its weight the strength (how much may change);
- edges: a ControlNet on the source's Canny edges, its weight the conditioning scale;
- depth: a ControlNet on the source's depth map (from a depth estimator), its weight the same;
- edges and depth together: both ControlNets (diffusers' MultiControlNetModel), each with its weight;
- any of them with layout: ControlNet image-to-image.

Each pipeline is made from the resident one's components, so the UNet, VAE and text encoder exist once in
memory; only the ControlNets and the depth estimator are added, and only when their guide is enabled. Every
image of a batch brings its own source (by hash): the init, edge and depth images are made per image,
scaled to cover the image size and centre-cropped, and kept for the next batches from the same source.
"""

from __future__ import annotations

import itertools
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
from i2p2i_bot.models import ModelSources, ModelUnavailable, controlnet_folder, depth_estimator_folder
from i2p2i_bot.request import GenerationParams, ImageSpec
from i2p2i_bot.source_images import SourceImages

log = logging.getLogger(__name__)

# The thresholds of ControlNet's own Canny annotator, which its canny model was trained on.
CANNY_LOW, CANNY_HIGH = 100, 200
# Prepared init and control images kept, by (what, source, width, height): a member's rerolls and the
# images of one request reuse them.
PREPARED_CACHE_SIZE = 64
# The guides that add a ControlNet, in the order a MultiControlNetModel holds them.
CONTROLNET_GUIDES: tuple[GuideName, ...] = ("edges", "depth")


@dataclass(frozen=True)
class DepthEstimator:
    """A transformers depth estimation model and its image processor, on the pipeline's device."""

    model: Any
    processor: Any

    def __call__(self, image: Image.Image) -> Image.Image:
        """The depth map of an RGB image at its size, near bright and far dark, stretched over 0-255 in
        three channels: what ControlNet's own MiDaS annotator gives its depth model."""
        import numpy as np

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.model.device, self.model.dtype)
        with torch.inference_mode():
            predicted = self.model(pixel_values=pixels).predicted_depth
        depth = torch.nn.functional.interpolate(
            predicted[:, None].float(), size=(image.height, image.width), mode="bicubic", align_corners=False
        )[0, 0]
        depth = depth - depth.min()
        top = depth.max()
        if top > 0:
            depth = depth / top
        levels = (depth * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        return Image.fromarray(np.stack([levels] * 3, axis=-1))


@dataclass(frozen=True)
class GuideModels:
    """The guides a generator offers, and the weights beyond the pipeline's that they need."""

    layout: bool = False
    # The edges and depth guides' ControlNetModels, on the pipeline's device and in its dtype; None: not
    # offered.
    edges: Any | None = None
    depth: Any | None = None
    # What depth's ControlNet reads the source through; depth is offered only with both.
    depth_estimator: DepthEstimator | None = None
    # The models each guide's weights come from, as results record them.
    recorded: dict[str, str] = field(default_factory=dict)

    @property
    def offered(self) -> tuple[GuideName, ...]:
        on = {
            "layout": self.layout,
            "edges": self.edges is not None,
            "depth": self.depth is not None and self.depth_estimator is not None,
        }
        return tuple(name for name in GUIDE_NAMES if on[name])

    def controlnet(self, name: GuideName) -> Any:
        """The ControlNet of a guide that has one."""
        found = {"edges": self.edges, "depth": self.depth}.get(name)
        if found is None:
            raise ValueError(f"the {name} guide has no ControlNet here")
        return found


def load_guide_models(
    settings: GuideSettings, sources: ModelSources, device: torch.device, dtype: torch.dtype
) -> GuideModels:
    """The enabled guides' weights, from this machine only; a guide whose weights are missing is left out
    with one log line, and everything else goes on."""
    recorded = {}
    edges = _controlnet("edges", sources.edges, device, dtype)
    if edges is not None and sources.edges is not None:
        recorded["edges"] = sources.recorded_guide("edges", sources.edges)
    depth, estimator = None, None
    if sources.depth is not None and sources.depth_estimator is not None:
        estimator = _depth_estimator(sources.depth_estimator, device, dtype)
        if estimator is not None:
            depth = _controlnet("depth", sources.depth, device, dtype)
        if depth is not None:
            # Both shape the image: the ControlNet, and the estimator whose map it reads.
            controlnet = sources.recorded_guide("depth", sources.depth)
            estimator_name = sources.recorded_guide("depth-estimator", sources.depth_estimator)
            recorded["depth"] = f"{controlnet} + {estimator_name}"
        else:
            estimator = None
    return GuideModels(
        layout="layout" in settings.enabled,
        edges=edges,
        depth=depth,
        depth_estimator=estimator,
        recorded=recorded,
    )


def _controlnet(name: str, source: str | None, device: torch.device, dtype: torch.dtype) -> Any | None:
    """A guide's ControlNet from this machine; None, with one log line, when it cannot be loaded."""
    if source is None:
        return None
    from diffusers import ControlNetModel

    try:
        controlnet = ControlNetModel.from_pretrained(controlnet_folder(source), dtype=dtype).to(device)
    except (ModelUnavailable, OSError, ValueError) as exc:
        log.warning("the %s guide is not offered: its ControlNet could not be loaded (%s)", name, exc)
        return None
    return controlnet.requires_grad_(False)


def _depth_estimator(source: str, device: torch.device, dtype: torch.dtype) -> DepthEstimator | None:
    """The depth guide's estimator from this machine; None, with one log line, when it cannot be loaded."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    try:
        folder = depth_estimator_folder(source)
        model = AutoModelForDepthEstimation.from_pretrained(folder, dtype=dtype).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
    except (ModelUnavailable, OSError, ValueError) as exc:
        log.warning("the depth guide is not offered: its depth estimator could not be loaded (%s)", exc)
        return None
    return DepthEstimator(model.requires_grad_(False), processor)


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
    the compiled code was not made for, so edges and depth run eager."""
    return all(guide.name == "layout" for guide in keep)


class GuidedPipelines:
    """The guided pipelines over one resident pipeline, and each batch's inputs for them. GPU thread only."""

    def __init__(self, pipe: Any, models: GuideModels, sources: SourceImages) -> None:
        self.models = models
        self.sources = sources
        self._pipes: dict[frozenset[str], Any] = {}
        if models.layout:
            self._pipes[frozenset({"layout"})] = _derived(pipe, "StableDiffusionImg2ImgPipeline")
        offered = set(models.offered)
        controls = [name for name in CONTROLNET_GUIDES if name in offered]
        # Every set of ControlNets, alone or with layout; several run as one MultiControlNetModel.
        for count in range(1, len(controls) + 1):
            for names in itertools.combinations(controls, count):
                nets = [models.controlnet(name) for name in names]
                controlnet = nets[0] if len(nets) == 1 else nets
                self._pipes[frozenset(names)] = _derived(
                    pipe, "StableDiffusionControlNetPipeline", controlnet=controlnet
                )
                if models.layout:
                    self._pipes[frozenset({*names, "layout"})] = _derived(
                        pipe, "StableDiffusionControlNetImg2ImgPipeline", controlnet=controlnet
                    )
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
        controls = [name for name in CONTROLNET_GUIDES if name in weights]
        if controls:
            images = [[self._prepared_image(name, spec, *size) for spec in specs] for name in controls]
            # The ControlNet pipelines take the size; their image-to-image one calls the control image
            # control_image, the plain one image.
            key = "control_image" if "layout" in weights else "image"
            if len(controls) == 1:
                args[key] = images[0]
                args["controlnet_conditioning_scale"] = weights[controls[0]]
            else:
                # One batch tensor per ControlNet: the image-to-image pipeline refuses lists of lists, and
                # a tensor in [0, 1] is what both make of a list of pictures.
                args[key] = [_batch_tensor(batch) for batch in images]
                args["controlnet_conditioning_scale"] = [weights[name] for name in controls]
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
        if what == "edges":
            prepared = canny_edges(fitted)
        elif what == "depth":
            estimator = self.models.depth_estimator
            if estimator is None:
                raise ValueError("a depth image needs the depth estimator; plan() offers depth only with it")
            prepared = estimator(fitted)
        else:
            prepared = fitted
        self._prepared[key] = prepared
        if len(self._prepared) > PREPARED_CACHE_SIZE:
            self._prepared.popitem(last=False)
        return prepared


def _batch_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Pictures as one [N, 3, H, W] float tensor in [0, 1], as diffusers' image processor makes them."""
    import numpy as np

    pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


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
