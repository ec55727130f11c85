"""The command line: describe images, generate from prompts, and the image → prompt → images batch flow."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, get_args

from PIL import Image, PngImagePlugin

from i2p2i_bot import __version__
from i2p2i_bot.backup import BackupError, backup_database
from i2p2i_bot.config import ConfigError, InterrogateMode, Settings, load_settings
from i2p2i_bot.guides import GUIDE_KINDS, Guide, GuideError, fitting, guides_json, parse_guides
from i2p2i_bot.health import HEALTH_FILE, STALE_AFTER_S, check_health
from i2p2i_bot.images import ImageError, check_declared, check_image, image_sha256, open_image
from i2p2i_bot.progress_bars import disable_library_bars, is_terminal
from i2p2i_bot.prompt_edits import edit_prompt
from i2p2i_bot.terms import BannedTerms

# The model modules import torch (seconds of start-up): the commands that need them import them, so
# `i2p2i health`, which Docker runs every 30 s, and `i2p2i backup` start at once.
if TYPE_CHECKING:
    from i2p2i_bot.batches import BatchResult, GeneratedImage
    from i2p2i_bot.engine import Engine
    from i2p2i_bot.interrogate import Interrogator
    from i2p2i_bot.interrogation import Interrogation
    from i2p2i_bot.loras import LoraLibrary
    from i2p2i_bot.request import GenerationParams, GenerationRequest

MODES: tuple[str, ...] = get_args(InterrogateMode)

log = logging.getLogger("i2p2i")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


class InputError(Exception):
    """One input cannot be used; the message is one line, and the other inputs go on."""


class UsageError(Exception):
    """The command as given cannot run (an option's value); the message is one line, and nothing runs."""


def _global_options() -> argparse.ArgumentParser:
    """Options taken before or after the command (`--models smoke describe x`, `describe x --models smoke`).

    Their defaults are suppressed here, so a value given after the command wins and one given before it
    is not overwritten by the subcommand's defaults.
    """
    options = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    options.add_argument("--config", metavar="PATH", help="settings file (TOML); see config.example.toml")
    options.add_argument(
        "--models",
        choices=("default", "smoke"),
        help="'smoke' uses tiny random models to check an install (noise images); default: from the config",
    )
    options.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    options.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return options


def build_parser() -> argparse.ArgumentParser:
    common = _global_options()
    parser = argparse.ArgumentParser(
        prog="i2p2i",
        description="Image → prompt → image with CLIP Interrogator and Stable Diffusion.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"i2p2i {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    describe = sub.add_parser("describe", help="turn images into prompts", parents=[common])
    describe.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    describe.add_argument("--mode", choices=MODES, help="prompt style (default: from the config, 'best')")
    describe.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    _add_model_option(describe)

    generate = sub.add_parser("generate", help="make images from a prompt", parents=[common])
    generate.add_argument("prompt")
    generate.add_argument(
        "--source", metavar="IMAGE", help="the image whose elements --keep keeps (needs --keep)"
    )
    _add_generation_options(generate)

    imagine = sub.add_parser(
        "imagine-from", help="image → prompt → edited prompt → new images, for each image", parents=[common]
    )
    imagine.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders of images")
    imagine.add_argument("--mode", choices=MODES, help="prompt style (default: from the config, 'best')")
    imagine.add_argument("--append", metavar="TEXT", help="add this to every prompt")
    imagine.add_argument(
        "--remove",
        metavar="TERM",
        action="append",
        default=[],
        help="remove this word or phrase (repeatable)",
    )
    imagine.add_argument("--prompt", metavar="TEXT", help="use this prompt instead of the interrogated one")
    _add_generation_options(imagine)

    download = sub.add_parser(
        "download-models",
        help="fetch the configured models and every preset's into the Hugging Face cache",
        parents=[common],
    )
    download.add_argument(
        "--describe-only",
        action="store_true",
        help="only what a bot whose images GPU workers make loads (queue.backend redis): CLIP and caption",
    )
    sub.add_parser(
        "models",
        help="list the model presets, what each needs, and whether its weights are on this machine",
        parents=[common],
    )

    loras = sub.add_parser(
        "loras",
        help="list the LoRAs of models.lora_dir, which prompts name with <lora:NAME:WEIGHT>",
        parents=[common],
    )
    loras.add_argument("--json", action="store_true", help="one JSON object per LoRA, one per line")

    health = sub.add_parser(
        "health",
        help="check the running bot's heartbeat: exit 0 when it is healthy, 1 (with the reason) when not",
        parents=[common],
    )
    health.add_argument(
        "--file", metavar="PATH", help=f"the heartbeat file (default: DATA_DIR/{HEALTH_FILE})"
    )
    health.add_argument(
        "--max-age",
        metavar="S",
        type=float,
        default=STALE_AFTER_S,
        help=f"oldest heartbeat that counts as alive, in seconds (default {STALE_AFTER_S:.0f})",
    )

    backup = sub.add_parser(
        "backup",
        help="copy the database consistently, even while the bot runs, and check the copy",
        parents=[common],
    )
    backup.add_argument("dest", metavar="DEST", help="a new file, or a folder to put a dated copy in")

    worker = sub.add_parser(
        "worker",
        help="make the images of a bot with queue.backend = 'redis' on this machine's GPU (one per GPU)",
        parents=[common],
    )
    worker.add_argument(
        "--redis", metavar="URL", help="the bot's Redis server (default: I2P2I_REDIS_URL or queue.redis_url)"
    )
    worker.add_argument("--device", help="the GPU to use, e.g. cuda:1 (default: models.device)")
    return parser


def _add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="the model preset (`i2p2i models` lists them; default: models.default_preset)",
    )


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    _add_model_option(parser)
    parser.add_argument("-n", "--count", type=int, default=1, help="images per prompt (default 1)")
    parser.add_argument("--seed", type=int, help="first seed; image k uses seed+k (default: random)")
    parser.add_argument("--negative", metavar="TEXT", help="negative prompt (default: from the config)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: from the config, 25)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--width", type=int, help="image width, a multiple of 8 (default 512)")
    parser.add_argument("--height", type=int, help="image height, a multiple of 8 (default 512)")
    parser.add_argument(
        "--scheduler", choices=("dpm", "pndm"), help="dpm (fast, default) or pndm (the original)"
    )
    kinds = ", ".join(
        f"{k.name} ({k.keeps}; weight in {k.weight_range}, default {k.default_weight:g})"
        for k in GUIDE_KINDS.values()
    )
    parser.add_argument(
        "--keep",
        metavar="NAME[:WEIGHT],...",
        help=f"keep elements of the source image besides what the prompt says: {kinds}; "
        "e.g. edges:0.9,layout",
    )
    parser.add_argument(
        "--out", metavar="DIR", default="out", help="where to write images and JSON (default ./out)"
    )


GLOBAL_DEFAULTS = {"config": None, "models": None, "verbose": False, "quiet": False}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    # Filled in afterwards: the option actions are shared with the subcommands, so defaults set on the
    # top-level parser would overwrite a value given before the command.
    for key, value in GLOBAL_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # A handler of our own for this run, removed afterwards, so main() can also be called as a function.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        return _run(args)
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


# Commands that never load a model: they skip the model libraries' start-up cost (health runs every 30 s).
OPERATIONS_COMMANDS = ("health", "backup", "loras")


def _run(args: argparse.Namespace) -> int:
    progress = not args.quiet and is_terminal(sys.stderr)
    if args.command not in (*OPERATIONS_COMMANDS, "worker"):  # a worker does this when it loads its models
        _prepare_libraries(args, progress)
    try:
        settings = load_settings(args.config)
        if args.models:
            settings = settings.with_preset(args.models)
    except ConfigError as exc:
        print(f"i2p2i: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "health":
        return _health(settings, args)
    if args.command == "backup":
        return _backup(settings, args)
    if args.command == "loras":
        return _loras(settings, args)
    if args.command == "worker":
        return _worker(settings, args)
    from i2p2i_bot.models import ModelUnavailable
    from i2p2i_bot.request import GenerationError

    try:
        if args.command == "download-models":
            return _download(settings, describe_only=args.describe_only)
        if args.command == "models":
            return _models(settings)
        if args.command == "describe":
            return _describe(settings, args, progress)
        if args.command == "generate":
            return _generate(settings, args, progress)
        return _imagine_from(settings, args, progress)
    except (ModelUnavailable, UsageError) as exc:
        print(f"i2p2i: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except GenerationError as exc:
        print(f"i2p2i: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("i2p2i: interrupted", file=sys.stderr)
        return 130


# --- commands -------------------------------------------------------------------------------------------


def _download(settings: Settings, *, describe_only: bool = False) -> int:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        print("i2p2i: HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it first", file=sys.stderr)
        return EXIT_USAGE
    from i2p2i_bot.models import download_models, resolve_models, resolve_presets

    sources = resolve_models(settings)
    try:
        lines = download_models(
            sources,
            safety_checker=settings.generate.safety_checker,
            presets=resolve_presets(settings),
            describe_only=describe_only,
        )
        for line in lines:
            print(line)
    except Exception as exc:  # network and hub errors come in many types; the message is what matters
        print(f"i2p2i: download failed: {exc}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return EXIT_OK


def _models(settings: Settings) -> int:
    """One paragraph per preset: its family, generator, CLIP, default size and steps, and what is missing."""
    from i2p2i_bot.models import ModelUnavailable, check_preset, resolve_presets

    presets = resolve_presets(settings)
    missing = 0
    for preset in presets:
        try:
            check_preset(preset, safety_checker=preset.generate.safety_checker)
            state = "weights present"
        except ModelUnavailable as exc:
            missing += 1
            state = f"missing: {exc}"
        default = " (default)" if preset.name == presets.default else ""
        g = preset.generate
        print(f"{preset.name}{default}: {preset.family}, {g.width}x{g.height}, {g.steps} steps, {state}")
        print(f"  generator: {preset.generator}")
        if preset.single_file:
            print(f"  config: {preset.config}")
        print(f"  clip: {preset.clip}")
        if not preset.safety_checker:
            print("  no safety checker")
    return EXIT_SOME_FAILED if missing else EXIT_OK


def _health(settings: Settings, args: argparse.Namespace) -> int:
    if args.max_age <= 0:
        print("i2p2i: --max-age must be a positive number of seconds", file=sys.stderr)
        return EXIT_USAGE
    path = Path(args.file) if args.file else settings.data_path / HEALTH_FILE
    report = check_health(path, stale_after_s=args.max_age)
    if report.healthy:
        print(report.reason)
        return EXIT_OK
    print(f"i2p2i: unhealthy: {report.reason}", file=sys.stderr)
    return EXIT_SOME_FAILED


def _backup(settings: Settings, args: argparse.Namespace) -> int:
    try:
        result = backup_database(
            settings.database_path, args.dest, busy_timeout_ms=settings.store.busy_timeout_ms
        )
    except BackupError as exc:
        print(f"i2p2i: {exc}", file=sys.stderr)
        return EXIT_SOME_FAILED
    print(
        f"{result.source} → {result.dest} ({result.size_bytes} bytes, schema version "
        f"{result.schema_version}, integrity ok)"
    )
    return EXIT_OK


def _loras(settings: Settings, args: argparse.Namespace) -> int:
    library = _lora_library(settings)
    offered = library.available()
    if not offered and not args.json:
        where = settings.models.lora_dir or "nowhere: models.lora_dir is not set"
        print(f"no LoRAs in {where}", file=sys.stderr)
    for lora in offered:
        if args.json:
            record = {
                "name": lora.name,
                "tag": f"<lora:{lora.name}:1>",
                "file": str(lora.path),
                "sha256": library.sha256(lora.path),
                "family": lora.family,
                "trigger_words": list(lora.trigger_words),
            }
            print(json.dumps(record))
        else:
            family = f"  ({lora.family})" if lora.family else ""
            words = f"  trigger words: {', '.join(lora.trigger_words)}" if lora.trigger_words else ""
            print(f"<lora:{lora.name}:1>{family}{words}")
    return EXIT_OK


def _lora_library(settings: Settings, family: str = "sd1") -> LoraLibrary:
    from i2p2i_bot.loras import LoraLibrary

    models = settings.models
    return LoraLibrary(models.lora_dir, max_per_prompt=models.max_loras, family=family)


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    url = args.redis or settings.queue.redis_url
    if not url.startswith(("redis://", "rediss://", "unix://")):
        print("i2p2i: worker needs the bot's Redis server: --redis URL or I2P2I_REDIS_URL", file=sys.stderr)
        return EXIT_USAGE
    if args.device:
        settings = replace(settings, models=replace(settings.models, device=args.device))
    from i2p2i_bot.remote_worker import run_worker

    progress = not args.quiet and is_terminal(sys.stderr)
    try:
        return run_worker(settings, url, prepare=lambda: _prepare_libraries(args, progress))
    except Exception as exc:
        # Imported only now: the model modules import torch, which a worker imports only to load models.
        from i2p2i_bot.models import ModelUnavailable

        if not isinstance(exc, ModelUnavailable):
            raise
        print(f"i2p2i: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _describe(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    from i2p2i_bot.interrogate import InterrogateError

    mode = args.mode or settings.interrogate.mode
    sources, failed = _check_inputs(args.images, settings)
    if not sources:
        return EXIT_SOME_FAILED
    from i2p2i_bot.models import resolve_presets

    resolve_presets(settings).get(args.model)  # an unknown preset costs no model load
    interrogator = _load_interrogator(settings, progress, args.model)
    for path in _progress(sources, progress, "Describing"):
        try:
            image, sha = _read_image(path, settings)
            result = interrogator.interrogate(image, mode, key=sha)
        except (InputError, ImageError, InterrogateError) as exc:
            failed += 1
            _fail(path, exc)
            continue
        if args.json:
            print(json.dumps({"source": str(path), "source_sha256": sha, **_interrogation_json(result)}))
        else:
            _print_interrogation(path, result, sys.stdout)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def _generate(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    banned = BannedTerms.from_settings(settings.interrogate)
    _refuse_banned(banned, args.prompt, "prompt")
    # Everything is checked before the models load, so a typo costs nothing.
    keep = _check_request(settings, args, args.prompt, has_source=args.source is not None)
    if args.source is not None and not keep:
        raise UsageError("--source is the image --keep keeps elements of; add --keep NAME[:WEIGHT],...")
    out = _check_out(Path(args.out))
    source = None
    if args.source is not None:
        try:
            image, source = _read_image(Path(args.source), settings)
        except (InputError, ImageError) as exc:
            raise UsageError(f"--source {args.source}: {exc}") from None
    engine = _load_engine(settings, progress, args.model)
    request = _request(args, args.prompt)
    if source is not None:
        engine.source_images.hold(source, image)
        request = replace(request, keep=keep, guide_source=source)
    params, result = _run_generation(engine, request, None, progress, "Generating")
    out.mkdir(parents=True, exist_ok=True)
    stem = _unique_stem(out, _slug(args.prompt))
    files = _write_images(out, stem, result.images, engine.models_for(params.preset), params)
    record = {
        "prompt": request.prompt,
        **({"source": args.source, "source_sha256": source} if source is not None else {}),
        **_result_json(engine, params, result, files),
        "created_at": _now(),
    }
    (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path in files:
        print(path)
    return EXIT_OK


def _imagine_from(settings: Settings, args: argparse.Namespace, progress: bool) -> int:
    from i2p2i_bot.interrogate import InterrogateError
    from i2p2i_bot.request import GenerationError

    mode = args.mode or settings.interrogate.mode
    banned = BannedTerms.from_settings(settings.interrogate)
    for text, label in ((args.prompt, "prompt"), (args.append, "appended text"), (args.negative, "negative")):
        if text:
            _refuse_banned(banned, text, label)
    # Everything is checked before the models load, so a typo costs nothing: the options first (a usage
    # error stops the command), then every input (a bad one is reported and the others go on).
    keep = _check_request(
        settings, args, "placeholder" if args.prompt is None else args.prompt, has_source=True
    )
    out = _check_out(Path(args.out))
    sources, failed = _check_inputs(args.images, settings)
    if not sources:
        return EXIT_SOME_FAILED
    engine = _load_engine(settings, progress, args.model)
    for path in _progress(sources, progress, "Images"):
        try:
            image, sha = _read_image(path, settings)
            interrogation = engine.interrogate(image, mode, key=sha, preset=args.model)
            original = interrogation.image_prompts[0]
            prompt = (
                args.prompt
                if args.prompt is not None
                else edit_prompt(original, append=args.append, remove=args.remove)
            )
            found = banned.find(prompt)
            if found:
                raise InputError(
                    f"the prompt contains banned terms ({', '.join(found)}); nothing was generated"
                )
            request = _request(args, prompt)
            if args.negative is None and interrogation.image_negative is not None:
                request = replace(request, negative_prompt=interrogation.image_negative)
            if keep:
                engine.source_images.hold(sha, image)
                request = replace(request, keep=keep, guide_source=sha)
            params, result = _run_generation(
                engine, request, interrogation.image_embedding, progress, path.name
            )
        except (InputError, ImageError, InterrogateError, GenerationError) as exc:
            failed += 1
            _fail(path, exc)
            continue
        out.mkdir(parents=True, exist_ok=True)
        stem = _unique_stem(out, _slug(path.stem))
        files = _write_images(out, stem, result.images, engine.models_for(params.preset), params)
        record = {
            "source": str(path),
            "source_sha256": sha,
            "mode": mode,
            "original_prompt": original,
            "prompt": prompt,
            "edits": {"append": args.append, "remove": args.remove, "prompt": args.prompt},
            "interrogation": _interrogation_json(interrogation),
            **_result_json(engine, params, result, files),
            "created_at": _now(),
        }
        (out / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for warning in result.warnings:
            print(f"warning: {path}: {warning}", file=sys.stderr)
        print(f"{path} → {out / (stem + '.json')} ({len(files)} images)")
    return EXIT_SOME_FAILED if failed else EXIT_OK


# --- prompt editing -------------------------------------------------------------------------------------


# --- helpers --------------------------------------------------------------------------------------------


def _load_engine(settings: Settings, progress: bool, preset: str | None) -> Engine:
    from i2p2i_bot.engine import Engine

    if settings.generate.compile == "auto":
        # "auto" compiles for the long-running bot; a command's few batches would wait minutes for it.
        settings = replace(settings, generate=replace(settings.generate, compile="off"))
    return Engine.load(settings, progress=progress, preset=preset)


def _load_interrogator(settings: Settings, progress: bool, preset: str | None) -> Interrogator:
    from i2p2i_bot.engine import load_interrogator

    return load_interrogator(settings, progress=progress, preset=preset)


def _check_inputs(items: Sequence[str], settings: Settings) -> tuple[list[Path], int]:
    """The image files to work on, each checked as far as it can be without decoding its pixels, and how
    many inputs failed; each failure prints one line."""
    usable: list[Path] = []
    failed = 0
    for item in items:
        try:
            paths = _expand_input(Path(item))
        except InputError as exc:
            failed += 1
            _fail(Path(item), exc)
            continue
        for path in paths:
            try:
                check_image(_read_bytes(path, settings), settings.intake)
            except (InputError, ImageError) as exc:
                failed += 1
                _fail(path, exc)
                continue
            usable.append(path)
    return usable, failed


def _expand_input(path: Path) -> list[Path]:
    """A file as given, or the images inside a folder (not recursive), sorted by name."""
    if not path.is_dir():
        if not path.exists():
            raise InputError("no such file or folder")
        if not path.is_file():
            raise InputError("not a file or a folder")  # a pipe or a device would block or never end
        return [path]
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise InputError(f"no images in this folder (files ending in {suffixes})")
    return images


def _read_bytes(path: Path, settings: Settings) -> bytes:
    try:
        # The size cap is checked before reading, so a huge file costs nothing.
        check_declared(path.stat().st_size, None, None, None, settings.intake)
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError("no such file") from None
    except IsADirectoryError:
        raise InputError("is a folder with no images") from None
    except PermissionError:
        raise InputError("permission denied") from None


def _read_image(path: Path, settings: Settings) -> tuple[Image.Image, str]:
    data = _read_bytes(path, settings)
    return open_image(data, settings.intake), image_sha256(data)


def _check_out(out: Path) -> Path:
    """--out as given, once it is a folder that can be written to or created; nothing is created yet, so a
    command that makes nothing leaves nothing behind."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: no permission to write in {existing}")
    return out


def _request(args: argparse.Namespace, prompt: str) -> GenerationRequest:
    from i2p2i_bot.request import GenerationRequest

    return GenerationRequest(
        prompt,
        negative_prompt=args.negative,
        count=args.count,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        preset=args.model,
    )


def _check_request(
    settings: Settings, args: argparse.Namespace, prompt: str, *, has_source: bool
) -> tuple[Guide, ...]:
    """The options checked as plan() will check them, before any model loads; returns --keep's guides."""
    from i2p2i_bot.models import resolve_presets
    from i2p2i_bot.request import plan

    preset = resolve_presets(settings).get(args.model)
    keep: tuple[Guide, ...] = ()
    if args.keep is not None:
        try:
            keep = parse_guides(args.keep)
        except GuideError as exc:
            raise UsageError(f"--keep: {exc}") from None
        if not has_source:
            raise UsageError("--keep needs a source image: give one with --source IMAGE")
    # A stand-in for the source's hash: the image itself is read later, with the others.
    request = replace(_request(args, prompt), keep=keep, guide_source="0" * 64 if keep else None)
    guides = fitting(settings.guides.enabled, preset.family)
    plan(request, preset.generate, "check", guides, _lora_library(settings, preset.family), preset.name)
    return keep


def _run_generation(
    engine: Engine,
    request: GenerationRequest,
    source_embedding: tuple[float, ...] | None,
    progress: bool,
    label: str,
) -> tuple[GenerationParams, BatchResult]:
    params = engine.plan(request).params  # validate before showing a bar
    bar = None
    if progress:
        from tqdm import tqdm

        steps = request.steps or engine.settings.generate.steps
        batches = -(-request.count // engine.settings.queue.max_batch_images)
        bar = tqdm(total=steps * batches, desc=label, unit="step", leave=False)

    def on_step(step: int, total: int) -> None:
        if bar is not None:
            bar.update(1)

    try:
        return params, engine.generate(request, source_embedding=source_embedding, on_step=on_step)
    finally:
        if bar is not None:
            bar.close()


def _write_images(
    out: Path,
    stem: str,
    images: Sequence[GeneratedImage],
    models: dict[str, str],
    params: GenerationParams,
) -> list[Path]:
    files = []
    digits = len(str(len(images)))  # 01..12, so that a folder listing keeps the images in order
    for k, item in enumerate(images, start=1):
        path = out / f"{stem}.{k:0{digits}d}.png"
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", json.dumps(_png_parameters(item, models, params)))
        tmp = path.with_suffix(".png.tmp")
        item.image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
        files.append(path)
    return files


def _png_parameters(item: GeneratedImage, models: dict[str, str], params: GenerationParams) -> dict[str, Any]:
    from i2p2i_bot.loras import loras_json

    parameters: dict[str, Any] = {
        "prompt": item.spec.prompt,
        "negative_prompt": item.spec.negative_prompt,
        "seed": item.spec.seed,
        "generator": models.get("generator"),
    }
    if params.keep:
        parameters["keep"] = guides_json(params.keep)
        parameters["guide_source_sha256"] = item.spec.guide_source
    if params.loras:
        parameters["loras"] = loras_json(params.loras)
    return parameters


def _result_json(
    engine: Engine, params: GenerationParams, result: BatchResult, files: Sequence[Path]
) -> dict[str, Any]:
    first = result.images[0].spec if result.images else None
    images = [
        {
            "file": path.name,
            "seed": item.spec.seed,
            "nsfw": item.nsfw,
            "fidelity": None if item.fidelity is None else round(item.fidelity, 6),
        }
        for path, item in zip(files, result.images, strict=True)
    ]
    ranked = sorted(
        (i for i in images if i["fidelity"] is not None), key=lambda i: -float(i["fidelity"] or 0.0)
    )
    from i2p2i_bot.loras import loras_json

    guide_models = engine.guides.recorded
    return {
        "negative_prompt": first.negative_prompt if first else "",
        # (An upscale is a result's control in Discord; the command line makes none.)
        "params": {k: v for k, v in asdict(params).items() if k not in ("model", "keep", "loras", "upscale")},
        # What the images keep of the source besides the prompt, each guide with its weight (and the
        # model its weights come from, where it has its own).
        "keep": [
            {**entry, **({"model": guide_models[g.name]} if g.name in guide_models else {})}
            for g, entry in zip(params.keep, guides_json(params.keep), strict=True)
        ],
        # The LoRAs the prompt named, each with its weight and its file's sha256.
        "loras": loras_json(params.loras),
        "models": engine.models_for(params.preset),
        "smoke": engine.sources.smoke,
        "images": images,
        "by_fidelity": [i["file"] for i in ranked],
        "warnings": list(result.warnings),
        "timings_s": {k: round(v, 4) for k, v in result.timings_s.items()},
    }


def _interrogation_json(result: Interrogation) -> dict[str, Any]:
    return {
        "mode": result.mode,
        "prompt": result.prompt,
        "score": round(result.score, 6),
        "caption": result.caption,
        "negative": result.negative,
        "candidates": [
            {"mode": c.mode, "prompt": c.prompt, "score": round(c.score, 6)} for c in result.candidates
        ],
        "models": result.models,
        "timings_s": {k: round(v, 4) for k, v in result.timings_s.items()},
    }


def _print_interrogation(path: Path, result: Interrogation, stream: TextIO) -> None:
    print(f"{path}:", file=stream)
    if result.mode in ("candidates", "best") and len(result.candidates) > 1:
        for c in result.candidates:
            print(f"  [{c.mode:9s} {c.score:+.3f}] {c.prompt}", file=stream)
    else:
        print(f"  [{result.mode} {result.score:+.3f}] {result.prompt}", file=stream)
    if result.negative and result.mode != "candidates":
        print(f"  negative: {result.negative}", file=stream)


def _refuse_banned(banned: BannedTerms, text: str, label: str) -> None:
    from i2p2i_bot.request import GenerationError

    found = banned.find(text)
    if found:
        raise GenerationError(
            f"The {label} contains banned terms ({', '.join(found)}); remove them and try again."
        )


def _fail(path: Path, exc: Exception) -> None:
    print(f"i2p2i: {path}: {exc}", file=sys.stderr)


def _progress(items: list[Path], enabled: bool, desc: str) -> Any:
    if not enabled or len(items) < 2:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="image")


def _slug(text: str, limit: int = 40) -> str:
    """A file name made of lower-case letters, digits and '-' only (see _unique_stem)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return slug[:limit].rstrip("-") or "image"


def _unique_stem(out: Path, slug: str) -> str:
    """The name of one record (STEM.json) and its images (STEM.1.png...), unused in this folder so far.

    The first record of a slug takes the slug itself, later ones (another run, or another source with the
    same name) SLUG_2, SLUG_3...: a slug never holds '_' or '.', so `cat_2.json` is always the second record
    named cat and `cat.2.png` always cat's second image, whatever the sources are called, and one record's
    files can never be taken for another's.
    """
    stem, n = slug, 1
    while (out / f"{stem}.json").exists() or any(out.glob(f"{stem}.*.png")):
        n += 1
        stem = f"{slug}_{n}"
    return stem


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _prepare_libraries(args: argparse.Namespace, progress: bool) -> None:
    """Before models load: the libraries' chatter off unless --verbose, their bars off without a terminal."""
    if not args.verbose:
        _quiet_libraries()
    if not progress:
        # Bars redrawn into a file or a pipe are carriage returns and escape codes, even with --verbose.
        disable_library_bars()


def _quiet_libraries() -> None:
    """Keep library chatter (load bars, deprecation notes) off a user's terminal unless --verbose."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    disable_library_bars()


if __name__ == "__main__":
    raise SystemExit(main())
