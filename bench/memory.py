"""GPU memory, counted without a GPU: the real architectures on fake CUDA tensors, stock against ours.

PyTorch's FakeTensorMode runs every operator for its shapes and dtypes alone, so the SD v1-4, ViT-L-14 and
BLIP-large networks (bench/models.py's configurations) are built "on CUDA" in fp16 and run with nothing
allocated. A dispatch mode records each tensor storage an operator creates and when it is freed, which gives
each stage's activation peak over the weights (what `torch.cuda.max_memory_allocated` sees, less the caching
allocator's rounding, fragmentation and library workspaces such as cuBLAS's and cuDNN's: a floor, to check
against a GPU run of bench/generate.py, whose `resident_peak_gib` is the measured figure).

    python bench/memory.py [--batch 8] [--size 512] [--labels N]

Stock is diffusers' pipeline alone at batch 1; ours is the product at `--batch` images with the interrogation
models and their label table resident, with and without VAE slicing. Ends with
`stock_peak_gib=… resident_gib=… peak_gib=… peak_sliced_gib=…` and writes bench/results/memory.json.

    python bench/memory.py --keep none,layout,edges,depth,look,edges+depth [--random-weights] [--device D]

measures instead, on a real device, what each set of guides (bench/guide_sets.py) costs in memory: the
weights each guide adds (counted), and each set's peak during a batch of `--batch` images from a source it
has not seen (its edge map, depth map and image embedding made in that batch) in one generator that offers
them all: `torch.cuda.max_memory_allocated` on CUDA, the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) on a Linux CPU. "alone" is that peak less the weights of the guides the set does not
keep: what a bot that enables only its guides would reach. Ends with `none_peak_gib=… none_alone_gib=…
edges_peak_gib=… edges_alone_gib=… …` and writes bench/results/memory-guides-<device>-<models>.json.
"""

from __future__ import annotations

import argparse
import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from guide_sets import (
    components_for,
    guided_batch,
    guides_needed,
    hold_fresh_source,
    hold_source,
    load_guides,
    parse_guide_sets,
)
from measure import (
    RESULTS_DIR,
    count,
    default_json_path,
    environment,
    fmt,
    headline,
    print_table,
    release,
    synchronize,
    write_json,
)
from models import (
    BLIP_LARGE_TEXT,
    BLIP_LARGE_VISION,
    SD_SAFETY_VISION,
    SD_TEXT,
    SD_UNET,
    SD_VAE,
    VIT_L_14,
    bench_models,
)
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from i2p2i_bot.config import GenerateSettings
from i2p2i_bot.generate import Generator
from i2p2i_bot.gpu import resolve_device

GIB = 2**30
MIB = 2**20
DEVICE = torch.device("cuda", 0)


class StoragePeak(TorchDispatchMode):
    """Bytes of the storages that operators create inside it, live and at their peak."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage in self._seen:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        self._seen[storage] = weakref.ref(storage, lambda _ref: self._free(size))

    def _free(self, size: int) -> None:
        self.live -= size


def activation_peak(run: Callable[[], Any]) -> int:
    """Peak bytes of the storages `run` creates (its inputs and the weights not counted)."""
    with torch.inference_mode(), StoragePeak() as peak:
        run()
    return peak.peak


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@dataclass(frozen=True)
class Stage:
    name: str
    model: str
    activation: int


def _packaged_label_count() -> int:
    """Rows of the label table built from clip-interrogator's packaged lists (before banned terms)."""
    from i2p2i_bot.interrogate import label_tables

    return sum(len(labels) for labels in label_tables(None).values())


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = _parser().parse_args(argv)
    if args.keep is not None:
        return _guides_main(args)
    labels = args.labels if args.labels is not None else _packaged_label_count()
    size = args.size or 512
    latent = size // 8
    with FakeTensorMode():
        torch.set_default_dtype(torch.float16)
        try:
            figures, rows, details = _count(args.batch, size, latent, labels)
        finally:
            torch.set_default_dtype(torch.float32)
    print(
        f"memory on fake CUDA tensors (fp16, counted storages, no allocator overhead): SD v1-4 at "
        f"{size}x{size}, batch {args.batch}; ViT-L-14, BLIP-large and {labels} labels resident"
    )
    print()
    print_table(["", "model", "GiB"], rows)
    json_out = Path(args.json_out) if args.json_out else RESULTS_DIR / "memory.json"
    write_json(
        json_out,
        {"benchmark": "memory", "settings": {"batch": args.batch, "size": size, "labels": labels},
         **details, "headline": figures},
    )  # fmt: skip
    print()
    print(f"JSON: {json_out}")
    print(headline(figures))
    return figures


def _count(
    batch: int, size: int, latent: int, labels: int
) -> tuple[dict[str, float], list[list[str]], dict[str, Any]]:
    import open_clip
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        CLIPConfig,
        CLIPTextConfig,
        CLIPTextModel,
    )
    from transformers.initialization import no_init_weights

    from i2p2i_bot.caption_decode import GreedyCaptionDecoder

    # Initialisers that look at values (truncated normals) cannot run on fake tensors; values do not matter.
    with torch.device(DEVICE), no_init_weights():
        unet: Any = UNet2DConditionModel(**SD_UNET)
        vae: Any = AutoencoderKL(**SD_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD_TEXT)).eval()
        safety = StableDiffusionSafetyChecker(
            CLIPConfig(
                text_config={**SD_TEXT, "num_hidden_layers": 1},
                vision_config=SD_SAFETY_VISION,
                projection_dim=768,
            )
        ).eval()
        clip = open_clip.CLIP(**VIT_L_14).eval()
        blip: Any = BlipForConditionalGeneration(
            BlipConfig(text_config=BLIP_LARGE_TEXT, vision_config=BLIP_LARGE_VISION, projection_dim=512)
        ).eval()
        bank = torch.empty(labels, VIT_L_14["embed_dim"])
    decoder = GreedyCaptionDecoder(blip, 32, graphs=False)
    decoder_extra = sum(
        t.numel() * t.element_size() for layer in decoder.layers for t in (layer.qkv_w, layer.qkv_b)
    )
    weights = {
        "UNet": weight_bytes(unet),
        "VAE": weight_bytes(vae),
        "SD text encoder": weight_bytes(text_encoder),
        "safety checker": weight_bytes(safety),
        "CLIP ViT-L-14": weight_bytes(clip),
        "BLIP-large": weight_bytes(blip) + decoder_extra,
        "label table": bank.numel() * bank.element_size(),
    }
    generator = ("UNet", "VAE", "SD text encoder", "safety checker")

    def unet_at(images: int) -> Callable[[], Any]:
        x = torch.empty(2 * images, 4, latent, latent, device=DEVICE)  # guidance: two passes per image
        context = torch.empty(2 * images, 77, SD_UNET["cross_attention_dim"], device=DEVICE)
        steps = torch.full((2 * images,), 500, device=DEVICE)
        return lambda: unet(x, steps, context).sample

    def vae_at(images: int, sliced: bool) -> Callable[[], Any]:
        x = torch.empty(images, 4, latent, latent, device=DEVICE)

        def run() -> Any:
            vae.use_slicing = sliced
            return vae.decode(x).sample

        return run

    def safety_at(images: int) -> Callable[[], Any]:
        pixels = torch.empty(images, 3, 224, 224, device=DEVICE)
        return lambda: safety.vision_model(pixels)

    def text_at(images: int) -> Callable[[], Any]:
        ids = torch.zeros(2 * images, 77, dtype=torch.long, device=DEVICE)
        return lambda: text_encoder(ids)

    image384 = torch.empty(1, 3, 384, 384, device=DEVICE)
    image224 = torch.empty(batch, 3, 224, 224, device=DEVICE)
    stages = {
        "stock": [
            Stage("text encoder, 2 prompts", "SD text encoder", activation_peak(text_at(1))),
            Stage("UNet step, batch 2 (guided)", "UNet", activation_peak(unet_at(1))),
            Stage("VAE decode, 1 image", "VAE", activation_peak(vae_at(1, False))),
            Stage("safety checker, 1 image", "safety checker", activation_peak(safety_at(1))),
        ],
        "ours": [
            Stage(f"text encoder, {2 * batch} prompts", "SD text encoder", activation_peak(text_at(batch))),
            Stage(f"UNet step, batch {2 * batch} (guided)", "UNet", activation_peak(unet_at(batch))),
            Stage(f"VAE decode, {batch} images", "VAE", activation_peak(vae_at(batch, False))),
            Stage(f"safety checker, {batch} images", "safety checker", activation_peak(safety_at(batch))),
            Stage(
                f"fidelity: CLIP image embedding, {batch}",
                "CLIP ViT-L-14",
                activation_peak(lambda: clip.encode_image(image224)),
            ),
            Stage(
                "caption: BLIP vision tower",
                "BLIP-large",
                activation_peak(lambda: blip.vision_model(pixel_values=image384)),
            ),
        ],
        "sliced": [Stage(f"VAE decode, {batch} images, sliced", "VAE", activation_peak(vae_at(batch, True)))],
    }
    stock_weights = sum(weights[name] for name in generator)
    resident = sum(weights.values())
    stock_peak = stock_weights + max(s.activation for s in stages["stock"])
    ours_peak = resident + max(s.activation for s in stages["ours"])
    sliced_peak = resident + max(
        s.activation for s in [*stages["ours"][:2], *stages["sliced"], *stages["ours"][3:]]
    )

    rows = [[f"weights: {name}", "", f"{size / GIB:.2f}"] for name, size in weights.items()]
    rows.append(["weights: stock (the pipeline alone)", "", f"{stock_weights / GIB:.2f}"])
    rows.append(["weights: ours (everything resident)", "", f"{resident / GIB:.2f}"])
    for group in ("stock", "ours", "sliced"):
        label = "stock" if group == "stock" else "ours"
        rows.extend(
            [f"{label} activations: {s.name}", s.model, f"{s.activation / GIB:.2f}"] for s in stages[group]
        )
    rows.append(["stock peak: weights + largest stage", "", f"{stock_peak / GIB:.2f}"])
    rows.append([f"ours peak at batch {batch}", "", f"{ours_peak / GIB:.2f}"])
    rows.append([f"ours peak at batch {batch}, VAE slicing", "", f"{sliced_peak / GIB:.2f}"])
    figures = {
        "stock_peak_gib": stock_peak / GIB,
        "resident_gib": resident / GIB,
        "peak_gib": ours_peak / GIB,
        "peak_sliced_gib": sliced_peak / GIB,
    }
    details = {
        "weights_bytes": weights,
        "activation_peak_bytes": {
            group: {s.name: s.activation for s in items} for group, items in stages.items()
        },
    }
    return figures, rows, details


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--batch", type=count, default=8, help="images per GPU batch (default 8)")
    parser.add_argument(
        "--size", type=count, help="image side in pixels (default 512; smoke models with --keep 128)"
    )
    parser.add_argument("--labels", type=int, help="label table rows (default: the packaged lists')")
    parser.add_argument("--json-out", help="default: bench/results/memory.json")
    guides = parser.add_argument_group("measured per guide set (--keep)")
    guides.add_argument(
        "--keep", help="each guide set's measured peak against none, e.g. none,layout,edges,depth,look"
    )
    guides.add_argument(
        "--random-weights", action="store_true", help="the real architectures (default: the smoke models)"
    )
    guides.add_argument("--steps", type=count, help="denoising steps (default 25; smoke models 10)")
    guides.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    guides.add_argument(
        "--cache-dir",
        default=str(Path.home() / ".cache" / "i2p2i-bench"),
        help="models (reused; bench/generate.py's)",
    )
    return parser


class PeakMemory:
    """A device's memory in use and its peak since the last reset: CUDA's allocator, or the process's
    resident set on a Linux CPU (VmRSS, and VmHWM reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.source = "cuda max_memory_allocated" if device.type == "cuda" else "process RSS (VmHWM)"

    def reset(self) -> None:
        release(self.device)
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
                refs.write("5")  # the kernel's way to set the peak resident set back to the current one

    def in_use(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return self._status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self._status_kib("VmHWM") * 1024

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {field}")


def _guides_main(args: argparse.Namespace) -> dict[str, float]:
    """Each guide set's peak during a batch, in one generator that offers them all, none first."""
    import logging

    from i2p2i_bot import progress_bars

    load_at_start = os.getloadavg()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress_bars.only_on_a_terminal()
    guide_sets = parse_guide_sets(args.keep)
    names = guides_needed(guide_sets)
    device = resolve_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    models = bench_models(
        Path(args.cache_dir).expanduser(),
        random_weights=args.random_weights,
        device=device,
        components=["generator", *components_for(names)],
    )
    size = args.size or (512 if models.random_weights else 128)
    steps = args.steps or (25 if models.random_weights else 10)
    settings = GenerateSettings(
        steps=steps,
        width=size,
        height=size,
        min_side=min(size, 256),
        max_side=max(size, 768),
        max_count=args.batch,
    )
    memory = PeakMemory(device)
    memory.reset()
    before = memory.in_use()
    guides = load_guides(models, names, device, dtype)
    generator = Generator.load(str(models.generator), settings, device, dtype=dtype, guides=guides)
    loaded = memory.in_use() - before
    hold_source(generator)
    pipe = generator.pipe
    weights = {
        "generator": sum(weight_bytes(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder"))
        + (weight_bytes(pipe.safety_checker) if pipe.safety_checker is not None else 0)
    }
    if "edges" in names:
        weights["edges"] = weight_bytes(guides.controlnet("edges"))
    if "depth" in names and guides.depth_estimator is not None:
        weights["depth"] = weight_bytes(guides.controlnet("depth")) + weight_bytes(
            guides.depth_estimator.model
        )
    if "look" in names and guides.look is not None:
        look_set = next(s for s in guide_sets if any(g.name == "look" for g in s.guides))
        params, _ = guided_batch(generator, look_set, ["x"], 0, 1)
        own = weight_bytes(pipe.unet)
        # The IP-Adapter's attention and image projection are in the UNet only while look's batch runs.
        with generator.guided.engaged(params):
            adapter = weight_bytes(pipe.unet) - own
        weights["look"] = weight_bytes(guides.look.image_encoder) + adapter
    guide_weights = sum(nbytes for name, nbytes in weights.items() if name != "generator")

    run_s: dict[str, float] = {}
    peaks: dict[str, int] = {}
    for guide_set in guide_sets:
        # Warm: the first batch of a set builds its pipeline's lazy state; the measured one is the next.
        params, specs = guided_batch(generator, guide_set, ["a lighthouse on a cliff"], 7, args.batch)
        generator.generate_batch(params, specs)
    for guide_set in guide_sets:
        fresh = hold_fresh_source(generator, guide_set)
        params, specs = guided_batch(generator, guide_set, ["a lighthouse on a cliff"], 7, args.batch, fresh)
        memory.reset()
        started = time.perf_counter()
        generator.generate_batch(params, specs)
        peaks[guide_set.label] = memory.peak()
        run_s[guide_set.label] = time.perf_counter() - started
    none_peak = peaks[guide_sets[0].label]
    rows = []
    details = []
    figures: dict[str, float] = {}
    for guide_set in guide_sets:
        peak = peaks[guide_set.label]
        kept = {g.name for g in guide_set.guides}
        alone = peak - guide_weights + sum(weights.get(name, 0) for name in kept)
        rows.append(
            [
                guide_set.label,
                fmt(peak / MIB, 1),
                fmt((peak - none_peak) / MIB, 1),
                fmt(alone / MIB, 1),
                fmt((alone - (none_peak - guide_weights)) / MIB, 1),
            ]
        )
        details.append(
            {
                "keep": guide_set.label,
                "peak_bytes": peak,
                "over_none_bytes": peak - none_peak,
                "alone_peak_bytes": alone,
                "batch_s": run_s[guide_set.label],
            }
        )
        figures[f"{guide_set.key}_peak_gib"] = peak / GIB
        figures[f"{guide_set.key}_alone_gib"] = alone / GIB
    figures["guide_weights_gib"] = guide_weights / GIB
    env = environment(device, load_at_start)
    print(
        f"memory per guide set, measured: {models.kind} models ({dtype}) on {env['device_name']} "
        f"[{env['device']}], {memory.source}; {size}x{size}, {steps} steps, batch {args.batch}, "
        "each from a source it has not seen"
    )
    print()
    print_table(
        ["weights", "MiB"],
        [[name, fmt(nbytes / MIB, 1)] for name, nbytes in weights.items()]
        + [["all loaded, measured", fmt(loaded / MIB, 1)]],
    )
    print()
    print_table(["keep", "peak MiB", "+ vs none", "alone MiB", "alone + vs none"], rows)
    json_out = (
        Path(args.json_out) if args.json_out else default_json_path("memory-guides", device, models.kind)
    )
    write_json(
        json_out,
        {
            "benchmark": "memory-guides",
            "environment": env,
            "models": {"kind": models.kind, "precision": str(dtype)},
            "settings": {"batch": args.batch, "size": size, "steps": steps, "memory": memory.source},
            "weights_bytes": weights,
            "loaded_bytes_measured": loaded,
            "rows": details,
            "headline": figures,
        },
    )
    print()
    print(f"JSON: {json_out}")
    print(headline(figures))
    return figures


if __name__ == "__main__":
    main()
