"""Prompts as the pipeline reads them: emphasis weights, and prompts longer than CLIP's window in windows.

A prompt with no weights that fits the text encoder's window (77 tokens for SD 1.x) goes to the pipeline
as text, exactly as before any of this existed. Any other prompt is encoded with compel, as A1111 does:
every 75 tokens (cut at a comma where one is near) are one window of their own, between start and end
tokens, and the windows' embeddings follow each other, so the UNet reads the whole prompt; each word's
embedding is moved from the empty prompt's by its weight (compel's reading of emphasis).

An image's prompt and negative prompt are padded to the same number of windows with the empty prompt's
embedding, as the pipeline needs and A1111 does. Images needing different numbers of windows do not share a
pipeline call (`windows` tells the caller which do): padding one image's prompt for another's would change
it. SD 1.x and 2.x have one CLIP text encoder and read its last hidden state, as compel does by default.
SDXL reads the penultimate hidden states of its two encoders side by side, plus the second encoder's pooled
embedding of the words (unweighted, first window: as SDXL's own encoding and compel's SDXL mode make it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from i2p2i_bot.loras import strip_tags
from i2p2i_bot.prompt_syntax import Fragment, is_weighted, parse, plain_text
from i2p2i_bot.request import ImageSpec


class PromptEncoder:
    """The text arguments of a batch's pipeline call, from its images' prompts. GPU thread only."""

    def __init__(self, pipe: Any, *, chunks: bool = True) -> None:
        # SDXL's second tokenizer reads the same words into the same windows (one CLIP vocabulary); only
        # its encoder's embeddings differ.
        self.tokenizer = pipe.tokenizer
        self.text_encoders = [pipe.text_encoder]
        self.tokenizers = [pipe.tokenizer]
        # SDXL: a second encoder, whose pooled embedding the UNet reads besides the words'.
        self.xl = getattr(pipe, "text_encoder_2", None) is not None
        if self.xl:
            self.text_encoders.append(pipe.text_encoder_2)
            self.tokenizers.append(pipe.tokenizer_2)
        # Whether a prompt past the window is read in windows; an encoder that cuts it says so (`warnings`).
        self.chunks = chunks
        self.window = int(self.tokenizer.model_max_length)

    def windows(self, spec: ImageSpec) -> int:
        """How many windows of tokens an image's prompts take: its batch runs with others of as many."""
        return max(self._windows(_read(spec.prompt)), self._windows(_read(spec.negative_prompt)))

    def warnings(self, prompt: str, label: str = "prompt") -> list[str]:
        """Say which words of a prompt the text encoder will not read, instead of cutting them silently."""
        if self.chunks:
            return []
        text = prompt_words(prompt)
        encoded = self.tokenizer(text, truncation=False, verbose=False, return_offsets_mapping=True)
        ids = encoded.input_ids
        if len(ids) <= self.window:
            return []
        # Position window-1 is the first token past the window (the window ends with the end token).
        ignored = text[encoded.offset_mapping[self.window - 1][0] :].strip()
        return [
            f"The {label} is {len(ids) - 2} tokens and Stable Diffusion reads only {self.window - 2}; "
            f"this end is ignored: “{ignored}”",
        ]

    def arguments(self, pipe: Any, specs: Sequence[ImageSpec]) -> dict[str, Any]:
        """The pipeline's prompt arguments for these images, which take the same number of windows: their
        texts when every prompt is plain, else one embedding per image."""
        pairs = [(_read(s.prompt), _read(s.negative_prompt)) for s in specs]
        if all(self._plain(fragments) for pair in pairs for fragments in pair):
            return {
                "prompt": [plain_text(p) for p, _ in pairs],
                "negative_prompt": [plain_text(n) for _, n in pairs],
            }
        from compel import Compel

        provider = self._provider()
        empty = torch.cat([p.empty_z for p in self._parts(provider)], dim=-1)
        # Each prompt's word embeddings, and its pooled embedding where the family has one.
        made: dict[tuple[Fragment, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}

        def embed(fragments: tuple[Fragment, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
            found = made.get(fragments)
            if found is None:
                found = self._embed(pipe, provider, fragments)
                made[fragments] = found
            return found

        positive, negative, pooled, negative_pooled = [], [], [], []
        for prompt, negative_prompt in pairs:
            (words, pool), (negative_words, negative_pool) = embed(prompt), embed(negative_prompt)
            pair = Compel._pad_conditioning_tensors_to_same_length(
                [words, negative_words], emptystring_conditioning=empty
            )
            positive.append(pair[0])
            negative.append(pair[1])
            if pool is not None and negative_pool is not None:
                pooled.append(pool)
                negative_pooled.append(negative_pool)
        arguments = {"prompt_embeds": torch.cat(positive), "negative_prompt_embeds": torch.cat(negative)}
        if self.xl:
            arguments["pooled_prompt_embeds"] = torch.cat(pooled)
            arguments["negative_pooled_prompt_embeds"] = torch.cat(negative_pooled)
        return arguments

    def _embed(
        self, pipe: Any, provider: Any, fragments: tuple[Fragment, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One prompt's word embeddings (and pooled one, for SDXL)."""
        text = plain_text(fragments)
        if self._plain(fragments):
            # The pipeline's own encoding, so a plain prompt beside a weighted one is unchanged.
            if self.xl:
                words, _, pool, _ = pipe.encode_prompt(
                    [text], device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
                return words, pool
            return pipe.encode_prompt([text], pipe.device, 1, False)[0], None
        words = provider.get_embeddings_for_weighted_prompt_fragments(
            [[f.text for f in fragments]], [[f.weight for f in fragments]], device=pipe.device
        )
        # The pooled embedding is of the words alone, as compel's SDXL mode makes it.
        pool = provider.get_pooled_embeddings([text], device=pipe.device) if self.xl else None
        return words, pool

    def _plain(self, fragments: tuple[Fragment, ...]) -> bool:
        """Text the pipeline encodes as it is: no weights, and within the window (or past it but cut)."""
        return not is_weighted(fragments) and (not self.chunks or self._fits(plain_text(fragments)))

    def _fits(self, text: str) -> bool:
        return len(self.tokenizer(text, truncation=False, verbose=False).input_ids) <= self.window

    def _windows(self, fragments: tuple[Fragment, ...]) -> int:
        if not self.chunks or self._plain(fragments):
            return 1
        # Tokens only, split into windows as compel splits them; the text encoder is not run.
        tokens, _, _ = self._parts(self._provider())[0].get_token_ids_and_expand_weights(
            [f.text for f in fragments], [f.weight for f in fragments], device="cpu"
        )
        return int(tokens.shape[0]) // self.window

    def _provider(self) -> Any:
        """compel's encoder over the pipeline's text encoders, made per call: its cached empty-prompt
        embedding must follow the text encoders' weights, which a LoRA on a text encoder changes."""
        from compel.embeddings_provider import (
            EmbeddingsProvider,
            EmbeddingsProviderMulti,
            ReturnedEmbeddingsType,
            SplitLongTextMode,
        )

        # A1111 ends a window at the last comma before it; compel at the last phrase mark.
        split = SplitLongTextMode.PHRASES
        if not self.xl:
            return EmbeddingsProvider(
                self.tokenizer, self.text_encoders[0], truncate=not self.chunks, split_long_text_mode=split
            )
        return EmbeddingsProviderMulti(
            self.tokenizers,
            self.text_encoders,
            truncate=not self.chunks,
            returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            requires_pooled_mask=[False, True],
            split_long_text_mode=split,
        )

    def _parts(self, provider: Any) -> list[Any]:
        """compel's one-encoder providers inside `provider`, in the order their embeddings are joined."""
        return list(getattr(provider, "embedding_providers", [provider]))


def prompt_words(prompt: str) -> str:
    """A prompt's words as the text encoder reads them: no LoRA tags, no emphasis brackets or weights."""
    return plain_text(_read(prompt))


def _read(prompt: str) -> tuple[Fragment, ...]:
    """A prompt as the text encoder reads it: its LoRA tags taken out (they choose weights, not words)."""
    return parse(strip_tags(prompt))
