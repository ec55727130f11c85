"""CLIP text encoding for prompt chains: tokens composed from cached pieces, encoded at their real length.

A chain round scores thousands of texts "prompt, label" that share the prompt. Three facts make that cheap
without changing any result:

- CLIP's text transformer is causal and pools at the end token, so the positions after the longest end
  token in a batch cannot change any embedding: a batch is encoded at that length, not at 77.
- The texts share their beginning, so its keys and values are computed once and every text runs only
  its own tokens against them.
- open_clip's BPE tokenizer cleans the text, then splits it into words at whitespace before merging, so
  the tokens of "A, B" are the tokens of "A," followed by those of B whenever cleaning cannot reach across
  the join: the label is plain printable ASCII without "&" (nothing for ftfy or the HTML unescaper to
  change), the prompt has no "&" and no control characters, and neither starts or ends with a space. The
  prompt's side rests on ftfy treating an appended ASCII text as neutral; it is checked for every packaged
  label that is not plain ASCII. Labels are tokenized once. A text with any other label is cleaned whole,
  as the tokenizer would, and only its part after the prompt is split and run through BPE
  (`TextTokens.joined`).

Models or tokenizers this does not recognise take the plain path: the stock tokenizer and `encode_text`.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def joinable(text: str) -> bool:
    """True when text tokenizes the same alone as on either side of ", " (see the module docstring)."""
    return bool(text) and text == text.strip() and "&" not in text and all(" " <= c <= "~" for c in text)


def prompt_joinable(text: str) -> bool:
    """True when "text," and a joinable label after it tokenize as the two apart (module docstring)."""
    return (
        bool(text)
        and text == text.strip()
        and "&" not in text
        and not any(c < " " or "\x7f" <= c <= "\x9f" for c in text)
    )


class TextTokens:
    """BPE ids of texts, without the start and end tokens, cached; `supported` says if composing is exact."""

    def __init__(self, tokenizer: Any, context_length: int, cache_size: int = 200_000) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.tokenizer = tokenizer
        self.context_length = context_length
        self.supported = (
            type(tokenizer) is SimpleTokenizer
            and getattr(tokenizer, "reduction_fn", None) is None
            and getattr(tokenizer.clean_fn, "__name__", "") in ("_clean_lower", "_clean_whitespace")
        )
        self.sot = int(getattr(tokenizer, "sot_token_id", 0))
        self.eot = int(getattr(tokenizer, "eot_token_id", 0))
        self._cache: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._pieces: collections.OrderedDict[str, list[int] | None] = collections.OrderedDict()
        self._split: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._cleaned: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._cache_size = cache_size

    def piece(self, text: str) -> list[int] | None:
        """The ids of a text that composes with others (see `joinable`), else None; both cached."""
        if text in self._pieces:
            return self._pieces[text]
        found = self.ids(text) if joinable(text) else None
        self._pieces[text] = found
        if len(self._pieces) > self._cache_size:
            self._pieces.popitem(last=False)
        return found

    def ids(self, text: str) -> list[int]:
        found = self._cache.get(text)
        if found is None:
            found = list(self.tokenizer.encode(text))
            self._cache[text] = found
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return found

    def joined(self, head: str, text: str) -> list[int]:
        """The ids of text, which begins with head + " ", reusing head's cached ids where that is exact.

        open_clip's encode() cleans the whole text, then splits it into words and punctuation, none of
        which spans a space. So when the cleaned text is the cleaned head, one space, and a rest, its ids
        are the head's followed by the rest's, whatever cleaning did inside each: only the cleaning (ftfy
        on the whole text) is repeated, never the split and BPE of the head.
        """
        cleaned = self.tokenizer.clean_fn(text)
        head_cleaned = self._cleaned.get(head)
        if head_cleaned is None:
            head_cleaned = self._cleaned[head] = self.tokenizer.clean_fn(head)
            if len(self._cleaned) > 64:
                self._cleaned.popitem(last=False)
        if head_cleaned and cleaned.startswith(head_cleaned + " "):
            return [*self.ids(head), *self._split_ids(cleaned[len(head_cleaned) + 1 :])]
        return self._split_ids(cleaned)

    def _split_ids(self, cleaned: str) -> list[int]:
        """encode() after its cleaning step: words and punctuation, each through BPE; cached."""
        found = self._split.get(cleaned)
        if found is None:
            tok = self.tokenizer
            found = []
            for word in tok.pat.findall(cleaned):
                word = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
                found.extend(tok.encoder[piece] for piece in tok.bpe(word).split(" "))
            self._split[cleaned] = found
            if len(self._split) > self._cache_size:
                self._split.popitem(last=False)
        return found

    def row(self, body: Sequence[int]) -> list[int]:
        """Start + body + end, cut to the context with the end token last, as open_clip's tokenizer does."""
        tokens = [self.sot, *body, self.eot]
        if len(tokens) > self.context_length:
            tokens = tokens[: self.context_length]
            tokens[-1] = self.eot
        return tokens


class TextEncoder:
    """Normalised CLIP text embeddings, through the shortcuts above where the model allows them."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device, context_length: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.context_length = context_length
        self.tokens = TextTokens(tokenizer, context_length)
        self.trims = _causal_argmax_pooling(model, context_length)
        self.shares_prefix = self.trims and _plain_blocks(model)

    # --- whole texts ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, D] float32, normalised; exactly what `encode_text` gives for the stock tokens."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.encode_tokens(tokens)

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encode [N, L] token rows (zero-padded after the end token)."""
        if self.trims:
            length = int(tokens.argmax(dim=-1).max()) + 1
            features = self._encode_trimmed(tokens[:, :length])
        else:
            if tokens.shape[1] < self.context_length:
                tokens = F.pad(tokens, (0, self.context_length - tokens.shape[1]))
            features = self.model.encode_text(tokens)
        features = features.float()
        return features / features.norm(dim=-1, keepdim=True)

    def _encode_trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        cast = m.transformer.get_cast_dtype()
        length = tokens.shape[1]
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:length].to(cast)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        return _project(m, x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)])

    # --- extensions of one prompt -------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_extensions(
        self, prompt: str, phrases: Sequence[str], *, batch_size: int = 1024
    ) -> torch.Tensor:
        """Embeddings of f"{prompt}, {phrase}" (or of the phrases alone when prompt is empty)."""
        texts = [f"{prompt}, {p}" if prompt else p for p in phrases]
        prefix = self._prefix_ids(prompt)
        if prefix is None:
            return self._encode_texts_batched(texts, batch_size)
        head = [self.tokens.sot, *prefix]
        room = self.context_length - len(head)  # positions left for a phrase and the end token
        eot = self.tokens.eot
        # Each text as the tokens after the shared head, or as a whole row when it does not start so.
        tails: dict[int, list[int]] = {}
        rows: dict[int, list[int]] = {}
        for i, (phrase, text) in enumerate(zip(phrases, texts, strict=True)):
            piece = self.tokens.piece(phrase)
            if piece is not None and room > 0:
                tails[i] = [*piece[: room - 1], eot] if len(piece) >= room else [*piece, eot]
                continue
            if piece is not None:
                body = [*prefix, *piece]
            elif prompt:
                body = self.tokens.joined(f"{prompt},", text)
            else:
                body = self.tokens.ids(text)
            row = self.tokens.row(body)
            if room > 0 and row[: len(head)] == head:
                tails[i] = row[len(head) :]
            else:
                rows[i] = row
        parts = []
        for start in range(0, len(texts), batch_size):
            chunk = range(start, min(start + batch_size, len(texts)))
            parts.append(
                self._encode_rows(
                    head,
                    [(i - start, tails[i]) for i in chunk if i in tails],
                    [(i - start, rows[i]) for i in chunk if i in rows],
                    len(chunk),
                )
            )
        return torch.cat(parts)

    def _prefix_ids(self, prompt: str) -> list[int] | None:
        """Ids every extension of prompt starts with, or None when they cannot be composed."""
        if not self.tokens.supported or (prompt and not prompt_joinable(prompt)):
            return None
        return self.tokens.ids(f"{prompt},") if prompt else []

    def _encode_rows(
        self,
        head: list[int],
        tails: list[tuple[int, list[int]]],
        rows: list[tuple[int, list[int]]],
        count: int,
    ) -> torch.Tensor:
        """Texts given as tails after the shared head share its keys and values; whole rows go alone."""
        if not self.shares_prefix or len(head) < 2:
            rows = sorted([*rows, *((i, head + tail) for i, tail in tails)])
            tails = []
        parts: list[tuple[list[int], torch.Tensor]] = []
        if tails:
            parts.append(([i for i, _ in tails], self._encode_sharing(head, [t for _, t in tails])))
        if rows:
            parts.append(([i for i, _ in rows], self.encode_tokens(_pad([r for _, r in rows], self.device))))
        out = torch.empty(count, parts[0][1].shape[1], device=self.device)
        for indices, embeds in parts:
            out[indices] = embeds
        return out

    def _encode_sharing(self, prefix: list[int], suffixes: list[list[int]]) -> torch.Tensor:
        """The prefix's keys and values once per layer; each suffix attends to them and to itself."""
        m = self.model
        cast = m.transformer.get_cast_dtype()
        pos = m.positional_embedding.to(cast)
        p = len(prefix)
        head = torch.tensor([prefix], dtype=torch.long, device=self.device)
        tail = _pad(suffixes, self.device)
        n, s = tail.shape
        x_head = m.token_embedding(head).to(cast) + pos[:p]
        x_tail = m.token_embedding(tail).to(cast) + pos[p : p + s]
        # A suffix token sees the whole prefix and the suffix tokens up to itself.
        mask = torch.ones(s, p + s, dtype=torch.bool, device=self.device)
        mask[:, p:] = torch.ones(s, s, dtype=torch.bool, device=self.device).tril()
        blocks = m.transformer.resblocks
        for index, block in enumerate(blocks):
            attn = block.attn
            heads = attn.num_heads
            q_h, k_h, v_h = _qkv(block, x_head, heads)
            q_t, k_t, v_t = _qkv(block, x_tail, heads)
            if index < len(blocks) - 1:  # the prefix's own outputs are needed only as the next layer's input
                a_h = F.scaled_dot_product_attention(q_h, k_h, v_h, is_causal=True)
                x_head = _finish(block, x_head, a_h)
            keys = torch.cat([k_h.expand(n, -1, -1, -1), k_t], dim=2)
            values = torch.cat([v_h.expand(n, -1, -1, -1), v_t], dim=2)
            a_t = F.scaled_dot_product_attention(q_t, keys, values, attn_mask=mask)
            x_tail = _finish(block, x_tail, a_t)
        x_tail = m.ln_final(x_tail)
        pooled = x_tail[torch.arange(n, device=x_tail.device), tail.argmax(dim=-1)]
        features = _project(m, pooled).float()
        return features / features.norm(dim=-1, keepdim=True)

    def _encode_texts_batched(self, texts: Sequence[str], batch_size: int) -> torch.Tensor:
        parts = [self.encode(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        return torch.cat(parts)


def _qkv(block: Any, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attn = block.attn
    h = block.ln_1(x)
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    n, length, width = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, length, heads, width // heads).transpose(1, 2)

    return split(q), split(k), split(v)


def _finish(block: Any, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    n, _, length, _ = attended.shape
    merged = attended.transpose(1, 2).reshape(n, length, x.shape[-1])
    x = x + block.ls_1(block.attn.out_proj(merged))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _project(model: Any, pooled: torch.Tensor) -> torch.Tensor:
    proj = model.text_projection
    if proj is None:
        return pooled
    if isinstance(proj, torch.nn.Linear):
        return proj(pooled)
    return pooled @ proj


def _pad(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[*r, *[0] * (width - len(r))] for r in rows], dtype=torch.long).to(device)


def _causal_argmax_pooling(model: Any, context_length: int) -> bool:
    """open_clip's CLIP text tower with a causal mask and end-token pooling: trimming is exact."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "attn_mask")
    if any(getattr(model, name, None) is None for name in needed):
        return False
    if getattr(model, "text_pool_type", None) != "argmax":
        return False
    if not getattr(model.transformer, "batch_first", True):
        return False
    mask = model.attn_mask
    if tuple(mask.shape) != (context_length, context_length):
        return False
    upper = torch.ones(context_length, context_length, dtype=torch.bool, device=mask.device).triu(1)
    return bool(torch.equal(torch.isinf(mask) & (mask < 0), upper) and not mask[~upper].any())


def _plain_blocks(model: Any) -> bool:
    """Every block is open_clip's pre-norm block around torch's MultiheadAttention, batch first."""
    from open_clip.transformer import ResidualAttentionBlock

    for block in model.transformer.resblocks:
        attn = getattr(block, "attn", None)
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            return False
        if not isinstance(attn, torch.nn.MultiheadAttention) or not attn.batch_first:
            return False
        if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None:
            return False
    return True
