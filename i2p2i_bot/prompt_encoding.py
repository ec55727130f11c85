"""Prompts as the pipeline reads them: emphasis weights, and prompts longer than CLIP's window in windows.

A prompt with no weights that fits the text encoder's window (77 tokens for SD 1.x) goes to the pipeline
as text, exactly as before any of this existed. Any other prompt is encoded with compel, as A1111 does:
every 75 tokens (cut at a comma where one is near) are one window of their own, between start and end
tokens, and the windows' embeddings follow each other, so the UNet reads the whole prompt; each word's
embedding is moved from the empty prompt's by its weight (compel's reading of emphasis).

An image's prompt and negative prompt are padded to the same number of windows with the empty prompt's
embedding, as the pipeline needs and A1111 does. Images needing different numbers of windows do not share a
pipeline call (`windows` tells the caller which do): padding one image's prompt for another's would change
it. SD 1.x and 2.x have one CLIP text encoder and read its last hidden state, as compel does by default;
SDXL's second encoder and pooled embedding will need compel's SDXL mode.
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

    def __init__(
        self, tokenizer: Any, text_encoder: Any, *, chunks: bool = True, weights: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        # Whether a prompt past the window is read in windows; a pipeline whose encoding compel cannot
        # make here (SDXL's) cuts it, and says so (`warnings`).
        self.chunks = chunks
        # Whether emphasis weights are applied; without, the words are read plainly, and `warnings` says so.
        self.weights = weights
        self.window = int(tokenizer.model_max_length)

    def windows(self, spec: ImageSpec) -> int:
        """How many windows of tokens an image's prompts take: its batch runs with others of as many."""
        return max(self._windows(_read(spec.prompt)), self._windows(_read(spec.negative_prompt)))

    def warnings(self, prompt: str, label: str = "prompt") -> list[str]:
        """Say which words of a prompt the text encoder will not read, instead of cutting them silently."""
        notes = []
        if not self.weights and is_weighted(_read(prompt)):
            notes.append(f"This model reads the {label} without its emphasis weights.")
        if self.chunks:
            return notes
        text = prompt_words(prompt)
        encoded = self.tokenizer(text, truncation=False, verbose=False, return_offsets_mapping=True)
        ids = encoded.input_ids
        if len(ids) <= self.window:
            return notes
        # Position window-1 is the first token past the window (the window ends with the end token).
        ignored = text[encoded.offset_mapping[self.window - 1][0] :].strip()
        return [
            *notes,
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
        made: dict[tuple[Fragment, ...], torch.Tensor] = {}

        def embed(fragments: tuple[Fragment, ...]) -> torch.Tensor:
            found = made.get(fragments)
            if found is None:
                if self._plain(fragments):
                    # The pipeline's own encoding, so a plain prompt beside a weighted one is unchanged.
                    found = pipe.encode_prompt([plain_text(fragments)], pipe.device, 1, False)[0]
                else:
                    found = provider.get_embeddings_for_weighted_prompt_fragments(
                        [[f.text for f in fragments]], [[f.weight for f in fragments]], device=pipe.device
                    )
                made[fragments] = found
            return found

        positive, negative = [], []
        for prompt, negative_prompt in pairs:
            pair = Compel._pad_conditioning_tensors_to_same_length(
                [embed(prompt), embed(negative_prompt)], emptystring_conditioning=provider.empty_z
            )
            positive.append(pair[0])
            negative.append(pair[1])
        return {"prompt_embeds": torch.cat(positive), "negative_prompt_embeds": torch.cat(negative)}

    def _plain(self, fragments: tuple[Fragment, ...]) -> bool:
        """Text the pipeline encodes as it is: no weights, and within the window (or past it but cut)."""
        weighted = self.weights and is_weighted(fragments)
        return not weighted and (not self.chunks or self._fits(plain_text(fragments)))

    def _fits(self, text: str) -> bool:
        return len(self.tokenizer(text, truncation=False, verbose=False).input_ids) <= self.window

    def _windows(self, fragments: tuple[Fragment, ...]) -> int:
        if not self.chunks or self._plain(fragments):
            return 1
        # Tokens only, split into windows as compel splits them; the text encoder is not run.
        tokens, _, _ = self._provider().get_token_ids_and_expand_weights(
            [f.text for f in fragments], [f.weight for f in fragments], device="cpu"
        )
        return int(tokens.shape[0]) // self.window

    def _provider(self) -> Any:
        """compel's encoder over the pipeline's text encoder, made per call: its cached empty-prompt
        embedding must follow the text encoder's weights, which a LoRA on the text encoder changes."""
        from compel.embeddings_provider import EmbeddingsProvider, SplitLongTextMode

        return EmbeddingsProvider(
            self.tokenizer,
            self.text_encoder,
            truncate=not self.chunks,
            # A1111 ends a window at the last comma before it; compel at the last phrase mark.
            split_long_text_mode=SplitLongTextMode.PHRASES,
        )


def prompt_words(prompt: str) -> str:
    """A prompt's words as the text encoder reads them: no LoRA tags, no emphasis brackets or weights."""
    return plain_text(_read(prompt))


def _read(prompt: str) -> tuple[Fragment, ...]:
    """A prompt as the text encoder reads it: its LoRA tags taken out (they choose weights, not words)."""
    return parse(strip_tags(prompt))
