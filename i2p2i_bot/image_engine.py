"""The engine as the bot and the command line use it: describe an image, plan a request, make a batch.

A protocol without torch: the local `Engine` (engine.py) fulfils it, and so can a stand-in in tests or an
engine on another machine.
"""

from __future__ import annotations

from typing import Protocol

from PIL import Image

from i2p2i_bot.batches import BatchMaker
from i2p2i_bot.guides import GuideName
from i2p2i_bot.interrogation import Interrogation
from i2p2i_bot.presets import Presets
from i2p2i_bot.request import GenerationRequest
from i2p2i_bot.server_settings import ServerSettings


class ImageEngine(BatchMaker, Protocol):
    """Every model the product uses; call its methods only from the thread that owns the GPU, but `plan`."""

    @property
    def presets(self) -> Presets:
        """The model presets a request may name (request.preset)."""
        ...

    @property
    def models(self) -> dict[str, str]:
        """Model names as they are recorded next to results (role -> name), for the default preset."""
        ...

    def models_for(self, preset: str | None) -> dict[str, str]:
        """A preset's model names as they are recorded next to results (its CLIP's for its cards)."""
        ...

    def available_presets(self) -> tuple[str, ...]:
        """The names of the presets whose weights are on this machine (a worker runs only those)."""
        ...

    def guides_for(self, preset: str | None) -> tuple[GuideName, ...]:
        """The guides a request of `preset` (None: the default one) may keep: those enabled whose weights
        are loaded and fit its model's family; none for a preset the config does not have. plan refuses
        others, so whatever offers guides to a member asks this with the preset they will be used with."""
        ...

    def plan(self, request: GenerationRequest, server: ServerSettings | None = None) -> GenerationRequest:
        """The request checked against the settings (with a server's changes), every default and its seed
        filled in (no GPU)."""
        ...

    def interrogate(
        self, image: Image.Image, mode: str, key: str | None = None, preset: str | None = None
    ) -> Interrogation:
        """Describe an image in one mode with a preset's CLIP; `key` (the image's hash) lets modes share
        its features."""
        ...
