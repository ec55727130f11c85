"""LoRAs: the folder they come from, A1111's `<lora:NAME:WEIGHT>` in prompts, and the set a request uses.

A prompt names LoRAs as A1111 does: `<lora:NAME>` (weight 1) or `<lora:NAME:WEIGHT>`, NAME being a file's
name without `.safetensors` in `models.lora_dir` (any case). The tags stay in the prompt a job records, as
A1111 keeps them in its parameters, and are taken out of the text before it is encoded (`strip_tags`).

Planning turns the tags into the request's LoRA set: each name with its weight and its file's sha256, so a
job can be made again exactly, and a file that changed or went since refuses to stand in for the one that
was used. The set is part of the batch key, so images with different sets never share a GPU batch.

Nothing here imports torch: the library is read from the files' safetensors headers alone; the GPU side
(lora_adapters.py) loads the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from i2p2i_bot.i18n import tr

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# Weights a prompt may give a LoRA: A1111 takes negatives too (a "slider" LoRA turned the other way).
MIN_WEIGHT, MAX_WEIGHT = -3.0, 3.0
# `<lora:NAME>` or `<lora:NAME:WEIGHT>`; A1111's second weight (`<lora:NAME:TE:UNET>`) is read as an error.
_TAG = re.compile(r"<lora:([^:<>]*)(?::([^<>]*))?>", re.IGNORECASE)
# The most a safetensors header may take (the safetensors library's own limit).
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Trigger words listed per LoRA when they come from its training tags.
TRIGGER_WORDS = 6
_HASH_CHUNK = 1024 * 1024
# What a LoRA's metadata says it was trained on, as the families of Stable Diffusion the generator knows.
_FAMILIES = (
    ("sdxl", ("sdxl", "stable-diffusion-xl")),
    ("sd2", ("sd_v2", "stable-diffusion-v2", "sd2")),
    ("sd1", ("sd_v1", "stable-diffusion-v1", "sd1")),
)
FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}


class LoraError(Exception):
    """A LoRA a member named that cannot be used; the message is one sentence for them."""


@dataclass(frozen=True)
class Lora:
    """One LoRA of a request: its name, how strongly it applies, and the sha256 of the file it came from."""

    name: str
    weight: float
    sha256: str


@dataclass(frozen=True)
class LoraFile:
    """A LoRA on offer: its file, and what its metadata says about it."""

    name: str
    path: Path
    trigger_words: tuple[str, ...] = ()
    # The family its metadata names ("sd1", "sd2", "sdxl"); None when it names none.
    family: str | None = None


def strip_tags(prompt: str) -> str:
    """The prompt without its LoRA tags: the text the encoder reads."""
    return _TAG.sub("", prompt)


def prompt_tags(prompt: str, label: str = "prompt") -> tuple[tuple[str, float], ...]:
    """The (name, weight) of each LoRA tag of a prompt, in order; LoraError for a tag that cannot be read."""
    tags: dict[str, tuple[str, float]] = {}
    for match in _TAG.finditer(prompt):
        name, raw = match.group(1).strip(), match.group(2)
        if not name:
            raise LoraError(f"The {label}'s “{match.group(0)[:60]}” names no LoRA; write <lora:NAME:WEIGHT>.")
        weight = 1.0
        if raw is not None:
            try:
                weight = float(raw.strip())
            except ValueError:
                raise LoraError(
                    f"The LoRA weight in “{match.group(0)[:60]}” is not a number; "
                    f"write <lora:{name[:40]}:0.8>."
                ) from None
        if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
            raise LoraError(
                f"The LoRA “{name[:40]}” weighs {weight:g}; "
                f"LoRA weights go from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}."
            )
        key = name.casefold()
        if key in tags:
            raise LoraError(f"The {label} names the LoRA “{name[:40]}” twice; give it once, with one weight.")
        tags[key] = (name, weight)
    return tuple(tags.values())


def loras_json(loras: Iterable[Lora]) -> list[dict[str, Any]]:
    return [{"name": lora.name, "weight": lora.weight, "sha256": lora.sha256} for lora in loras]


def loras_from_json(raw: Any) -> tuple[Lora, ...]:
    """A LoRA set as loras_json writes it; ValueError for anything else."""
    if not isinstance(raw, list):
        raise ValueError(f"a LoRA set is a list (got {type(raw).__name__})")
    try:
        return tuple(Lora(str(x["name"]), float(x["weight"]), str(x["sha256"])) for x in raw)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a LoRA set ({type(exc).__name__}: {exc})") from None


def describe(loras: Sequence[Lora]) -> str:
    """A LoRA set as a member reads it: `name 0.8, other 1`."""
    return ", ".join(f"{lora.name} {lora.weight:g}" for lora in loras)


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's JSON header (tensor names, shapes, `__metadata__`), its tensors left unread."""
    with path.open("rb") as file:
        head = file.read(8)
        if len(head) != 8:
            raise ValueError("too short to be a safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER_BYTES:
            raise ValueError(f"its header claims {size} bytes")
        header = json.loads(file.read(size))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header


def trigger_words(metadata: Mapping[str, Any]) -> tuple[str, ...]:
    """The words that call a LoRA up: its modelspec trigger phrase, else its most frequent training tags."""
    phrase = metadata.get("modelspec.trigger_phrase")
    if isinstance(phrase, str) and phrase.strip():
        return tuple(dict.fromkeys(w.strip() for w in phrase.split(",") if w.strip()))
    raw = metadata.get("ss_tag_frequency")
    try:
        datasets = json.loads(raw) if isinstance(raw, str) else None
    except json.JSONDecodeError:
        return ()
    if not isinstance(datasets, dict):
        return ()
    counts: dict[str, int] = {}
    for tags in datasets.values():
        if isinstance(tags, dict):
            for tag, count in tags.items():
                if isinstance(count, int) and str(tag).strip():
                    word = str(tag).strip()
                    counts[word] = counts.get(word, 0) + count
    return tuple(sorted(counts, key=lambda word: (-counts[word], word))[:TRIGGER_WORDS])


def declared_family(metadata: Mapping[str, Any]) -> str | None:
    """The family of Stable Diffusion a LoRA's metadata says it was trained on, if it says."""
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = metadata.get(key)
        if isinstance(value, str):
            text = value.casefold()
            for family, marks in _FAMILIES:
                if any(mark in text for mark in marks):
                    return family
    return None


class LoraLibrary:
    """The LoRAs of one folder: listed from their headers, hashed once per version of each file.

    Safe to use from any thread. A LoRA the GPU side found not to fit the generator is remembered by hash
    (`refuse`), so the next request naming it is refused before it queues.
    """

    def __init__(self, folder: str | Path | None, *, max_per_prompt: int = 4, family: str = "sd1") -> None:
        self.folder = Path(folder).expanduser() if folder else None
        self.max_per_prompt = max_per_prompt
        # The generator's family: a LoRA whose metadata names another is refused at planning.
        self.family = family
        self._lock = threading.Lock()
        self._files: dict[Path, tuple[tuple[int, int], LoraFile | None]] = {}
        self._hashes: dict[Path, tuple[tuple[int, int], str]] = {}
        self._misfits: dict[str, str] = {}

    def available(self) -> tuple[LoraFile, ...]:
        """The LoRAs on offer, by name; a file whose header cannot be read is left out with a log line."""
        if self.folder is None or not self.folder.is_dir():
            return ()
        found = []
        for path in sorted(self.folder.iterdir(), key=lambda p: p.name.casefold()):
            if path.suffix.lower() == SUFFIX and path.is_file():
                listed = self._listed(path)
                if listed is not None:
                    found.append(listed)
        return tuple(found)

    def files(self) -> tuple[tuple[str, str], ...]:
        """Each LoRA on offer as a batch pins it: its name and its file's sha256 (hashed once per version)."""
        return tuple((lora.name, self.sha256(lora.path)) for lora in self.available())

    def find(self, name: str) -> LoraFile | None:
        key = name.casefold()
        return next((lora for lora in self.available() if lora.name.casefold() == key), None)

    def resolve(self, prompt: str, negative: str = "", pinned: Sequence[Lora] = ()) -> tuple[Lora, ...]:
        """The LoRA set a prompt's tags name, each with its file's hash; LoraError, one sentence, otherwise.

        `pinned` is the set of the job a request was made from: a LoRA named there must still be the file
        that job used, or the request is refused rather than made with another.
        """
        if _TAG.search(negative):
            raise LoraError("LoRAs go in the prompt, not the negative prompt; move the <lora:…> tag.")
        tags = prompt_tags(prompt)
        if not tags:
            return ()
        if len(tags) > self.max_per_prompt:
            raise LoraError(f"The prompt names {len(tags)} LoRAs; the limit is {self.max_per_prompt}.")
        offered = {lora.name.casefold(): lora for lora in self.available()}
        was = {lora.name.casefold(): lora for lora in pinned}
        chosen = []
        for name, weight in tags:
            key = name.casefold()
            found = offered.get(key)
            if found is None:
                if key in was:
                    raise LoraError(
                        f"The LoRA “{was[key].name}” this was made with is no longer on this server, "
                        "so it cannot be made again."
                    )
                raise LoraError(self._unknown(name, offered.values()))
            sha256 = self.sha256(found.path)
            if key in was and was[key].sha256 != sha256:
                raise LoraError(
                    f"The LoRA “{found.name}” has changed since this was made, so it cannot be made again "
                    "the same; write the prompt anew to use the new file."
                )
            self.check_fits(found, sha256)
            chosen.append(Lora(found.name, weight, sha256))
        return tuple(chosen)

    def check_fits(self, lora: LoraFile, sha256: str) -> None:
        """Refuse a LoRA known not to fit this generator: by its metadata, or as its last load found."""
        reason = self._misfits.get(sha256)
        if reason is None and lora.family is not None and lora.family != self.family:
            reason = misfit_sentence(
                lora.name, tr(None, "it was made for {family}", family=FAMILY_NAMES[lora.family])
            )
        if reason is not None:
            raise LoraError(reason)

    def refuse(self, sha256: str, reason: str) -> None:
        """Remember that the LoRA with this hash does not fit the generator, and the sentence saying why."""
        with self._lock:
            self._misfits[sha256] = reason

    def path(self, lora: Lora) -> Path:
        """The file a planned LoRA is read from; LoraError when it is gone."""
        found = self.find(lora.name)
        if found is None:
            raise LoraError(f"The LoRA “{lora.name}” is no longer on this server.")
        return found.path

    def sha256(self, path: Path) -> str:
        """The file's sha256, computed again only when its size or modification time changed."""
        stamp = _stamp(path)
        with self._lock:
            known = self._hashes.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        digest = hashlib.sha256()
        with path.open("rb") as file:
            while chunk := file.read(_HASH_CHUNK):
                digest.update(chunk)
        sha256 = digest.hexdigest()
        with self._lock:
            self._hashes[path] = (stamp, sha256)
        return sha256

    def _listed(self, path: Path) -> LoraFile | None:
        stamp = _stamp(path)
        with self._lock:
            known = self._files.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        listed: LoraFile | None
        try:
            metadata = read_header(path).get("__metadata__") or {}
        except (OSError, ValueError) as exc:
            log.warning("LoRA %s is not offered: its header cannot be read (%s)", path, exc)
            listed = None
        else:
            if not isinstance(metadata, dict):
                metadata = {}
            listed = LoraFile(path.stem, path, trigger_words(metadata), declared_family(metadata))
        with self._lock:
            self._files[path] = (stamp, listed)
        return listed

    def _unknown(self, name: str, offered: Iterable[LoraFile]) -> str:
        names = [lora.name for lora in offered]
        if not names:
            return tr(None, "There is no LoRA “{name}”: this server offers no LoRAs.", name=name[:40])
        listed = ", ".join(names[:25]) + (f" and {len(names) - 25} more" if len(names) > 25 else "")
        return tr(
            None, "There is no LoRA “{name}”; the LoRAs on offer are {names}.", name=name[:40], names=listed
        )


def misfit_sentence(name: str, why: str) -> str:
    """The one sentence that refuses a LoRA made for another model than the server's."""
    return tr(
        None,
        "The LoRA “{name}” was made for another model than this server's ({why}); choose another.",
        name=name,
        why=why,
    )


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns
