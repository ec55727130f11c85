"""CLIP Interrogator service: image → prompt in several modes, with CLIP scores.

The prompt-building algorithms are clip-interrogator 0.6's (caption, flavour chain, fast, classic,
negative), and its packaged label lists are used. What differs is how labels are ranked: every label
embedding lives in one resident tensor on the model's device and a ranking is one matmul and a top-k,
where the stock code rebuilds the tensor from ~100k numpy rows on every call and ranks large tables
approximately, chunk by chunk.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from i2p2i_bot.caption_decode import GreedyCaptionDecoder, unsupported_caption_model
from i2p2i_bot.clip_pixels import clip_input
from i2p2i_bot.clip_text import TextEncoder
from i2p2i_bot.config import InterrogateMode, InterrogateSettings
from i2p2i_bot.gpu import default_dtype
from i2p2i_bot.interrogation import Candidate, Interrogation
from i2p2i_bot.models import ModelUnavailable, caption_folder, clip_files
from i2p2i_bot.terms import BannedTerms

log = logging.getLogger(__name__)

MODES: tuple[InterrogateMode, ...] = ("best", "fast", "classic", "negative", "candidates")
# Tables whose labels may follow the caption, in this order in the resident tensor; "negative" comes last.
FLAVOR_TABLES = ("artists", "flavors", "mediums", "movements", "trendings")
# How many top flavours the best and negative chains consider (clip-interrogator's flavor_intermediate_count).
INTERMEDIATE_COUNT = 2048
CLASSIC_FLAVORS = 3
LABEL_FILES = ("artists.txt", "flavors.txt", "mediums.txt", "movements.txt", "negative.txt")
_SITES = (
    "Artstation", "behance", "cg society", "cgsociety", "deviantart", "dribble", "flickr", "instagram",
    "pexels", "pinterest", "pixabay", "pixiv", "polycount", "reddit", "shutterstock", "tumblr", "unsplash",
    "zbrush central",
)  # fmt: skip


class InterrogateError(Exception):
    """A request a user can fix (unknown mode...); the message is one sentence for them."""


def label_tables(data_path: Path | None = None) -> dict[str, list[str]]:
    """clip-interrogator's label tables, built exactly as its Interrogator builds them."""
    from clip_interrogator.clip_interrogator import load_list

    if data_path is None:
        import clip_interrogator

        data_path = Path(clip_interrogator.__file__).parent / "data"
    for name in LABEL_FILES:
        if not (data_path / name).is_file():
            raise ModelUnavailable(f"label list {data_path / name} is missing")
    raw_artists = load_list(str(data_path), "artists.txt")
    trendings = list(_SITES)
    trendings += [f"trending on {s}" for s in _SITES]
    trendings += [f"featured on {s}" for s in _SITES]
    trendings += [f"{s} contest winner" for s in _SITES]
    return {
        "artists": [f"by {a}" for a in raw_artists] + [f"inspired by {a}" for a in raw_artists],
        "flavors": load_list(str(data_path), "flavors.txt"),
        "mediums": load_list(str(data_path), "mediums.txt"),
        "movements": load_list(str(data_path), "movements.txt"),
        "trendings": trendings,
        "negative": load_list(str(data_path), "negative.txt"),
    }


class ClipEncoder:
    """An open_clip model with its preprocessing and tokenizer, returning normalised embeddings."""

    def __init__(self, model: Any, preprocess: Callable[[Image.Image], torch.Tensor], tokenizer: Any,
                 device: torch.device, name: str) -> None:  # fmt: skip
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = _input_dtype(model.visual)
        self.name = name
        # Whether OpenAI's QuickGELU was forced on (ClipFiles.quick_gelu): it changes every embedding.
        self.quick_gelu = False
        self.context_length = int(getattr(tokenizer, "context_length", 77))
        self.text = TextEncoder(self.model, tokenizer, device, self.context_length)

    @classmethod
    def load(cls, source: str, device: torch.device, dtype: torch.dtype | None = None) -> ClipEncoder:
        import open_clip

        files = clip_files(source)
        precision = "fp16" if (dtype or default_dtype(device)) == torch.float16 else "fp32"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                files.model_name,
                pretrained=files.pretrained,
                precision=precision,
                device=device,
                image_mean=files.image_mean,
                image_std=files.image_std,
                image_interpolation=files.image_interpolation,
                image_resize_mode=files.image_resize_mode,
                force_quick_gelu=files.quick_gelu,
            )
            tokenizer = files.tokenizer()
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelUnavailable(
                f"CLIP model {source!r} could not be loaded ({exc}); run `i2p2i download-models` where there "
                "is internet, or use --models smoke to check the install"
            ) from exc
        clip = cls(model, preprocess, tokenizer, device, source)
        clip.quick_gelu = files.quick_gelu
        return clip

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        batch = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)
        features = self.model.encode_image(batch).float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings of decoded images ([N, 3, H, W] in [0, 1], any device), preprocessed on the device."""
        cfg = getattr(self.model.visual, "preprocess_cfg", {})
        size = cfg.get("size", ())
        if cfg.get("resize_mode") != "shortest" or cfg.get("interpolation") != "bicubic" or len(size) != 2:
            from torchvision.transforms.functional import to_pil_image

            return self.encode_images([to_pil_image(p.float().cpu()) for p in pixels])
        batch = clip_input(
            pixels.to(self.device),
            shortest_edge=min(size),
            crop=(int(size[0]), int(size[1])),
            mean=cfg["mean"],
            std=cfg["std"],
        )
        features = self.model.encode_image(batch.to(self.dtype)).float()
        return features / features.norm(dim=-1, keepdim=True)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 1024) -> torch.Tensor:
        """[N, D] normalised float32 embeddings, equal to stock `encode_text` on the stock tokens."""
        if not texts:
            return torch.empty(0, 0, device=self.device)
        parts = [self.text.encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        return torch.cat(parts)

    def encode_extensions(self, prompt: str, phrases: Sequence[str], batch_size: int = 1024) -> torch.Tensor:
        """Embeddings of every f"{prompt}, {phrase}" (the phrases alone for an empty prompt)."""
        return self.text.encode_extensions(prompt, phrases, batch_size=batch_size)

    def at_max_length(self, text: str) -> bool:
        """True when text fills CLIP's whole context, so adding to it would be cut off."""
        if self.text.tokens.supported:
            return len(self.text.tokens.ids(text)) + 2 >= self.context_length
        return bool(self.tokenize([text])[0][-1] != 0)

    def truncate_to_fit(self, text: str) -> str:
        """Drop trailing comma-separated parts until the prompt fits CLIP's context (as stock does)."""
        parts = text.split(", ")
        new_text = parts[0]
        for part in parts[1:]:
            if self.at_max_length(new_text + part):
                break
            new_text += ", " + part
        return new_text


class Captioner:
    """A BLIP caption model and its processor; greedy captions by `GreedyCaptionDecoder` where it applies."""

    def __init__(
        self, model: Any, processor: Any, device: torch.device, max_new_tokens: int = 32, *, fast: bool = True
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.device = device
        self.dtype = _input_dtype(model.vision_model)
        self.max_new_tokens = max_new_tokens
        self.decoder: GreedyCaptionDecoder | None = None
        if fast:
            reason = unsupported_caption_model(model)
            if reason is None:
                self.decoder = GreedyCaptionDecoder(model, max_new_tokens)
            else:
                log.info("captions use transformers' generate(): %s", reason)

    @classmethod
    def load(
        cls,
        source: str,
        device: torch.device,
        max_new_tokens: int = 32,
        *,
        fast: bool = True,
        dtype: torch.dtype | None = None,
    ) -> Captioner:
        from transformers import AutoProcessor, BlipForConditionalGeneration

        folder = caption_folder(source)
        try:
            model: Any = BlipForConditionalGeneration.from_pretrained(
                folder, dtype=dtype or default_dtype(device)
            )
            processor = AutoProcessor.from_pretrained(folder)
        except OSError as exc:
            raise ModelUnavailable(
                f"caption model {source!r} could not be loaded ({exc}); run `i2p2i download-models` where "
                "there is internet, or use --models smoke to check the install"
            ) from exc
        return cls(model.to(device), processor, device, max_new_tokens, fast=fast)

    @torch.inference_mode()
    def caption(self, image: Image.Image) -> str:
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        pixels = inputs["pixel_values"].to(self.dtype)
        if self.decoder is not None:
            tokens: Any = [self.decoder.decode(self.model.vision_model(pixel_values=pixels)[0])]
        else:
            tokens = self.model.generate(pixel_values=pixels, max_new_tokens=self.max_new_tokens)
        return str(self.processor.batch_decode(tokens, skip_special_tokens=True)[0]).strip()


class LabelBank:
    """Every label's CLIP text embedding in one resident tensor, ranked by matmul and top-k."""

    def __init__(self, tables: dict[str, list[str]], embeds: torch.Tensor) -> None:
        self.labels: list[str] = []
        self.slices: dict[str, slice] = {}
        for name, labels in tables.items():
            self.slices[name] = slice(len(self.labels), len(self.labels) + len(labels))
            self.labels.extend(labels)
        if embeds.shape[0] != len(self.labels):
            raise ValueError(f"{embeds.shape[0]} embeddings for {len(self.labels)} labels")
        self.embeds = embeds
        self.tables = {name: self.labels[s] for name, s in self.slices.items()}

    @classmethod
    def build(
        cls,
        clip: ClipEncoder,
        tables: dict[str, list[str]],
        cache_dir: Path | None,
        *,
        model_key: str,
        batch_size: int = 1024,
        progress: bool = False,
    ) -> LabelBank:
        """Embed every label, or load the embeddings cached for this model and these exact lists."""
        from safetensors.torch import load_file, save_file

        # Keyed by the precision the labels are encoded in too: fp16 and fp32 encodes round differently,
        # and a table from the other could flip a near-tie between two labels.
        digest = hashlib.sha256(f"{model_key}\0{clip.dtype}".encode())
        for name, labels in tables.items():
            digest.update(f"\0{name}\0".encode())
            digest.update("\n".join(labels).encode())
        key = digest.hexdigest()
        path = None
        if cache_dir is not None:
            slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key)[-60:]
            path = cache_dir / "labels" / f"{slug}-{key[:16]}.safetensors"
            if path.exists():
                try:
                    stored = load_file(str(path))
                    if bytes(stored["key"].tolist()).decode() == key:
                        log.info("label table loaded from %s (%d labels)", path, len(stored["embeds"]))
                        return cls(tables, stored["embeds"].to(clip.device, clip.dtype))
                except Exception:  # a damaged cache is rebuilt, never trusted
                    log.warning("label cache %s is unreadable; rebuilding it", path, exc_info=True)
        labels = [label for name in tables for label in tables[name]]
        total = len(labels)
        # Seconds on the smoke models, minutes for the real CLIP on a slow GPU, and only once per model and
        # label list: the log says so, or a first start looks hung.
        log.info(
            "building the label table: embedding %d labels with CLIP %s on %s, once per model and label list",
            total,
            clip.name,
            clip.device,
        )
        started = time.perf_counter()
        parts = []
        chunks = range(0, total, batch_size)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="Embedding labels (once per model)", unit="batch")
        reported_tenths = 0
        # Stored as fp16 like clip-interrogator's cache, so cached and fresh tables rank identically; each
        # batch is halved as it comes, so the float32 table never exists whole.
        for start in chunks:
            parts.append(clip.encode_texts(labels[start : start + batch_size], batch_size=batch_size).half())
            done = min(start + batch_size, total)
            if done < total and done * 10 // total > reported_tenths:  # each tenth once; the end says "built"
                reported_tenths = done * 10 // total
                elapsed_s = time.perf_counter() - started
                log.info(
                    "label table: %d of %d labels (%d %%) in %.0f s",
                    done,
                    total,
                    100 * done // total,
                    elapsed_s,
                )
        embeds = torch.cat(parts) if parts else torch.empty(0, 1, dtype=torch.float16)
        del parts
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(
                {
                    "embeds": embeds.cpu().contiguous(),
                    "key": torch.tensor(list(key.encode()), dtype=torch.uint8),
                },
                str(tmp),
            )
            os.replace(tmp, path)
        log.info(
            "label table built: %d labels in %.1f s%s",
            total,
            time.perf_counter() - started,
            "" if path is None else f", cached in {path}",
        )
        return cls(tables, embeds.to(clip.device, clip.dtype))

    def top(
        self, features: torch.Tensor, tables: Sequence[str], count: int, *, reverse: bool = False
    ) -> list[str]:
        """The labels of the given contiguous tables most (reversed: least) similar to the image."""
        start = min(self.slices[t].start for t in tables)
        stop = max(self.slices[t].stop for t in tables)
        if sum(self.slices[t].stop - self.slices[t].start for t in tables) != stop - start:
            raise ValueError(f"tables {tables} are not contiguous in the bank")
        sims = self.embeds[start:stop] @ features.to(self.embeds.dtype)
        if reverse:
            sims = -sims
        count = min(count, stop - start)
        idx = torch.topk(sims.float(), count).indices.tolist()
        return [self.labels[start + i] for i in idx]


def _input_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module's input must have: its first convolution's or linear layer's.

    open_clip's fp16 precision halves those layers alone; embeddings and norms stay float32 and are cast
    where the model uses them, so the first parameter is no guide.
    """
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear):
            return layer.weight.dtype
    return next(module.parameters()).dtype


@dataclass(frozen=True)
class ImageFeatures:
    """What every mode needs from an image, computed once: its caption and CLIP embedding."""

    caption: str
    embedding: torch.Tensor  # [D], normalised, float32 on the CLIP device


class Interrogator:
    """Builds prompts for images; all methods run on the GPU thread."""

    def __init__(
        self,
        clip: ClipEncoder,
        captioner: Captioner,
        bank: LabelBank,
        settings: InterrogateSettings,
        *,
        models: dict[str, str] | None = None,
        feature_cache_size: int = 64,
    ) -> None:
        self.clip = clip
        self.captioner = captioner
        self.bank = bank
        self.settings = settings
        self.models = models or {"clip": clip.name}
        self.flavor_tables = tuple(t for t in FLAVOR_TABLES if not (settings.drop_artists and t == "artists"))
        self._features: collections.OrderedDict[str, ImageFeatures] = collections.OrderedDict()
        self._feature_cache_size = feature_cache_size

    @classmethod
    def load(
        cls,
        clip_source: str,
        caption_source: str,
        settings: InterrogateSettings,
        device: torch.device,
        cache_dir: Path | None,
        *,
        dtype: torch.dtype | None = None,
        progress: bool = False,
        captioner: Captioner | None = None,
    ) -> Interrogator:
        """Load a CLIP, its label tables and (unless an interrogator with another CLIP shares its own)
        the caption model."""
        clip = ClipEncoder.load(clip_source, device, dtype)
        if captioner is None:
            captioner = Captioner.load(
                caption_source,
                device,
                max_new_tokens=settings.caption_max_tokens,
                fast=settings.fast_caption,
                dtype=dtype,
            )
        banned = BannedTerms.from_settings(settings)
        source_tables = label_tables(Path(settings.labels_dir).expanduser() if settings.labels_dir else None)
        kept = {
            name: [label for label in labels if banned.allows(label)]
            for name, labels in source_tables.items()
        }
        if settings.drop_artists:
            kept["artists"] = []
        bank = LabelBank.build(
            clip,
            kept,
            cache_dir,
            # Tables embedded before QuickGELU was forced came from other embeddings.
            model_key=_model_key(clip_source) + ("|quickgelu" if clip.quick_gelu else ""),
            batch_size=settings.label_batch_size,
            progress=progress,
        )
        return cls(clip, captioner, bank, settings, models={"clip": clip_source, "caption": caption_source})

    # --- features -------------------------------------------------------------------------------------

    def features(self, image: Image.Image, key: str | None = None) -> ImageFeatures:
        """Caption and CLIP embedding of an image; with a key (the image's sha256) they are reused."""
        if key is not None and key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        caption = self.captioner.caption(image)
        embedding = self.clip.encode_images([image])[0]
        result = ImageFeatures(caption, embedding)
        if key is not None:
            self._features[key] = result
            while len(self._features) > self._feature_cache_size:
                self._features.popitem(last=False)
        return result

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Normalised CLIP embeddings of images, [N, D] float32; for fidelity scores."""
        return self.clip.encode_images(images)

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """As embed_images, for decoded images still on the device ([N, 3, H, W] in [0, 1])."""
        return self.clip.encode_pixels(pixels)

    # --- modes ----------------------------------------------------------------------------------------

    def interrogate(self, image: Image.Image, mode: str = "best", key: str | None = None) -> Interrogation:
        """Describe an image in one mode; caption and image features are shared across modes."""
        if mode not in MODES:
            raise InterrogateError(f"Unknown mode {mode!r}; choose one of {', '.join(MODES)}.")
        started = time.perf_counter()
        had_features = key is not None and key in self._features
        feats = self.features(image, key)
        if not had_features and self.clip.device.type == "cuda":
            torch.cuda.synchronize(self.clip.device)  # the image embedding's time counts as the features'
        timings = {"features_s": 0.0 if had_features else time.perf_counter() - started}
        ranked_at = time.perf_counter()
        result = self.describe(feats, mode)
        timings["prompt_s"] = time.perf_counter() - ranked_at
        timings["total_s"] = time.perf_counter() - started
        return Interrogation(
            mode=result.mode,
            prompt=result.prompt,
            score=result.score,
            caption=result.caption,
            negative=result.negative,
            candidates=result.candidates,
            image_embedding=result.image_embedding,
            models=dict(self.models),
            timings_s=timings,
        )

    def describe(self, feats: ImageFeatures, mode: str) -> Interrogation:
        """Build the prompt for a mode from precomputed features."""
        s = self.settings
        negative: str | None = None
        if mode == "fast":
            candidates = [self._scored("fast", self.fast(feats, s.max_flavors), feats)]
        elif mode == "classic":
            candidates = [self._scored("classic", self.classic(feats, CLASSIC_FLAVORS), feats)]
        elif mode == "negative":
            negative = self.negative(feats, s.negative_max_flavors)
            candidates = [self._scored("negative", negative, feats)]
        elif mode == "best":
            chain = self.best_chain(feats, s.min_flavors, s.max_flavors)
            prompts = {
                "caption": feats.caption,
                "classic": self.classic(feats, s.max_flavors),
                "fast": self.fast(feats, s.max_flavors),
                "best": chain,
            }
            candidates = self._score_all(prompts, feats)
        else:  # candidates
            prompts = {
                "best": self.best_chain(feats, s.min_flavors, s.max_flavors),
                "fast": self.fast(feats, s.max_flavors),
                "classic": self.classic(feats, CLASSIC_FLAVORS),
            }
            candidates = sorted(self._score_all(prompts, feats), key=lambda c: -c.score)
            negative = self.negative(feats, s.negative_max_flavors)
            candidates.append(self._scored("negative", negative, feats))
        positive = [c for c in candidates if c.mode != "negative"] or candidates
        chosen = max(positive, key=lambda c: c.score)
        return Interrogation(
            mode=mode,
            prompt=chosen.prompt,
            score=chosen.score,
            caption=feats.caption,
            negative=negative,
            candidates=tuple(candidates),
            image_embedding=tuple(feats.embedding.tolist()),
            models=dict(self.models),
        )

    def fast(self, feats: ImageFeatures, max_flavors: int) -> str:
        """Caption plus the top-ranked labels of every flavour table."""
        tops = self.bank.top(feats.embedding, self.flavor_tables, max_flavors)
        return self.clip.truncate_to_fit(", ".join([feats.caption, *tops]))

    def classic(self, feats: ImageFeatures, max_flavors: int) -> str:
        """Caption, medium, artist, trending, movement, then flavours: the original interrogator's format."""
        emb = feats.embedding
        medium = self._top1("mediums", emb)
        artist = self._top1("artists", emb) if "artists" in self.flavor_tables else ""
        trending = self._top1("trendings", emb)
        movement = self._top1("movements", emb)
        flaves = ", ".join(self.bank.top(emb, ["flavors"], max_flavors))
        head = f"{medium} {artist}".strip()
        parts = [p for p in (trending, movement, flaves) if p]
        if medium and feats.caption.startswith(medium):
            prompt = ", ".join([f"{feats.caption} {artist}".strip(), *parts])
        else:
            prompt = ", ".join([p for p in (feats.caption, head) if p] + parts)
        return self.clip.truncate_to_fit(prompt)

    def best_chain(self, feats: ImageFeatures, min_flavors: int, max_flavors: int) -> str:
        """Greedily append the flavour that most raises CLIP similarity, starting from the caption."""
        flaves = self.bank.top(feats.embedding, self.flavor_tables, INTERMEDIATE_COUNT)
        start_sim = self.similarity(feats, feats.caption)
        return self.chain(feats, flaves, feats.caption, start_sim, min_flavors, max_flavors)

    def negative(self, feats: ImageFeatures, max_flavors: int) -> str:
        """Chain the labels least like the image: a starting point for a negative prompt."""
        flaves = self.bank.top(feats.embedding, ["flavors"], INTERMEDIATE_COUNT, reverse=True)
        flaves += self.bank.tables["negative"]
        return self.chain(feats, flaves, "", 0.0, 1, max_flavors, reverse=True)

    def chain(
        self,
        feats: ImageFeatures,
        phrases: Sequence[str],
        best_prompt: str,
        best_sim: float,
        min_count: int,
        max_count: int,
        *,
        reverse: bool = False,
    ) -> str:
        """clip-interrogator's chain, scoring every 'prompt, phrase' extension in one batched encode."""
        remaining = list(dict.fromkeys(phrases))
        if not remaining:
            return best_prompt
        sign = -1.0 if reverse else 1.0
        if not best_prompt:
            best_prompt = self._rank_top(feats, remaining, reverse=reverse)
            # The stock code compares negated scores against an un-negated start here; keep one sign.
            best_sim = sign * self.similarity(feats, best_prompt)
            remaining.remove(best_prompt)
        curr_prompt, curr_sim = best_prompt, best_sim
        for idx in range(max_count):
            if not remaining:
                break
            flave = self._rank_top(feats, remaining, curr_prompt, reverse=reverse)
            prompt = f"{curr_prompt}, {flave}"
            sim = sign * self.similarity(feats, prompt)
            if sim > best_sim:
                best_prompt, best_sim = prompt, sim
            if sim > curr_sim or idx < min_count:
                curr_prompt, curr_sim = prompt, sim
            else:
                break
            if self.clip.at_max_length(curr_prompt):
                break
            remaining.remove(flave)
        return best_prompt

    # --- scoring --------------------------------------------------------------------------------------

    def similarity(self, feats: ImageFeatures, text: str) -> float:
        return float(self.clip.encode_texts([text])[0] @ feats.embedding)

    def similarities(self, feats: ImageFeatures, texts: Sequence[str]) -> list[float]:
        return [
            float(v) for v in self.clip.encode_texts(texts, self.settings.label_batch_size) @ feats.embedding
        ]

    def _rank_top(
        self, feats: ImageFeatures, phrases: Sequence[str], prompt: str = "", *, reverse: bool = False
    ) -> str:
        """The phrase whose f"{prompt}, {phrase}" (or the phrase alone) is most (reversed: least) like it."""
        embeds = self.clip.encode_extensions(prompt, phrases, self.settings.label_batch_size)
        sims = embeds @ feats.embedding
        return phrases[int((-sims if reverse else sims).argmax())]

    def _top1(self, table: str, embedding: torch.Tensor) -> str:
        found = self.bank.top(embedding, [table], 1)
        return found[0] if found else ""

    def _scored(self, mode: str, prompt: str, feats: ImageFeatures) -> Candidate:
        return Candidate(mode, prompt, self.similarity(feats, prompt))

    def _score_all(self, prompts: dict[str, str], feats: ImageFeatures) -> list[Candidate]:
        scores = self.similarities(feats, list(prompts.values()))
        return [Candidate(mode, p, s) for (mode, p), s in zip(prompts.items(), scores, strict=True)]


def _model_key(source: str) -> str:
    """Identify a CLIP model for the label cache; local weights are identified by size and time too."""
    path = Path(source.removeprefix("local-dir:")).expanduser()
    if not path.is_dir():
        return source
    stamps = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.iterdir())]
    return f"{path.resolve()}|{'|'.join(stamps)}"
