"""The CLIP text fast path gives what stock tokenizing and `encode_text` give, on the real tokenizer."""

from __future__ import annotations

import pytest
import torch

from i2p2i_bot.clip_text import TextEncoder, joinable, prompt_joinable
from i2p2i_bot.interrogate import ClipEncoder, label_tables
from i2p2i_bot.smoke import SmokeModels

CPU = torch.device("cpu")
PHRASES = [
    "by greg rutkowski",
    "oil on canvas",
    "(artstation)",  # punctuation at both ends: composed, the space before it separates the words
    "café",  # not ASCII: tokenized whole
    "rock & roll",  # an HTML-entity character: tokenized whole
    "trending on artstation",
    "8k",
    "hdr",
    "a very long label " + "with many words " * 12 + "at the end",
]
PROMPTS = [
    "",
    "a cat sitting on a mat",
    "a man's hat",
    "a 'quoted' caption'",  # ends with punctuation, which the comma joins: "',"
    "a photo (by someone)",
    "naïve",  # not ASCII: still shared, since what follows the prompt is ASCII or tokenized whole
    "a cat & a dog",  # an HTML-entity character: no shared prefix
    "a cat, " * 11 + "last words",  # long: most extensions are cut at 77 tokens
    "word " * 73 + "end",  # the prompt alone fills the context
]


@pytest.fixture(scope="module")
def clip(smoke_models: SmokeModels) -> ClipEncoder:
    return ClipEncoder.load(str(smoke_models.clip), CPU)


def stock_embeddings(clip: ClipEncoder, texts: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        features = clip.model.encode_text(clip.tokenize(texts)).float()
    return features / features.norm(dim=-1, keepdim=True)


def test_the_smoke_clip_takes_every_shortcut(clip: ClipEncoder) -> None:
    """The tiny model has the real text tower's structure, so the tests below exercise the fast path."""
    assert clip.text.tokens.supported
    assert clip.text.trims
    assert clip.text.shares_prefix


def test_trimmed_encoding_equals_encode_text_at_full_length(clip: ClipEncoder) -> None:
    texts = ["x", "a photo of a cat", "an astronaut riding a horse, " * 20, "café & bar (artstation)"]
    assert torch.allclose(clip.encode_texts(texts), stock_embeddings(clip, texts), atol=1e-6, rtol=0)


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_extensions_equal_encoding_the_joined_texts(clip: ClipEncoder, prompt: str) -> None:
    joined = [f"{prompt}, {p}" if prompt else p for p in PHRASES]
    ours = clip.encode_extensions(prompt, PHRASES, batch_size=4)
    assert torch.allclose(ours, stock_embeddings(clip, joined), atol=1e-5, rtol=0)


def test_the_shared_prefix_is_computed_once(clip: ClipEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every extension whose tokens start with the prompt's goes through one shared-prefix pass.

    Phrases that cannot be composed are tokenized whole, and here their tokens still start with the
    prompt's, so they share the pass too.
    """
    calls: list[tuple[list[int], int]] = []
    original = TextEncoder._encode_sharing

    def spy(self: TextEncoder, prefix: list[int], suffixes: list[list[int]]) -> torch.Tensor:
        calls.append((prefix, len(suffixes)))
        return original(self, prefix, suffixes)

    monkeypatch.setattr(TextEncoder, "_encode_sharing", spy)
    clip.encode_extensions("a cat sitting on a mat", PHRASES)
    tokens = clip.text.tokens
    assert calls == [([tokens.sot, *tokens.ids("a cat sitting on a mat,")], len(PHRASES))]


def test_other_text_towers_take_the_plain_path(clip: ClipEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tower that does not pool at the end token is encoded by its own encode_text, at full length."""
    monkeypatch.setattr(clip.model, "text_pool_type", "last")
    plain = TextEncoder(clip.model, clip.tokenizer, CPU, clip.context_length)
    assert not plain.trims and not plain.shares_prefix
    seen: list[int] = []
    original = clip.model.encode_text

    def spy(tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        seen.append(tokens.shape[1])
        return original(tokens, normalize=normalize)

    monkeypatch.setattr(clip.model, "encode_text", spy)
    texts = [f"a cat, {p}" for p in PHRASES]
    assert torch.allclose(plain.encode_extensions("a cat", PHRASES), stock_embeddings(clip, texts), atol=1e-6)
    assert seen and set(seen) == {clip.context_length}


@pytest.fixture(scope="module")
def label_ids(clip: ClipEncoder) -> dict[str, list[int]]:
    """Each joinable packaged label's own token ids, from the tokenizer, once for every test that composes
    them (each label's cleaning through ftfy is most of these tests' time)."""
    encode = clip.text.tokens.tokenizer.encode
    return {label: encode(label) for table in label_tables().values() for label in table if joinable(label)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "prompt",
    [
        "a photograph of an astronaut, by greg rutkowski",
        "a portrait (1887)",
        "a mosque, romanized: al-kaʿbah",
    ],
)
def test_composed_tokens_equal_the_tokenizer_on_every_packaged_label(
    clip: ClipEncoder, label_ids: dict[str, list[int]], prompt: str
) -> None:
    """For every joinable label of clip-interrogator's lists, "prompt, label" tokenizes as its pieces."""
    encode = clip.text.tokens.tokenizer.encode
    prefix = encode(f"{prompt},")
    labels = [label for table in label_tables().values() for label in table]
    checked = 0
    for label in labels:
        if joinable(label):
            assert encode(f"{prompt}, {label}") == prefix + label_ids[label], label
            checked += 1
    assert checked > 0.9 * len(labels)


@pytest.mark.slow
@pytest.mark.parametrize(
    "prompt",
    [
        "a photograph of an astronaut, by greg rutkowski",
        "a portrait (1887), by Adélaïde Labille-Guiard",
        "a mosque, romanized: al-kaʿbah",
    ],
)
def test_texts_with_other_labels_reuse_the_prompt_tokens_exactly(
    clip: ClipEncoder, prompt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels that do not compose (not ASCII, "&") are cleaned whole; their ids are still the tokenizer's,
    and for nearly all of them only the part after the prompt is split and run through BPE."""
    tokens = clip.text.tokens
    encode, clean = tokens.tokenizer.encode, tokens.tokenizer.clean_fn
    split: list[str] = []
    original = tokens._split_ids

    def recording(cleaned: str) -> list[int]:
        split.append(cleaned)
        return original(cleaned)

    monkeypatch.setattr(tokens, "_split_ids", recording)
    labels = [label for table in label_tables().values() for label in table]
    others = [label for label in labels if not joinable(label)] + ["rock & roll", "&amp; co", "Ｗｉｄｅ"]
    assert len(others) > 1000
    whole = 0
    for label in others:
        text = f"{prompt}, {label}"
        split.clear()
        assert tokens.joined(f"{prompt},", text) == encode(text), label
        whole += split == [clean(text)]
    assert whole < 0.05 * len(others)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("oil on canvas", True),
        ("8k", True),
        ("(artstation)", True),
        ("trailing.", True),
        ("", False),
        (" leading space", False),
        ("trailing space ", False),
        ("rock &amp roll", False),
        ("café", False),
        ("tab\there", False),
    ],
)
def test_joinable(text: str, expected: bool) -> None:
    assert joinable(text) is expected


@pytest.mark.slow
def test_prompts_ending_in_any_packaged_label_compose_with_plain_labels(
    clip: ClipEncoder, label_ids: dict[str, list[int]]
) -> None:
    """A chain's prompt may take a label that is not plain ASCII; what follows it still composes."""
    encode = clip.text.tokens.tokenizer.encode
    labels = [label for table in label_tables().values() for label in table]
    odd = [label for label in labels if not joinable(label) and prompt_joinable(label)]
    plain = [label for label in labels if joinable(label)][::2500]
    assert len(odd) > 1000 and len(plain) > 40
    for tail in odd:
        prompt = f"a man riding a horse, {tail}"
        prefix = encode(f"{prompt},")
        for label in plain:
            assert encode(f"{prompt}, {label}") == prefix + label_ids[label], (tail, label)
