"""Interrogation speed: stock clip-interrogator against ours, in every mode, on the same models and image.

Both sides wrap the very same CLIP and BLIP modules in one process and describe the same photograph
(scikit-image's astronaut) with the same label lists and flavour counts; our default banned terms are
off so both rank identical lists. Building the label tables (or loading them from their caches) happens
before any timing. Ours is called without an image key, so every call captions and embeds the image
again, exactly as every stock call does. Prints a table, writes JSON, and ends with the headline figures:

    python bench/interrogate.py [--random-weights] [--labels DIR] [--modes fast,best] [--reps N]

With no flag the smoke models run (tiny random networks: wiring, not speed); --random-weights runs the real
ViT-L-14 and BLIP-large architectures with random weights (see bench/models.py). Run it as a file: it
imports its siblings in bench/ (measure, models) from the folder Python puts first on the path.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from measure import (
    Measurement,
    count,
    count_or_zero,
    default_json_path,
    environment,
    fmt,
    headline,
    measure,
    print_table,
    write_json,
)
from models import bench_models
from PIL import Image

from i2p2i_bot import progress_bars
from i2p2i_bot.config import InterrogateSettings
from i2p2i_bot.gpu import resolve_device
from i2p2i_bot.interrogate import INTERMEDIATE_COUNT, MODES, Interrogator
from i2p2i_bot.interrogation import Interrogation

log = logging.getLogger(__name__)
DEFAULT_CACHE = Path(os.environ.get("I2P2I_BENCH_CACHE", Path.home() / ".cache" / "i2p2i-bench"))
# Headline order: the two modes the goals name first.
HEADLINE_MODES = ("fast", "best", "classic", "negative", "candidates")


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Time every mode, print the table and the headline line, write the JSON; return the headline figures."""
    args = _parser().parse_args(argv)
    load_at_start = os.getloadavg()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress_bars.only_on_a_terminal()
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*CUDA is not available.*", category=UserWarning)
    modes = _modes(args.modes)
    device = resolve_device(args.device)
    cache_dir = Path(args.cache_dir).expanduser()
    models = bench_models(
        cache_dir, random_weights=args.random_weights, components=("clip", "caption"), device=device
    )
    reps = args.reps if args.reps is not None else (5 if device.type == "cuda" else 3)
    labels_dir = Path(args.labels).expanduser() if args.labels else None
    settings = InterrogateSettings(
        labels_dir=str(labels_dir) if labels_dir else "", use_default_banned_terms=False
    )
    image = _astronaut()

    ours_cache = cache_dir / "labels"
    before = _stamps(ours_cache)
    ours_load, ours = measure(
        lambda: Interrogator.load(str(models.clip), str(models.caption), settings, device, cache_dir),
        device,
        warmup=0,
        reps=1,
    )
    ours_built = _stamps(ours_cache) != before
    # What the first member after a start waits without models.warm_up: kernels load, graphs are captured.
    first_call, _ = measure(lambda: ours.interrogate(image, "fast"), device, warmup=0, reps=1)
    precision = str(ours.clip.dtype).removeprefix("torch.")
    stock_cache = cache_dir / "stock-labels" / f"{models.kind}-{_fingerprint(models.clip)}-{precision}"
    before = _stamps(stock_cache)
    stock_load, stock = measure(
        lambda: _stock(ours, settings, labels_dir, stock_cache), device, warmup=0, reps=1
    )
    stock_built = _stamps(stock_cache) != before

    stock_calls = _stock_calls(stock, image, settings)
    results: dict[str, dict[str, Any]] = {}
    caption = ""
    for mode in modes:
        stock_time, stock_out = measure(stock_calls[mode], device, warmup=args.warmup, reps=reps)
        ours_results: list[Interrogation] = []

        def ours_call(mode: str = mode, into: list[Interrogation] = ours_results) -> Interrogation:
            result = ours.interrogate(image, mode)
            into.append(result)
            return result

        ours_time, ours_out = measure(ours_call, device, warmup=args.warmup, reps=reps)
        timed = ours_results[args.warmup :]
        caption = ours_out.caption
        results[mode] = _mode_result(mode, stock_time, stock_out, ours_time, ours_out, timed)
        results[mode].update(_given_our_caption(stock, ours, image, mode, settings, ours_out))

    # In fp16 the two captions may part at a near-tied token; the prompts then differ from there on.
    stock_caption = stock.generate_caption(image)

    chain_modes = {"best", "negative", "candidates"} & set(modes)
    components = _components(ours, image, device, reps, chain=bool(chain_modes))
    labels = {name: len(v) for name, v in ours.bank.tables.items()}
    payload: dict[str, Any] = {
        "benchmark": "interrogate",
        "environment": environment(device, load_at_start),
        "models": {
            "kind": models.kind,
            "clip": str(models.clip),
            "caption": str(models.caption),
            "precision": "fp16" if device.type == "cuda" else "fp32",
        },
        "settings": {
            "min_flavors": settings.min_flavors,
            "max_flavors": settings.max_flavors,
            "negative_max_flavors": settings.negative_max_flavors,
            "caption_max_tokens": settings.caption_max_tokens,
            "labels_dir": str(labels_dir) if labels_dir else "packaged",
            "warmup": args.warmup,
            "reps": reps,
        },
        "labels": {"total": len(ours.bank.labels), "tables": labels},
        "load_s": {
            "ours": ours_load.median_s,
            "ours_label_table": "built" if ours_built else "cached",
            "stock": stock_load.median_s,
            "stock_label_table": "built" if stock_built else "cached",
        },
        "first_fast_call_ms": first_call.median_s * 1000,
        "caption": caption,
        "stock_caption": stock_caption,
        "modes": results,
        "ours_components": components,
    }
    figures: dict[str, float] = {}
    for mode in HEADLINE_MODES:
        if mode in results:
            figures[f"{mode}_ms"] = results[mode]["ours_ms"]
    for mode in HEADLINE_MODES:
        if mode in results:
            figures[f"{mode}_ratio"] = results[mode]["ratio"]
    payload["headline"] = figures
    json_out = Path(args.json_out) if args.json_out else default_json_path("interrogate", device, models.kind)
    write_json(json_out, payload)
    _print_report(payload, json_out)
    print(headline(figures))
    return figures


def _parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="the real ViT-L-14 and BLIP-large architectures with random weights (built once, ~1.7 GB)",
    )
    parser.add_argument("--labels", help="a folder of short label lists (artists.txt, flavors.txt...); "
                        "default: clip-interrogator's packaged lists, ~106k labels")  # fmt: skip
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--reps", type=count, help="timed calls per mode (default 5 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=count_or_zero, default=1, help="untimed calls per mode first")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="models and label tables (reused)")
    parser.add_argument("--json-out", help="default: bench/results/interrogate-<device>.json")
    return parser


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"--modes takes some of {', '.join(MODES)} (got {text!r})")
    return modes


def _astronaut() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


def _stock(ours: Interrogator, settings: InterrogateSettings, labels_dir: Path | None, cache: Path) -> Any:
    """clip-interrogator's Interrogator around our very modules; it embeds its own label tables."""
    from clip_interrogator import Config
    from clip_interrogator import Interrogator as StockInterrogator

    kwargs: dict[str, Any] = {"data_path": str(labels_dir)} if labels_dir else {}
    config = Config(
        clip_model_name="ViT-L-14/openai",  # only its tokenizer is used: the standard CLIP BPE, as ours
        caption_max_length=settings.caption_max_tokens,
        download_cache=False,
        cache_path=str(cache),
        device=str(ours.clip.device),
        quiet=True,
        **kwargs,
    )
    config.clip_model, config.clip_preprocess = ours.clip.model, ours.clip.preprocess
    config.caption_model, config.caption_processor = ours.captioner.model, ours.captioner.processor
    return StockInterrogator(config)


def _stock_calls(stock: Any, image: Image.Image, s: InterrogateSettings) -> dict[str, Callable[[], Any]]:
    """The stock call behind each of our modes, with the same flavour counts."""
    return {
        "fast": lambda: stock.interrogate_fast(image, max_flavors=s.max_flavors),
        "classic": lambda: stock.interrogate_classic(image),
        "best": lambda: stock.interrogate(image, min_flavors=s.min_flavors, max_flavors=s.max_flavors),
        "negative": lambda: stock.interrogate_negative(image, max_flavors=s.negative_max_flavors),
        # Stock has no candidates mode; these two calls give it the same prompts.
        "candidates": lambda: (
            stock.interrogate(image, min_flavors=s.min_flavors, max_flavors=s.max_flavors),
            stock.interrogate_negative(image, max_flavors=s.negative_max_flavors),
        ),
    }


def _given_our_caption(
    stock: Any, ours: Interrogator, image: Image.Image, mode: str, s: InterrogateSettings, out: Interrogation
) -> dict[str, Any]:
    """Stock's prompt again (untimed) from our caption, so a caption that parted at a near-tied token does
    not hide whether the ranking agrees; when the prompts still differ, our prompt's CLIP score against the
    image minus stock's (both by the same CLIP): 0 or more means ours describes the image as well."""
    calls = {
        "fast": lambda: stock.interrogate_fast(image, max_flavors=s.max_flavors, caption=out.caption),
        "classic": lambda: stock.interrogate_classic(image, caption=out.caption),
        "best": lambda: stock.interrogate(
            image, min_flavors=s.min_flavors, max_flavors=s.max_flavors, caption=out.caption
        ),
    }
    if mode not in calls:
        return {}
    prompt = calls[mode]()
    found: dict[str, Any] = {"stock_prompt_given_our_caption": prompt, "same_prompt_given_our_caption": False}
    if prompt == out.prompt:
        found["same_prompt_given_our_caption"] = True
    else:
        feats = ours.features(image)
        found["score_lead_given_our_caption"] = ours.similarity(feats, out.prompt) - ours.similarity(
            feats, prompt
        )
    return found


def _mode_result(
    mode: str,
    stock_time: Measurement,
    stock_out: Any,
    ours_time: Measurement,
    ours_out: Interrogation,
    timed: Sequence[Interrogation],
) -> dict[str, Any]:
    ours_prompt = ours_out.negative if mode == "negative" else ours_out.prompt
    stock_prompt = stock_out if isinstance(stock_out, str) else None
    features = [r.timings_s["features_s"] for r in timed]
    prompts = [r.timings_s["prompt_s"] for r in timed]
    chain = next((c.prompt for c in ours_out.candidates if c.mode == "best"), None)
    return {
        "stock_ms": stock_time.median_s * 1e3,
        "ours_ms": ours_time.median_s * 1e3,
        "ratio": stock_time.median_s / ours_time.median_s,
        "stock_runs_ms": [t * 1e3 for t in stock_time.runs_s],
        "ours_runs_ms": [t * 1e3 for t in ours_time.runs_s],
        "ours_features_ms": sorted(features)[len(features) // 2] * 1e3,
        "ours_prompt_ms": sorted(prompts)[len(prompts) // 2] * 1e3,
        "stock_peak_gib": stock_time.peak_gib,
        "ours_peak_gib": ours_time.peak_gib,
        "same_prompt": None if stock_prompt is None else stock_prompt == ours_prompt,
        "stock_prompt": stock_out if stock_prompt is not None else list(stock_out),
        "ours_prompt": ours_prompt,
        # How many flavours our best chain appended: the chain's cost grows with it.
        "ours_chain_flavors": None if chain is None else chain.count(", ") - ours_out.caption.count(", "),
    }


def _components(
    ours: Interrogator, image: Image.Image, device: torch.device, reps: int, *, chain: bool
) -> dict[str, float]:
    """Where our time goes: caption, image embedding and, for the chain modes, one chain round."""
    captioner = ours.captioner
    caption_time, caption = measure(lambda: captioner.caption(image), device, warmup=1, reps=reps)
    image_time, _ = measure(lambda: ours.clip.encode_images([image]), device, warmup=0, reps=reps)
    parts = {
        "caption_ms": caption_time.median_s * 1e3,
        "caption_decoder": 1.0 if captioner.decoder is not None else 0.0,
        "caption_clip_tokens": float(int((ours.clip.tokenize([caption])[0] != 0).sum()) - 2),
        "image_embedding_ms": image_time.median_s * 1e3,
    }
    decoder = captioner.decoder
    if decoder is not None:
        # The same caption the stock way: transformers' generate() on the same model and pixels.
        inputs = captioner.processor(images=image, return_tensors="pt").to(device)
        pixels = inputs["pixel_values"].to(captioner.dtype)

        def vision() -> torch.Tensor:
            with torch.inference_mode():
                return captioner.model.vision_model(pixel_values=pixels)[0]

        def generate() -> list[int]:
            with torch.inference_mode():
                out = captioner.model.generate(pixel_values=pixels, max_new_tokens=captioner.max_new_tokens)
            return [int(t) for t in out[0]]

        generate_time, generated = measure(generate, device, warmup=1, reps=reps)
        vision_time, embeds = measure(vision, device, warmup=1, reps=reps)
        decode_time, decoded = measure(lambda: decoder.decode(embeds), device, warmup=1, reps=reps)
        parts["caption_generate_ms"] = generate_time.median_s * 1e3
        parts["caption_vision_ms"] = vision_time.median_s * 1e3
        parts["caption_decode_ms"] = decode_time.median_s * 1e3
        parts["caption_tokens"] = float(len(decoded) - 1)
        parts["caption_same_tokens"] = 1.0 if decoded == generated else 0.0
    if chain:
        # A chain round scores "prompt, label" for up to INTERMEDIATE_COUNT labels, starting from the
        # caption: the stock way (tokenize every text, encode at 77 tokens) against ours (composed tokens,
        # shared prefix).
        feats = ours.features(image)
        labels = ours.bank.tables["flavors"][:INTERMEDIATE_COUNT]
        texts = [f"{caption}, {label}" for label in labels]
        clip = ours.clip

        def stock_round() -> torch.Tensor:
            with torch.inference_mode():
                features = clip.model.encode_text(clip.tokenize(texts).to(clip.device)).float()
            return (features / features.norm(dim=-1, keepdim=True)) @ feats.embedding

        def ours_round() -> torch.Tensor:
            return clip.encode_extensions(caption, labels, ours.settings.label_batch_size) @ feats.embedding

        tokenize_time, tokens = measure(lambda: clip.tokenize(texts), device, warmup=0, reps=reps)
        stock_time, stock_sims = measure(stock_round, device, warmup=1, reps=reps)
        round_time, ours_sims = measure(ours_round, device, warmup=1, reps=reps)
        parts["chain_round_prompts"] = float(len(texts))
        parts["chain_round_stock_ms"] = stock_time.median_s * 1e3
        parts["chain_round_stock_tokenize_ms"] = tokenize_time.median_s * 1e3
        parts["chain_round_ms"] = round_time.median_s * 1e3
        parts["chain_round_max_abs_diff"] = float((stock_sims.float() - ours_sims.float()).abs().max())
        parts["chain_round_longest_tokens"] = float(int((tokens != 0).sum(dim=1).max()))
        parts["chain_round_prefix_tokens"] = float(len(clip.text.tokens.ids(caption)) + 2)
    return parts


def _print_report(payload: dict[str, Any], json_out: Path) -> None:
    env, models, load = payload["environment"], payload["models"], payload["load_s"]
    settings, labels = payload["settings"], payload["labels"]
    print(
        f"interrogation: stock clip-interrogator {env['versions']['clip-interrogator']} vs ours, "
        f"{models['kind']} models ({models['precision']}) on {env['device_name']} [{env['device']}], "
        f"{env['torch_threads']} threads, host load {env['load_average_at_start'][0]:.2f} at start"
    )
    print(
        f"labels: {labels['total']} ({settings['labels_dir']}); flavours {settings['min_flavors']}-"
        f"{settings['max_flavors']}, negative {settings['negative_max_flavors']}; caption up to "
        f"{settings['caption_max_tokens']} tokens; median of {settings['reps']} calls after "
        f"{settings['warmup']} warm-up"
    )
    print(
        f"load (excluded from calls): ours {load['ours']:.1f} s (label table {load['ours_label_table']}), "
        f"stock tables {load['stock']:.1f} s ({load['stock_label_table']})"
    )
    print(
        f"first fast call after load: {payload['first_fast_call_ms']:.1f} ms (untimed warm-ups follow; "
        "models.warm_up moves this to start-up)"
    )
    stock_caption = (
        "" if payload["stock_caption"] == payload["caption"] else f"; stock's: {payload['stock_caption']!r}"
    )
    print(f"caption: {payload['caption']!r}{stock_caption}")
    print()
    rows = []
    for mode, r in payload["modes"].items():
        same = {True: "yes", False: "no", None: "n/a"}[r["same_prompt"]]
        given = {True: "yes", False: "no", None: "n/a"}[r.get("same_prompt_given_our_caption")]
        if "score_lead_given_our_caption" in r:
            given += f" (ours {r['score_lead_given_our_caption']:+.1e})"
        rows.append(
            [
                mode,
                fmt(r["stock_ms"], 1),
                fmt(r["ours_ms"], 1),
                fmt(r["ratio"], 2),
                fmt(r["ours_features_ms"], 1),
                fmt(r["ours_prompt_ms"], 1),
                fmt(r["ours_peak_gib"], 2),
                same,
                given,
            ]
        )
    print_table(
        ["mode", "stock ms", "ours ms", "x stock", "ours caption+image ms", "ours prompt ms", "ours peak GiB",
         "same prompt", "same from our caption"],
        rows,
    )  # fmt: skip
    c = payload["ours_components"]
    print()
    print(
        f"ours, where the time goes: caption {c['caption_ms']:.1f} ms ({c['caption_clip_tokens']:.0f} CLIP "
        f"tokens), image embedding {c['image_embedding_ms']:.1f} ms"
    )
    if "caption_generate_ms" in c:
        print(
            f"caption: vision tower {c['caption_vision_ms']:.1f} ms, then {c['caption_tokens']:.0f} tokens "
            f"decoded in {c['caption_decode_ms']:.1f} ms; transformers' generate() on the same model "
            f"{c['caption_generate_ms']:.1f} ms in all, same tokens: "
            f"{'yes' if c['caption_same_tokens'] else 'no'}"
        )
    if "chain_round_ms" in c:
        print(
            f"one chain round over {c['chain_round_prompts']:.0f} prompts (caption + label): stock way "
            f"{c['chain_round_stock_ms']:.1f} ms (tokenizing {c['chain_round_stock_tokenize_ms']:.1f} ms, "
            f"every prompt at 77 tokens, the longest {c['chain_round_longest_tokens']:.0f}); ours "
            f"{c['chain_round_ms']:.1f} ms (the {c['chain_round_prefix_tokens']:.0f} shared tokens once); "
            f"largest score difference {c['chain_round_max_abs_diff']:.1e}"
        )
    print()
    print(f"JSON: {json_out}")


def _stamps(folder: Path) -> dict[str, int]:
    """Files and modification times under a cache folder, to tell a built table from a loaded one."""
    if not folder.is_dir():
        return {}
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _fingerprint(folder: Path) -> str:
    """Identify a model directory by its files' names, sizes and times (stock keys its cache by name)."""
    digest = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        digest.update(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


if __name__ == "__main__":
    main()
