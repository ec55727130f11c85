"""Guided generation: the pipelines and inputs that make images keep elements of their source.

- layout: image-to-image from the source, its weight the strength (how much may change), with the
  family's own pipeline (SD 1.x and 2.x: StableDiffusionImg2ImgPipeline, SDXL its XL one), so any preset
  may keep it;
- edges: a ControlNet on the source's Canny edges, its weight the conditioning scale;
- depth: a ControlNet on the source's depth map (from a depth estimator), its weight the same;
- edges and depth together: both ControlNets (diffusers' MultiControlNetModel), each with its weight;
- any of them with layout: ControlNet image-to-image;
- look: an IP-Adapter fed the source's image embedding, its weight the adapter's scale, with any of the
  others.

Each pipeline is made from the resident one's components, so the UNet, VAE and text encoder exist once in
memory; only the ControlNets, the depth estimator and the IP-Adapter are added, and only when their guide
is enabled and fits the pipeline's family (they are SD 1.x weights: guides.GUIDE_KINDS says which fit).
Every image of a batch brings its own source (by hash): the init, edge and depth images and the image
embeddings are made per image (the pictures scaled to cover the image size and centre-cropped), and kept
for the next batches from the same source.

The IP-Adapter lives in the shared UNet's attention processors, which every pipeline runs: its processors
and image projection are put in place for the batches that keep look only, and the UNet's own (fused or
not) are put back after each, so the other batches run exactly as without it.

"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, ImageOps

from i2p2i_bot.acceleration import pipeline_class
from i2p2i_bot.config import GuideSettings
from i2p2i_bot.guides import GUIDE_KINDS, GUIDE_NAMES, Guide, GuideName
from i2p2i_bot.models import (
    IMAGE_ENCODER_FOLDER,
    ModelSources,
    ModelUnavailable,
    controlnet_folder,
    depth_estimator_folder,
    look_folder,
)
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
class LookAdapter:
    """The look guide's IP-Adapter: where its weights are, for diffusers' load_ip_adapter, and its image
    encoder (CLIPVisionModelWithProjection) with the image processor diffusers gives it."""

    folder: str
    # The weights file inside folder, like models/ip-adapter_sd15.safetensors.
    weights: str
    image_encoder: Any
    processor: Any

    def embed(self, image: Image.Image) -> torch.Tensor:
        """The image's embedding, [D] on the encoder's device: what the pipeline's encode_image makes."""
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
        encoder = self.image_encoder
        with torch.inference_mode():
            return encoder(pixels.to(encoder.device, encoder.dtype)).image_embeds[0]


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
    look: LookAdapter | None = None
    # The models each guide's weights come from, as results record them.
    recorded: dict[str, str] = field(default_factory=dict)

    @property
    def offered(self) -> tuple[GuideName, ...]:
        on = {
            "layout": self.layout,
            "edges": self.edges is not None,
            "depth": self.depth is not None and self.depth_estimator is not None,
            "look": self.look is not None,
        }
        return tuple(name for name in GUIDE_NAMES if on[name])

    def fitting(self, family: str) -> GuideModels:
        """These guides less those whose weights do not fit a model family (layout fits every one)."""
        kept: dict[str, bool] = {name: GUIDE_KINDS[name].fits(family) for name in GUIDE_NAMES}
        return dataclasses.replace(
            self,
            edges=self.edges if kept["edges"] else None,
            depth=self.depth if kept["depth"] else None,
            depth_estimator=self.depth_estimator if kept["depth"] else None,
            look=self.look if kept["look"] else None,
            recorded={name: model for name, model in self.recorded.items() if kept[name]},
        )

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
    look = None
    if sources.look is not None and sources.look_weights is not None:
        look = _look_adapter(sources.look, sources.look_weights, device, dtype)
        if look is not None:
            recorded["look"] = sources.recorded_guide("look", f"{sources.look}/{sources.look_weights}")
    return GuideModels(
        layout="layout" in settings.enabled,
        edges=edges,
        depth=depth,
        depth_estimator=estimator,
        look=look,
        recorded=recorded,
    )


def _look_adapter(source: str, weights: str, device: torch.device, dtype: torch.dtype) -> LookAdapter | None:
    """The look guide's IP-Adapter from this machine, its image encoder loaded as load_ip_adapter loads
    it; None, with one log line, when it cannot be."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    try:
        folder = look_folder(source, weights)
        subfolder = weights.rpartition("/")[0]
        encoder_folder = f"{subfolder}/{IMAGE_ENCODER_FOLDER}" if subfolder else IMAGE_ENCODER_FOLDER
        encoder: Any = CLIPVisionModelWithProjection.from_pretrained(
            folder, subfolder=encoder_folder, dtype=dtype
        )
    except (ModelUnavailable, OSError, ValueError) as exc:
        log.warning("the look guide is not offered: its IP-Adapter could not be loaded (%s)", exc)
        return None
    encoder = encoder.to(device).eval().requires_grad_(False)
    # What load_ip_adapter gives a pipeline without a feature extractor: the encoder's own input size.
    size = encoder.config.image_size
    processor = CLIPImageProcessor(size=size, crop_size=size)
    return LookAdapter(folder, weights, encoder, processor)


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
    """The guided pipelines over one resident pipeline, and each batch's inputs for them. GPU thread only.

    `family` is the resident pipeline's model family (presets.Family): the guides whose weights do not fit
    it are left out."""

    def __init__(self, pipe: Any, models: GuideModels, sources: SourceImages, *, family: str = "sd1") -> None:
        models = models.fitting(family)
        self.models = models
        self.sources = sources
        self._unet = pipe.unet
        # Each set of guides but look, with the pipeline class and the extra modules that keep it.
        kinds: list[tuple[frozenset[str], str, dict[str, Any]]] = []
        if models.layout:
            kinds.append((frozenset({"layout"}), _image_to_image(pipe), {}))
        offered = set(models.offered)
        controls = [name for name in CONTROLNET_GUIDES if name in offered]
        # Every set of ControlNets, alone or with layout; several run as one MultiControlNetModel.
        for count in range(1, len(controls) + 1):
            for names in itertools.combinations(controls, count):
                nets = [models.controlnet(name) for name in names]
                net = {"controlnet": nets[0] if len(nets) == 1 else nets}
                kinds.append((frozenset(names), "StableDiffusionControlNetPipeline", net))
                if models.layout:
                    kinds.append(
                        (frozenset({*names, "layout"}), "StableDiffusionControlNetImg2ImgPipeline", net)
                    )
        self._pipes: dict[frozenset[str], Any] = {
            names: _derived(pipe, stock, **extra) for names, stock, extra in kinds
        }
        self._look: _UnetAttention | None = None
        if models.look is not None:
            # Look alone, and look with every other set: the same classes with the image encoder.
            for guides, stock, extra in [(frozenset[str](), "StableDiffusionPipeline", {}), *kinds]:
                self._pipes[guides | {"look"}] = _derived(
                    pipe, stock, image_encoder=models.look.image_encoder, **extra
                )
            self._look = _load_look(self._pipes[frozenset({"look"})], models.look)
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._prepared: OrderedDict[tuple[str, str, int, int], Image.Image] = OrderedDict()

    def pipeline(self, keep: Sequence[Guide]) -> Any:
        """The pipeline that keeps these guides."""
        names = frozenset(guide.name for guide in keep)
        found = self._pipes.get(names)
        if found is None:
            raise ValueError(f"no pipeline keeps {', '.join(sorted(names))}; plan() offers only what is here")
        return found

    @contextmanager
    def engaged(self, params: GenerationParams) -> Iterator[None]:
        """The shared UNet set up for a batch with these guides: with look, the IP-Adapter's attention at
        the guide's weight until the batch is done, then the UNet's own attention back."""
        weight = next((g.weight for g in params.keep if g.name == "look"), None)
        if weight is None or self._look is None:
            yield
            return
        own = _UnetAttention.of(self._unet)
        self._look.put_in(self._unet)
        try:
            self._pipes[frozenset({"look"})].set_ip_adapter_scale(weight)
            yield
        finally:
            own.put_in(self._unet)

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
        if "look" in weights:
            embeds = torch.stack([self._embedding(spec) for spec in specs])[:, None]
            # The pipelines take the unconditional half first when they guide, as encode_image makes it.
            if params.guidance > 1 and self._unet.config.time_cond_proj_dim is None:
                embeds = torch.cat([torch.zeros_like(embeds), embeds])
            # One tensor per IP-Adapter, a row per image: each image its own source's embedding. The stock
            # pipelines would give every image of the batch all of the sources (acceleration.py's
            # pipeline class takes these rows as they are).
            args["ip_adapter_image_embeds"] = [embeds]
            if not controls:
                args["width"], args["height"] = size
        return args

    def _embedding(self, spec: ImageSpec) -> torch.Tensor:
        if spec.guide_source is None:
            raise ValueError("a guided image needs its source; plan() gives every one its request's")
        look = self.models.look
        if look is None:
            raise ValueError("look needs its IP-Adapter; plan() offers look only with it")
        found = self._embeddings.get(spec.guide_source)
        if found is not None:
            self._embeddings.move_to_end(spec.guide_source)
            return found
        embedding = look.embed(self.sources.open(spec.guide_source))
        self._embeddings[spec.guide_source] = embedding
        if len(self._embeddings) > PREPARED_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return embedding

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


@dataclass(frozen=True)
class _UnetAttention:
    """What an IP-Adapter changes in a UNet: its attention processors and its image projection."""

    processors: dict[str, Any]
    encoder_hid_proj: Any
    encoder_hid_dim_type: str | None

    @classmethod
    def of(cls, unet: Any) -> _UnetAttention:
        return cls(dict(unet.attn_processors), unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)

    def put_in(self, unet: Any) -> None:
        unet.set_attn_processor(dict(self.processors))  # it empties the dict it is given
        unet.encoder_hid_proj = self.encoder_hid_proj
        unet.config.encoder_hid_dim_type = self.encoder_hid_dim_type


def _load_look(pipe: Any, look: LookAdapter) -> _UnetAttention:
    """Load the IP-Adapter into the pipeline's UNet with diffusers' loader, keep what it set there, and
    give the UNet its own attention back."""
    own = _UnetAttention.of(pipe.unet)
    subfolder, _, weight_name = look.weights.rpartition("/")
    # The image encoder is the pipeline's already; the loader reads the adapter's weights alone.
    pipe.load_ip_adapter(look.folder, subfolder=subfolder, weight_name=weight_name, image_encoder_folder=None)
    adapted = _UnetAttention.of(pipe.unet)
    own.put_in(pipe.unet)
    return adapted


def _batch_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Pictures as one [N, 3, H, W] float tensor in [0, 1], as diffusers' image processor makes them."""
    import numpy as np

    pixels = np.stack([np.asarray(image.convert("RGB")) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0


def _image_to_image(pipe: Any) -> str:
    """The image-to-image pipeline class over a text-to-image one's modules: SDXL's own for SDXL (its
    second text encoder and size conditioning), else SD 1.x's and 2.x's (v-prediction stays in the shared
    scheduler's config)."""
    xl = getattr(pipe, "text_encoder_2", None) is not None
    return "StableDiffusionXLImg2ImgPipeline" if xl else "StableDiffusionImg2ImgPipeline"


def _derived(pipe: Any, stock: str, **components: Any) -> Any:
    """A pipeline of another kind over `pipe`'s own modules, plus `components`.

    What diffusers' from_pipe does, less its closing cast of every module to one dtype (float32 unless
    told), which would rewrite the shared weights of a half-precision pipeline in place.
    """
    cls: Any = pipeline_class(stock)
    modules, options = cls._get_signature_keys(cls)
    kwargs = {name: module for name, module in pipe.components.items() if name in modules}
    kwargs.update({name: pipe.config[name] for name in options if name in pipe.config})
    if "add_watermarker" in options:
        # SDXL's: not in its config; the derived pipeline marks its images as the resident one does.
        kwargs["add_watermarker"] = getattr(pipe, "watermark", None) is not None
    kwargs.update(components)  # over the resident pipeline's own (its image_encoder is None)
    derived = cls(**kwargs)
    derived.set_progress_bar_config(disable=True)
    return derived
