"""The LoRAs loaded into the resident pipeline, and which of them a batch runs with (GPU side of loras.py).

Each LoRA file is loaded once, with diffusers' adapter API (peft), as an adapter named by its hash, so a
file that changed is a new adapter and never the old one's weights; the most recently used few stay
loaded. A batch with LoRAs switches on exactly its set at its weights (`set_adapters`); a batch without
switches them all off, which leaves the model as it was. A file whose weights do not fit the UNet or text
encoder (another family of Stable Diffusion) is unloaded and refused with one sentence, and remembered.

The fast path must not make wrong images with a LoRA:
- fused attention projections read the fused copy of the query, key and value weights, beside which a
  LoRA's layers are never called: the UNet runs its unfused processors while LoRAs are on, and gets the
  same fused ones back afterwards;
- the compiled UNet was traced without LoRA layers: batches with LoRAs run the eager UNet, and before a
  batch without runs compiled, the LoRA layers are taken out (`unload`), so the compiled code finds the
  modules it was made for.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from i2p2i_bot.i18n import tr
from i2p2i_bot.loras import Lora, LoraError, LoraLibrary, misfit_sentence
from i2p2i_bot.request import GenerationError

log = logging.getLogger(__name__)

# Adapters kept loaded beside the ones a batch uses: a LoRA for SD 1.x is 10–150 MB of GPU memory.
KEEP_LOADED = 8
# The pipeline parts a LoRA may change.
_COMPONENTS = ("unet", "text_encoder")


def pipeline_family(pipe: Any) -> str:
    """The family of Stable Diffusion a pipeline is, as LoRA metadata names them."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    hidden = getattr(getattr(pipe.text_encoder, "config", None), "hidden_size", None)
    return "sd2" if hidden == 1024 else "sd1"


def adapter_name(lora: Lora) -> str:
    """The adapter a LoRA file is loaded as: named by its hash, so a changed file never passes for the old."""
    return f"lora_{lora.sha256[:16]}"


class LoraAdapters:
    """The LoRAs loaded into one pipeline (and the guided pipelines sharing its modules). GPU thread only."""

    def __init__(self, pipe: Any, library: LoraLibrary, *, keep_loaded: int = KEEP_LOADED) -> None:
        self.pipe = pipe
        self.library = library
        self.keep_loaded = keep_loaded
        self._loaded: OrderedDict[str, Lora] = OrderedDict()  # adapter name → the LoRA, least recent first
        self._on = False
        # The fused attention processors, put aside while LoRAs run on the UNet.
        self._fused: dict[str, Any] | None = None

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._loaded)

    def apply(self, loras: Sequence[Lora]) -> None:
        """Switch on exactly these LoRAs at their weights, loading those not loaded; none: all off."""
        if not loras:
            self.off()
            return
        for lora in loras:
            self._load(lora)
        self._unfuse()
        self.pipe.enable_lora()
        self.pipe.set_adapters([adapter_name(lora) for lora in loras], [lora.weight for lora in loras])
        self._on = True

    def off(self) -> None:
        """No LoRA changes the next batch: their layers pass their input through, the fused path is back."""
        if self._on:
            self.pipe.disable_lora()
            self._on = False
        self._refuse_fused()

    def unload(self) -> None:
        """Take every LoRA's layers out of the models, for the compiled UNet that was traced without them."""
        if self._loaded:
            self.pipe.unload_lora_weights()
            self._loaded.clear()
            self._on = False
        self._refuse_fused()

    def _load(self, lora: Lora) -> None:
        name = adapter_name(lora)
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        try:
            path = self.library.path(lora)
            if self.library.sha256(path) != lora.sha256:
                raise LoraError(
                    f"The LoRA “{lora.name}” changed on the server after this was queued; ask again."
                )
        except LoraError as exc:
            raise GenerationError(str(exc)) from None
        self._evict(len(self._loaded) + 1 - self.keep_loaded)
        # Loaded into unfused attention: fusing copies weights, and must not see a LoRA's layers as its own.
        self._unfuse()
        try:
            self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as exc:
            # diffusers takes out what it had put in before raising; a mismatch of shapes says another family.
            self._forget(name)
            log.warning("LoRA %s does not load: %s", lora.name, _first_line(exc))
            self._refuse(lora, tr(None, "its layers have other shapes than this model's"))
        expected = _lora_layers_in(self.pipe.lora_state_dict(str(path.parent), weight_name=path.name)[0])
        placed = self._layers_of(name)
        if placed == 0 or placed < expected:
            self._forget(name)
            unplaced = tr(
                None,
                "{missing} of its {total} layers have no place in this model",
                missing=expected - placed,
                total=expected,
            )
            self._refuse(lora, unplaced)
        self._loaded[name] = lora
        log.info("LoRA %s (%s) loaded as %s: %d layers", lora.name, lora.sha256[:12], name, placed)

    def _refuse(self, lora: Lora, why: str) -> None:
        sentence = misfit_sentence(lora.name, why)
        self.library.refuse(lora.sha256, sentence)
        log.warning("LoRA %s (%s) refused: %s", lora.name, lora.sha256[:12], why)
        raise GenerationError(sentence)

    def _evict(self, count: int) -> None:
        for name in list(self._loaded)[: max(0, count)]:
            self._forget(name)

    def _forget(self, name: str) -> None:
        self._loaded.pop(name, None)
        present = {adapter for names in self.pipe.get_list_adapters().values() for adapter in names}
        if name in present:
            self.pipe.delete_adapters([name])

    def _layers_of(self, name: str) -> int:
        """How many layers of the models took weights of the named adapter."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        count = 0
        for component in _COMPONENTS:
            model = getattr(self.pipe, component, None)
            if model is None:
                continue
            for module in model.modules():
                if isinstance(module, BaseTunerLayer) and name in getattr(module, "lora_A", {}):
                    count += 1
        return count

    def _unfuse(self) -> None:
        unet = self.pipe.unet
        if self._fused is None and getattr(unet, "original_attn_processors", None) is not None:
            current = unet.attn_processors
            if any("Fused" in type(p).__name__ for p in current.values()):
                self._fused = current
                # Copies: set_attn_processor empties the dict it is given.
                unet.set_attn_processor(dict(unet.original_attn_processors))

    def _refuse_fused(self) -> None:
        """The fused processors back, the same objects as before, so the compiled code still fits them."""
        if self._fused is not None:
            self.pipe.unet.set_attn_processor(dict(self._fused))
            self._fused = None


def _lora_layers_in(state_dict: dict[str, Any]) -> int:
    """How many low-rank layers a LoRA state dict (as diffusers converts it) holds: one down matrix each."""
    return sum(1 for key in state_dict if any(m in key for m in ("lora_A.", "lora.down.", "lora_down.")))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
