"""Fidelity and prompt adherence per guide set, over folders of images the command line made.

    python bench/fidelity.py [--config PATH] [--models smoke] [--sources DIR]... [--json] IMAGES_DIR...

Reads every record `i2p2i generate` and `i2p2i imagine-from` wrote in the folders (STEM.json beside
STEM.1.png, STEM.2.png…; sub-folders too), groups the images by the guides they kept, names and weights
(`none`: the prompt alone), and scores each image with the interrogation CLIP of the configuration, loaded
as the engine loads it:

- fidelity: the cosine of the image's CLIP embedding with its source image's, the score the engine gives
  every result (i2p2i_bot/fidelity.py). It is taken here from the PNG where the engine took the decoded
  pixels, so it differs from the one the record holds by the PNG's rounding (and by the CLIP, when the
  configuration names another than the record);
- adherence: the cosine of the image's CLIP embedding with the text embedding of the prompt it was made
  with (its words: LoRA tags and emphasis taken out; CLIP reads the first 77 tokens).

Prints, per guide set, how many images and the mean ± sd of each score, then the headline line
(`none_fidelity=… none_adherence=… edges_0_8_fidelity=…`); --json prints one JSON object instead, with
every image's scores. A record's source is looked for where the record says (from the current folder,
then from the record's), then by its name in each --sources DIR, and used only when its sha256 is
the record's. A record, image or source that cannot be used is one line on stderr, and the exit code is 1;
the others are still scored. With the smoke models the scores are noise: they check the wiring.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from measure import environment, headline, print_table
from PIL import Image

from i2p2i_bot import progress_bars
from i2p2i_bot.config import ConfigError, Settings, load_settings
from i2p2i_bot.engine import load_clip
from i2p2i_bot.fidelity import adherence_scores, fidelity_scores
from i2p2i_bot.guides import Guide, guides_from_json, guides_json
from i2p2i_bot.images import ImageError, image_sha256, open_image
from i2p2i_bot.interrogate import ClipEncoder
from i2p2i_bot.models import ModelUnavailable
from i2p2i_bot.prompt_encoding import prompt_words

NONE = "none"


@dataclass(frozen=True)
class Made:
    """One image a record lists: its file, what it was made with, and the fidelity the record gives it."""

    path: Path
    record: Path
    guides: tuple[Guide, ...]
    prompt: str
    seed: int | None
    source_sha256: str | None
    recorded_fidelity: float | None

    @property
    def keep(self) -> str:
        """The guide set as the benchmarks write it: `edges:0.9+layout:0.6`, or `none`."""
        return "+".join(str(g) for g in self.guides) or NONE


@dataclass(frozen=True)
class Scored:
    """An image and its scores; fidelity is None where its record has no source, or the source is lost."""

    made: Made
    fidelity: float | None
    adherence: float


@dataclass
class Records:
    """What the folders hold: the images to score, where each source may be, and what could not be read."""

    images: list[Made]
    # Each source's sha256 → the paths it may be found at, in the order they are tried.
    sources: dict[str, list[Path]]
    # Per sha256, the record that named it first (for the sentence when it is not found).
    named_by: dict[str, Path]
    clips: set[str]
    generators: set[str]
    problems: list[str]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    progress_bars.only_on_a_terminal()
    load_at_start = os.getloadavg()
    settings = _settings(args)
    records = read_records([Path(f) for f in args.folders], [Path(d) for d in args.sources])
    for problem in records.problems:
        print(f"fidelity.py: {problem}", file=sys.stderr)
    if not records.images:
        raise SystemExit(
            f"no images to score in {', '.join(args.folders)}: no record (STEM.json) of "
            "`i2p2i generate` or `i2p2i imagine-from` lists a PNG there"
        )
    try:
        clip, clip_name = load_clip(settings)
    except ModelUnavailable as exc:
        raise SystemExit(str(exc)) from None
    embeddings, lost = source_embeddings(clip, records, settings)
    for problem in lost:
        print(f"fidelity.py: {problem}", file=sys.stderr)
    scored, unreadable = score(clip, records.images, embeddings, args.batch)
    for problem in unreadable:
        print(f"fidelity.py: {problem}", file=sys.stderr)
    sets = summarise(scored)
    figures = headline_figures(sets)
    notes = _notes(records, clip_name)
    if args.json:
        payload = {
            "benchmark": "fidelity",
            "clip": clip_name,
            "folders": list(args.folders),
            "notes": notes,
            "sets": sets,
            "images": [_image_json(s) for s in scored],
            "problems": [*records.problems, *lost, *unreadable],
            "headline": figures,
            "environment": environment(clip.device, load_at_start),
        }
        print(json.dumps(payload, indent=2))
    else:
        print(f"CLIP {clip_name} on {clip.device}: {len(scored)} images in {len(sets)} guide sets")
        for note in notes:
            print(f"note: {note}")
        print_table(
            ["keep", "n", "fidelity", "adherence"],
            [[s["keep"], str(s["images"]), _mean_sd(s["fidelity"]), _mean_sd(s["adherence"])] for s in sets],
        )
        print(headline(figures))
    return 1 if records.problems or lost or unreadable else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fidelity to the source and prompt adherence per guide set, over images `i2p2i "
        "generate`/`imagine-from` wrote."
    )
    parser.add_argument("folders", nargs="+", metavar="IMAGES_DIR", help="folders of records and PNGs")
    parser.add_argument("--config", metavar="PATH", help="settings file (TOML): its CLIP scores the images")
    parser.add_argument("--models", choices=("default", "smoke"), help="as the command line's --models")
    parser.add_argument("--device", help="e.g. cpu or cuda:0 (default: models.device)")
    parser.add_argument(
        "--sources",
        metavar="DIR",
        action="append",
        default=[],
        help="a folder to find the source images in by name, where the records' paths no longer lead "
        "(repeatable)",
    )
    parser.add_argument("--batch", type=int, default=16, help="images per CLIP batch (default 16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    try:
        settings = load_settings(args.config)
        if args.models:
            settings = settings.with_preset(args.models)
        if args.device:
            settings = replace(settings, models=replace(settings.models, device=args.device))
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    return settings


# --- reading --------------------------------------------------------------------------------------------


def read_records(folders: Sequence[Path], sources_dirs: Sequence[Path]) -> Records:
    """Every image the records in these folders (and their sub-folders) list; JSON files that are no
    record (no `prompt` and `images`) are passed over."""
    found = Records([], {}, {}, set(), set(), [])
    for folder in folders:
        if not folder.is_dir():
            found.problems.append(f"{folder}: not a folder")
            continue
        for path in sorted(folder.rglob("*.json")):
            _read_record(path, sources_dirs, found)
    return found


def _read_record(path: Path, sources_dirs: Sequence[Path], found: Records) -> None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        found.problems.append(f"{path}: cannot be read as JSON ({exc}); its images are left out")
        return
    if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)):
        return
    items = record.get("images")
    if not isinstance(items, list):
        return
    try:
        guides = guides_from_json(record.get("keep") or [])
    except (KeyError, TypeError, ValueError):
        found.problems.append(f"{path}: its `keep` is not a list of guides; its images are left out")
        return
    models = record.get("models")
    if isinstance(models, dict):
        if "clip" in models:
            found.clips.add(str(models["clip"]))
        if "generator" in models:
            found.generators.add(str(models["generator"]))
    sha = record.get("source_sha256") if isinstance(record.get("source_sha256"), str) else None
    if sha is not None:
        source = Path(str(record.get("source", "")))
        candidates = [source, path.parent / source, *(d / source.name for d in sources_dirs)]
        known = found.sources.setdefault(sha, [])
        known.extend(c for c in candidates if c not in known)
        found.named_by.setdefault(sha, path)
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("file"), str):
            found.problems.append(f"{path}: an image entry without a file name is left out")
            continue
        image = path.parent / item["file"]
        if not image.is_file():
            found.problems.append(f"{image}: listed in {path.name} but not there; left out")
            continue
        recorded = item.get("fidelity")
        found.images.append(
            Made(
                image,
                path,
                guides,
                record["prompt"],
                item.get("seed") if isinstance(item.get("seed"), int) else None,
                sha,
                float(recorded) if isinstance(recorded, int | float) else None,
            )
        )


# --- scoring --------------------------------------------------------------------------------------------


def source_embeddings(
    clip: ClipEncoder, records: Records, settings: Settings
) -> tuple[dict[str, tuple[float, ...]], list[str]]:
    """The CLIP embedding of each source the images were made from, as the interrogation makes it (the
    image decoded as an upload is), and a sentence for each source that is not found."""
    wanted = {m.source_sha256 for m in records.images if m.source_sha256 is not None}
    embeddings: dict[str, tuple[float, ...]] = {}
    lost = []
    for sha in sorted(wanted):
        image = _find_source(sha, records.sources[sha], settings)
        if image is None:
            tried = ", ".join(str(p) for p in records.sources[sha])
            lost.append(
                f"the source of {records.named_by[sha]} is not at {tried} with the sha256 it records "
                "(give its folder with --sources DIR); its images' fidelity is left out"
            )
            continue
        embeddings[sha] = tuple(clip.encode_images([image])[0].tolist())
    return embeddings, lost


def _find_source(sha: str, candidates: Sequence[Path], settings: Settings) -> Image.Image | None:
    for path in candidates:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if image_sha256(data) == sha:
            try:
                return open_image(data, settings.intake)
            except ImageError:
                return None
    return None


def score(
    clip: ClipEncoder, images: Sequence[Made], sources: dict[str, tuple[float, ...]], batch: int
) -> tuple[list[Scored], list[str]]:
    """Each image's fidelity (where its source is known) and adherence, `batch` images per CLIP call."""
    scored: list[Scored] = []
    unreadable: list[str] = []
    for start in range(0, len(images), max(1, batch)):
        chunk, pictures = [], []
        for made in images[start : start + batch]:
            try:
                with Image.open(made.path) as png:
                    pictures.append(png.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                unreadable.append(f"{made.path}: not a readable image ({exc}); left out")
                continue
            chunk.append(made)
        if not chunk:
            continue
        embeds = clip.encode_images(pictures)
        adherence = adherence_scores(embeds, clip.encode_texts([prompt_words(m.prompt) for m in chunk]))
        with_source = [i for i, m in enumerate(chunk) if m.source_sha256 in sources]
        fidelity: list[float | None] = [None] * len(chunk)
        if with_source:
            rows = embeds[torch.tensor(with_source)]
            kept = [sources[str(chunk[i].source_sha256)] for i in with_source]
            for i, value in zip(with_source, fidelity_scores(rows, kept), strict=True):
                fidelity[i] = value
        scored.extend(Scored(m, f, a) for m, f, a in zip(chunk, fidelity, adherence, strict=True))
    return scored, unreadable


# --- reporting ------------------------------------------------------------------------------------------


def summarise(scored: Sequence[Scored]) -> list[dict[str, Any]]:
    """One entry per guide set, `none` first, the others by name: n, and each score's n, mean and sd."""
    groups: dict[str, list[Scored]] = {}
    for s in scored:
        groups.setdefault(s.made.keep, []).append(s)
    order = sorted(groups, key=lambda label: (label != NONE, label))
    return [
        {
            "keep": label,
            "guides": guides_json(groups[label][0].made.guides),
            "images": len(groups[label]),
            "fidelity": _stats([s.fidelity for s in groups[label] if s.fidelity is not None]),
            "adherence": _stats([s.adherence for s in groups[label]]),
        }
        for label in order
    ]


def _stats(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "mean": None, "sd": None}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"n": len(values), "mean": round(statistics.fmean(values), 6), "sd": round(sd, 6)}


def headline_figures(sets: Sequence[dict[str, Any]]) -> dict[str, float]:
    """`<set>_fidelity` and `<set>_adherence` means, the set written as a key (`edges:0.8` → `edges_0_8`)."""
    figures = {}
    for s in sets:
        key = re.sub(r"[^a-z0-9]+", "_", s["keep"].lower()).strip("_")
        for score_name in ("fidelity", "adherence"):
            if s[score_name]["mean"] is not None:
                figures[f"{key}_{score_name}"] = s[score_name]["mean"]
    return figures


def _mean_sd(stats: dict[str, Any]) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"


def _notes(records: Records, clip_name: str) -> list[str]:
    """What a reader of the figures should know about where the images come from."""
    notes = []
    others = sorted(records.clips - {clip_name})
    if others:
        notes.append(
            f"the records were scored with {', '.join(others)}; these figures use {clip_name}, so their "
            "fidelity is not the recorded one"
        )
    if len(records.generators) > 1:
        notes.append(f"the images come from {len(records.generators)} generators: "
                     f"{', '.join(sorted(records.generators))}")  # fmt: skip
    return notes


def _image_json(s: Scored) -> dict[str, Any]:
    return {
        "file": str(s.made.path),
        "record": str(s.made.record),
        "keep": s.made.keep,
        "prompt": s.made.prompt,
        "seed": s.made.seed,
        "fidelity": None if s.fidelity is None else round(s.fidelity, 6),
        "recorded_fidelity": s.made.recorded_fidelity,
        "adherence": round(s.adherence, 6),
    }


if __name__ == "__main__":
    raise SystemExit(main())
