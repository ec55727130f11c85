"""Interrogation with tiny CLIP and BLIP models loaded through the production loaders."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from PIL import Image

from i2p2i_bot.config import InterrogateSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.interrogate import MODES, ClipEncoder, InterrogateError, Interrogator, LabelBank, label_tables
from i2p2i_bot.interrogation import Candidate, Interrogation
from i2p2i_bot.smoke import SmokeModels
from i2p2i_bot.terms import BannedTerms

CPU = torch.device("cpu")


def _split(prompt: str, caption: str) -> list[str]:
    assert prompt.startswith(caption)
    rest = prompt[len(caption) :]
    return [p for p in rest.split(", ") if p]


def test_every_mode_builds_prompts_from_real_labels(engine: Engine, astronaut: Image.Image) -> None:
    """Every mode's prompts are the caption followed by label text from the tables, with in-range scores."""
    interrogator: Interrogator = engine.interrogator
    bank_labels = set(interrogator.bank.labels)
    for mode in MODES:
        result = interrogator.interrogate(astronaut, mode, key="astronaut")
        assert result.mode == mode
        assert result.caption and result.caption.split()[0].isalpha()
        assert result.candidates, mode
        for candidate in result.candidates:
            assert -1.0 <= candidate.score <= 1.0
            if candidate.mode == "negative":
                parts = candidate.prompt.split(", ")
            elif candidate.mode == "classic":
                # "caption, medium by artist, trending, movement, flavours"
                parts = [p for p in _split(candidate.prompt, result.caption)]
                medium_artist = parts.pop(0)
                assert any(medium_artist.startswith(m) for m in interrogator.bank.tables["mediums"])
            elif candidate.mode == "caption":
                assert candidate.prompt == result.caption
                continue
            else:
                parts = _split(candidate.prompt, result.caption)
            for part in parts:
                assert part in bank_labels, (mode, candidate.mode, part)
        assert result.prompt in [c.prompt for c in result.candidates]
        assert len(result.image_embedding) == 32


def test_scores_are_clip_cosines(engine: Engine, astronaut: Image.Image) -> None:
    """A candidate's score equals the cosine of CLIP's text and image embeddings, computed independently."""
    import open_clip

    result = engine.interrogator.interrogate(astronaut, "candidates", key="astronaut")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{engine.sources.clip}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{engine.sources.clip}")
    with torch.no_grad():
        image = model.encode_image(preprocess(astronaut).unsqueeze(0))
        texts = model.encode_text(tokenizer([c.prompt for c in result.candidates]))
    image = image / image.norm(dim=-1, keepdim=True)
    texts = texts / texts.norm(dim=-1, keepdim=True)
    expected = (texts @ image.T).squeeze(1).tolist()
    assert [c.score for c in result.candidates] == pytest.approx(expected, abs=1e-5)
    assert torch.allclose(torch.tensor(result.image_embedding), image[0], atol=1e-5)


def test_candidates_mode_ranks_and_suggests_a_negative(engine: Engine, astronaut: Image.Image) -> None:
    """Candidates carry best, fast and classic sorted by score, plus the negative suggestion last."""
    result = engine.interrogator.interrogate(astronaut, "candidates", key="astronaut")
    modes = [c.mode for c in result.candidates]
    assert sorted(modes[:3]) == ["best", "classic", "fast"] and modes[3] == "negative"
    scores = [c.score for c in result.candidates[:3]]
    assert scores == sorted(scores, reverse=True)
    assert result.prompt == result.candidates[0].prompt
    assert result.negative == result.candidates[3].prompt
    assert result.score == pytest.approx(scores[0])


def test_a_best_description_offers_every_prompt_it_scored(engine: Engine, astronaut: Image.Image) -> None:
    """A best description offers its prompt first, then caption, classic and fast by score, all scored from
    the same features; Generate's prompt is the first."""
    result = engine.interrogator.interrogate(astronaut, "best", key="astronaut")
    ranked = result.ranked
    assert ranked[0].prompt == result.prompt and ranked[0].score == pytest.approx(result.score)
    assert sorted({c.mode for c in result.candidates}) == ["best", "caption", "classic", "fast"]
    assert {c.prompt for c in ranked} == {c.prompt for c in result.candidates}
    assert len({c.prompt for c in ranked}) == len(ranked) > 1
    rest = [c.score for c in ranked[1:]]
    assert rest == sorted(rest, reverse=True)
    assert result.image_prompts == tuple(c.prompt for c in ranked)
    assert result.negative_suggestion is None


def test_a_best_description_lists_each_prompt_once() -> None:
    """When the chain adds nothing, caption and best are one prompt: it is listed once, as best, first."""
    result = Interrogation(
        mode="best",
        prompt="a cat",
        score=0.3,
        caption="a cat",
        negative=None,
        candidates=(
            Candidate("caption", "a cat", 0.3),
            Candidate("classic", "a cat, a painting", 0.2),
            Candidate("fast", "a cat, 4k", 0.25),
            Candidate("best", "a cat", 0.3),
        ),
        image_embedding=(1.0,),
    )
    assert [(c.mode, c.prompt) for c in result.ranked] == [
        ("best", "a cat"),
        ("fast", "a cat, 4k"),
        ("classic", "a cat, a painting"),
    ]
    fast = dataclasses.replace(result, mode="fast", candidates=(Candidate("fast", "a cat", 0.3),))
    assert fast.image_prompts == ("a cat",)


def test_banned_terms_never_appear(engine: Engine, astronaut: Image.Image) -> None:
    """Labels with banned terms are gone from the tables, so no mode can produce them."""
    banned = BannedTerms.from_settings(engine.settings.interrogate)
    assert "sexy pose" not in engine.interrogator.bank.labels
    assert "nude portrait" not in engine.interrogator.bank.labels
    assert "highly detailed" in engine.interrogator.bank.labels
    for mode in MODES:
        result = engine.interrogator.interrogate(astronaut, mode, key="astronaut")
        for candidate in result.candidates:
            assert banned.find(candidate.prompt) == [], candidate


def test_features_are_computed_once_per_image(engine: Engine, astronaut: Image.Image) -> None:
    """Caption and image embedding are shared by every mode asked for the same image."""
    interrogator = engine.interrogator
    calls: list[int] = []
    original = interrogator.captioner.caption

    def counted_caption(image: Image.Image) -> str:
        calls.append(1)
        return original(image)

    interrogator.captioner.caption = counted_caption  # type: ignore[method-assign]
    try:
        key = "features-once"
        first = interrogator.interrogate(astronaut, "fast", key=key)
        second = interrogator.interrogate(astronaut, "classic", key=key)
        interrogator.interrogate(astronaut, "negative", key=key)
    finally:
        interrogator.captioner.caption = original  # type: ignore[method-assign]
    assert len(calls) == 1
    assert first.caption == second.caption
    assert second.timings_s["features_s"] == 0.0


def test_unknown_mode_is_a_user_error(engine: Engine, astronaut: Image.Image) -> None:
    """An unknown mode is refused with a sentence listing the modes."""
    with pytest.raises(InterrogateError, match="choose one of best, fast"):
        engine.interrogator.interrogate(astronaut, "poetic")


def test_drop_artists(base_settings: Settings, smoke_models: SmokeModels, astronaut: Image.Image) -> None:
    """With drop_artists, no prompt names an artist."""
    settings = dataclasses.replace(base_settings.interrogate, drop_artists=True)
    interrogator = Interrogator.load(
        str(smoke_models.clip), str(smoke_models.caption), settings, CPU, base_settings.cache_path
    )
    assert interrogator.bank.tables["artists"] == []
    for mode in ("best", "fast", "classic"):
        for candidate in interrogator.interrogate(astronaut, mode).candidates:
            assert " by " not in f" {candidate.prompt}", candidate.prompt


def test_label_cache_is_keyed_by_model_precision_and_lists(smoke_models: SmokeModels, tmp_path: Path) -> None:
    """A second build loads cached embeddings without encoding; changed lists, another model or another
    precision build a new cache file."""
    clip = ClipEncoder.load(str(smoke_models.clip), CPU)
    tables = {"flavors": ["red", "green", "blue"], "negative": ["ugly"]}
    first = LabelBank.build(clip, tables, tmp_path, model_key="tiny")
    files = list((tmp_path / "labels").iterdir())
    assert len(files) == 1

    def refuse(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("encoded again despite the cache")

    original = clip.encode_texts
    clip.encode_texts = refuse  # type: ignore[method-assign]
    try:
        second = LabelBank.build(clip, tables, tmp_path, model_key="tiny")
    finally:
        clip.encode_texts = original  # type: ignore[method-assign]
    assert torch.equal(first.embeds, second.embeds)
    LabelBank.build(clip, {"flavors": ["red", "green"], "negative": ["ugly"]}, tmp_path, model_key="tiny")
    LabelBank.build(clip, tables, tmp_path, model_key="other-model")
    assert len(list((tmp_path / "labels").iterdir())) == 3
    half = ClipEncoder.load(str(smoke_models.clip), CPU, torch.float16)
    assert LabelBank.build(half, tables, tmp_path, model_key="tiny").embeds.dtype == torch.float16
    assert len(list((tmp_path / "labels").iterdir())) == 4


def test_building_a_label_table_logs_its_start_progress_and_end(
    smoke_models: SmokeModels, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A first start embeds the labels for seconds to minutes: the log says how many labels with which
    CLIP, how far along it is once per tenth (not once per batch), and how long it took; a cached table is
    one line saying it was loaded."""
    clip = ClipEncoder.load(str(smoke_models.clip), CPU)
    tables = {"flavors": [f"colour {i}" for i in range(45)], "negative": [f"flaw {i}" for i in range(5)]}
    with caplog.at_level(logging.INFO, logger="i2p2i_bot.interrogate"):
        LabelBank.build(clip, tables, tmp_path, model_key="tiny", batch_size=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "i2p2i_bot.interrogate"]
    assert lines[0] == (
        f"building the label table: embedding 50 labels with CLIP {clip.name} on cpu, once per model and "
        "label list"
    )
    progress = [
        re.fullmatch(r"label table: (\d+) of 50 labels \((\d+) %\) in \d+ s", ln) for ln in lines[1:-1]
    ]
    # 50 batches of one label, one line per tenth.
    assert [(m[1], m[2]) for m in progress if m] == [(str(5 * k), str(10 * k)) for k in range(1, 10)]
    assert len(progress) == 9
    (cached,) = (tmp_path / "labels").iterdir()
    assert re.fullmatch(
        rf"label table built: 50 labels in \d+\.\d s, cached in {re.escape(str(cached))}", lines[-1]
    )

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="i2p2i_bot.interrogate"):
        LabelBank.build(clip, tables, tmp_path, model_key="tiny", batch_size=1)
    lines = [r.getMessage() for r in caplog.records if r.name == "i2p2i_bot.interrogate"]
    assert lines == [f"label table loaded from {cached} (50 labels)"]


def test_damaged_label_cache_is_rebuilt(smoke_models: SmokeModels, tmp_path: Path) -> None:
    """A corrupt cache file is replaced, never trusted."""
    clip = ClipEncoder.load(str(smoke_models.clip), CPU)
    tables = {"flavors": ["red", "green", "blue"]}
    good = LabelBank.build(clip, tables, tmp_path, model_key="tiny")
    (path,) = (tmp_path / "labels").iterdir()
    path.write_bytes(b"garbage")
    rebuilt = LabelBank.build(clip, tables, tmp_path, model_key="tiny")
    assert torch.equal(good.embeds, rebuilt.embeds)
    assert path.stat().st_size > 100


def test_ranking_matches_brute_force(engine: Engine, astronaut: Image.Image) -> None:
    """The resident-tensor top-k returns the labels a per-label cosine loop ranks highest (and lowest)."""
    interrogator = engine.interrogator
    feats = interrogator.features(astronaut, "astronaut")
    labels = interrogator.bank.tables["flavors"]
    sims = [interrogator.similarity(feats, label) for label in labels]
    order = sorted(range(len(labels)), key=lambda i: -sims[i])
    assert interrogator.bank.top(feats.embedding, ["flavors"], 5) == [labels[i] for i in order[:5]]
    assert interrogator.bank.top(feats.embedding, ["flavors"], 3, reverse=True) == [
        labels[i] for i in order[::-1][:3]
    ]


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")
def test_same_prompts_as_stock_clip_interrogator(
    smoke_models: SmokeModels, labels_dir: Path, tmp_path: Path, astronaut: Image.Image
) -> None:
    """With the same models and lists, fast, classic and best prompts equal clip-interrogator 0.6's."""
    from clip_interrogator import Config
    from clip_interrogator import Interrogator as StockInterrogator

    settings = InterrogateSettings(labels_dir=str(labels_dir), use_default_banned_terms=False, max_flavors=6)
    ours = Interrogator.load(str(smoke_models.clip), str(smoke_models.caption), settings, CPU, tmp_path)
    config = Config(
        clip_model_name="ViT-L-14/openai",  # only its tokenizer is used: the standard CLIP BPE, as ours
        download_cache=False,
        cache_path=str(tmp_path / "stock"),
        data_path=str(labels_dir),
        device="cpu",
        quiet=True,
    )
    config.clip_model, config.clip_preprocess = ours.clip.model, ours.clip.preprocess
    config.caption_model, config.caption_processor = ours.captioner.model, ours.captioner.processor
    stock = StockInterrogator(config)
    with pytest.warns(FutureWarning):  # the stock code uses the deprecated torch.cuda.amp.autocast
        stock_fast = stock.interrogate_fast(astronaut, max_flavors=6)
    stock_classic = stock.interrogate_classic(astronaut)
    stock_best = stock.interrogate(astronaut, min_flavors=8, max_flavors=6)
    feats = ours.features(astronaut)
    assert ours.fast(feats, 6) == stock_fast
    assert ours.classic(feats, 3) == stock_classic
    assert ours.interrogate(astronaut, "best").prompt == stock_best


@pytest.mark.slow
def test_full_packaged_lists(smoke_models: SmokeModels, tmp_path: Path, astronaut: Image.Image) -> None:
    """The packaged ~106k labels embed once, lose every banned label, and feed real prompts."""
    settings = InterrogateSettings(max_flavors=8, min_flavors=2)
    interrogator = Interrogator.load(
        str(smoke_models.clip), str(smoke_models.caption), settings, CPU, tmp_path
    )
    packaged = label_tables()
    total = sum(len(v) for v in packaged.values())
    banned = BannedTerms.from_settings(settings)
    removed = sum(1 for labels in packaged.values() for label in labels if not banned.allows(label))
    assert total > 100_000 and removed > 50
    assert len(interrogator.bank.labels) == total - removed
    assert all(banned.allows(label) for label in interrogator.bank.labels)
    assert interrogator.bank.embeds.shape == (total - removed, 32)
    result = interrogator.interrogate(astronaut, "fast")
    labels = set(interrogator.bank.labels)
    assert all(part in labels for part in _split(result.prompt, result.caption))
