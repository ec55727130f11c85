"""BLIP's caption decoding, greedy, without the per-token overhead of `generate()`.

transformers' `BlipForConditionalGeneration.generate` is a beam-1 greedy loop, but each token goes through
the generic generation machinery: a fresh causal mask and cross-attention mask built per step, a growing
`EncoderDecoderCache`, logits processors, stopping criteria and per-layer dispatch. For BLIP-large that is
12 decoder layers of small matrix products per token, so on a GPU the Python and launch overhead, not the
arithmetic, sets a caption's time.

`GreedyCaptionDecoder` runs the same computation on the model's own weights with fixed shapes:

- the image's cross-attention keys and values are computed once per caption, for every layer;
- self-attention keys and values go into buffers preallocated for the longest caption, written at the
  current position; attention reads all of them under a mask of the positions written so far;
- query/key/value projections are one matrix product per layer (the three weights concatenated once);
- each step is one function of fixed-shape tensors, which on CUDA is recorded once as a CUDA graph and
  replayed per token (`graphs=True`), or run as is elsewhere.

It reproduces `generate()` only where the model's generation configuration is plain greedy decoding (what
BLIP's published checkpoints ship); `unsupported_caption_model()` says why not otherwise, and the caller
then keeps `generate()`. On the same device and precision the tokens equal `generate()`'s (tested on CPU); the
attention is computed by `scaled_dot_product_attention` instead of transformers' eager matmul-softmax,
so on fp16 a near-tie between two tokens may rarely resolve the other way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Generation settings that would make generate() do something other than plain greedy decoding, with the
# value that leaves it plain. Anything else in a generation config (token ids, lengths, output flags,
# cache choices, sampling knobs that sampling-off ignores) does not change greedy tokens.
_PLAIN_GREEDY: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "penalty_alpha": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "min_length": 0,
    "min_new_tokens": None,
    "guidance_scale": None,
    "watermarking_config": None,
    "constraints": None,
    "stop_strings": None,
    "max_time": None,
    "assistant_model": None,
    "prompt_lookup_num_tokens": None,
}


def unsupported_caption_model(model: Any) -> str | None:
    """Why GreedyCaptionDecoder cannot stand in for model.generate(); None when it can."""
    if type(model).__name__ != "BlipForConditionalGeneration":
        return f"{type(model).__name__} is not BLIP"
    text = model.config.text_config
    if not text.is_decoder or text.hidden_act != "gelu" or text.chunk_size_feed_forward not in (0, None):
        return "the text decoder is configured differently from BLIP's"
    generation = model.generation_config
    for name, plain in _PLAIN_GREEDY.items():
        value = getattr(generation, name, plain)
        if value is not None and value != plain and value not in ((), [], {}):  # None: left at the default
            return f"its generation config sets {name}={value!r}"
    return None


_Saved = tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]  # token, keys, values


@dataclass
class _Buffers:
    """The fixed-shape tensors one step reads and writes (a CUDA graph records their addresses)."""

    image_tokens: int
    token: torch.Tensor  # [1] the current token; the step overwrites it with the next
    position: torch.Tensor  # [1] its position
    slots: torch.Tensor  # [length] 0..length-1, to mask the positions not written yet
    keys: list[torch.Tensor]  # per layer [1, heads, length, head_dim]
    values: list[torch.Tensor]
    cross_keys: list[torch.Tensor]  # per layer [1, heads, image tokens, head_dim]
    cross_values: list[torch.Tensor]


class _Layer:
    """One decoder layer's weights, as the step reads them."""

    def __init__(self, layer: Any) -> None:
        attn = layer.attention.self
        self.qkv_w = torch.cat([attn.query.weight, attn.key.weight, attn.value.weight])
        self.qkv_b = torch.cat([attn.query.bias, attn.key.bias, attn.value.bias])
        self.attn_out = layer.attention.output.dense
        self.attn_norm = layer.attention.output.LayerNorm
        cross = layer.crossattention.self
        self.cross_q = cross.query
        self.cross_k = cross.key
        self.cross_v = cross.value
        self.cross_out = layer.crossattention.output.dense
        self.cross_norm = layer.crossattention.output.LayerNorm
        self.ffn_in = layer.intermediate.dense
        self.ffn_out = layer.output.dense
        self.ffn_norm = layer.output.LayerNorm


class GreedyCaptionDecoder:
    """Greedy BLIP captions with fixed-shape steps; see the module docstring."""

    def __init__(self, model: Any, max_new_tokens: int, *, graphs: bool = True) -> None:
        reason = unsupported_caption_model(model)
        if reason is not None:
            raise ValueError(f"cannot decode this model greedily: {reason}")
        decoder = model.text_decoder
        text = model.config.text_config
        self.max_new_tokens = max_new_tokens
        self.bos = int(text.bos_token_id)
        self.eos = int(text.sep_token_id)  # BLIP's generate() stops at [SEP]
        self.heads = int(text.num_attention_heads)
        self.head_dim = int(text.hidden_size) // self.heads
        embeddings = decoder.bert.embeddings
        self.word = embeddings.word_embeddings
        self.position = embeddings.position_embeddings
        self.embed_norm = embeddings.LayerNorm
        head = decoder.cls.predictions
        self.head_dense = head.transform.dense
        self.head_norm = head.transform.LayerNorm
        self.head_out = head.decoder
        weight = self.word.weight
        self.device, self.dtype = weight.device, weight.dtype
        with torch.inference_mode():
            self.layers = [_Layer(layer) for layer in decoder.bert.encoder.layer]
        # Positions 0 (the start token) .. max_new_tokens - 1 are decoder inputs.
        self.length = max_new_tokens
        self.graphs = graphs and self.device.type == "cuda"
        self._graph: torch.cuda.CUDAGraph | None = None
        self._buffers: _Buffers | None = None

    # --- fixed-shape state ----------------------------------------------------------------------------

    def _allocate(self, image_tokens: int) -> _Buffers:
        def zeros(tokens: int) -> list[torch.Tensor]:
            shape = (1, self.heads, tokens, self.head_dim)
            return [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]

        return _Buffers(
            image_tokens=image_tokens,
            token=torch.zeros(1, dtype=torch.long, device=self.device),
            position=torch.zeros(1, dtype=torch.long, device=self.device),
            slots=torch.arange(self.length, device=self.device),
            keys=zeros(self.length),
            values=zeros(self.length),
            cross_keys=zeros(image_tokens),
            cross_values=zeros(image_tokens),
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[1, n, hidden] → [1, heads, n, head_dim]."""
        return x.view(1, -1, self.heads, self.head_dim).transpose(1, 2)

    def _step(self, b: _Buffers) -> None:
        """One token: reads b.token at b.position and overwrites it with the next token."""
        position = b.position
        x = self.embed_norm(self.word(b.token) + self.position(position)).unsqueeze(0)  # [1, 1, hidden]
        visible = (b.slots <= position).view(1, 1, 1, self.length)
        for i, layer in enumerate(self.layers):
            q, k, v = F.linear(x, layer.qkv_w, layer.qkv_b).chunk(3, dim=-1)
            b.keys[i].index_copy_(2, position, self._heads(k))
            b.values[i].index_copy_(2, position, self._heads(v))
            context = F.scaled_dot_product_attention(
                self._heads(q), b.keys[i], b.values[i], attn_mask=visible
            )
            x = layer.attn_norm(layer.attn_out(context.transpose(1, 2).reshape(1, 1, -1)) + x)
            context = F.scaled_dot_product_attention(
                self._heads(layer.cross_q(x)), b.cross_keys[i], b.cross_values[i]
            )
            x = layer.cross_norm(layer.cross_out(context.transpose(1, 2).reshape(1, 1, -1)) + x)
            x = layer.ffn_norm(layer.ffn_out(F.gelu(layer.ffn_in(x))) + x)
        h = self.head_norm(F.gelu(self.head_dense(x[:, -1])))
        b.token.copy_(self.head_out(h).argmax(dim=-1))

    def _run_step(self, b: _Buffers) -> None:
        if not self.graphs:
            self._step(b)
            return
        if self._graph is None:
            try:
                self._graph = self._capture(b)
            except torch.OutOfMemoryError:
                raise  # this caption fails and says so; the next one tries the capture again
            except RuntimeError as exc:  # a driver or build without graph support: stay eager
                log.warning("caption decoding runs without CUDA graphs: %s", exc)
                self.graphs = False
                self._step(b)
            return  # capturing ran the step once
        self._graph.replay()

    def _capture(self, b: _Buffers) -> torch.cuda.CUDAGraph:
        """Record one step on the current buffers; state is restored so the step still runs once."""
        saved = (b.token.clone(), [k.clone() for k in b.keys], [v.clone() for v in b.values])
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(current)
        # Whatever fails, the buffers are left as they came, after the side stream's work: the eager
        # fallback then runs this step on them.
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up on a side stream, as graph capture asks
                    self._restore(b, saved)
                    self._step(b)
        finally:
            current.wait_stream(stream)
            self._restore(b, saved)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step(b)
        finally:
            self._restore(b, saved)
        graph.replay()
        return graph

    @staticmethod
    def _restore(b: _Buffers, saved: _Saved) -> None:
        token, keys, values = saved
        b.token.copy_(token)
        for buffer, value in zip(b.keys, keys, strict=True):
            buffer.copy_(value)
        for buffer, value in zip(b.values, values, strict=True):
            buffer.copy_(value)

    # --- a caption ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, image_embeds: torch.Tensor) -> list[int]:
        """The caption's token ids, start token first, from one image's vision output [1, tokens, width]."""
        if image_embeds.shape[0] != 1:
            raise ValueError("one image at a time")
        if self._buffers is None or self._buffers.image_tokens != image_embeds.shape[1]:
            self._buffers = self._allocate(image_embeds.shape[1])
            self._graph = None
        b = self._buffers
        for i, layer in enumerate(self.layers):
            b.cross_keys[i].copy_(self._heads(layer.cross_k(image_embeds)))
            b.cross_values[i].copy_(self._heads(layer.cross_v(image_embeds)))
        for buffer in (*b.keys, *b.values):
            buffer.zero_()
        b.token.fill_(self.bos)
        tokens = [self.bos]
        for position in range(self.max_new_tokens):
            b.position.fill_(position)
            self._run_step(b)
            token = int(b.token.item())
            tokens.append(token)
            if token == self.eos:
                break
        return tokens
