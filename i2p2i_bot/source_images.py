"""Source images by hash: the normalised uploads a request's guides keep elements of.

The bot keeps each upload under `sources_dir/<sha256>.png` (the store's sources); a job names its guide
source by that hash, so the GPU thread, or a GPU worker elsewhere, finds the same picture whenever the job
runs. The command line holds its sources in memory instead: it has no store, and leaves no files behind.
"""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

from PIL import Image

from i2p2i_bot.i18n import N_
from i2p2i_bot.request import GenerationError

GONE = N_("The source image these guides keep elements of is no longer stored; upload it again.")


class SourceImages:
    """Where the source images named by hash are found: images handed in by this process, then a folder."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._held: dict[str, Image.Image] = {}
        self._lock = threading.Lock()

    def path(self, sha256: str) -> Path | None:
        """Where the normalised image with this hash is kept; None without a folder."""
        return None if self.directory is None else self.directory / f"{sha256}.png"

    def hold(self, sha256: str, image: Image.Image) -> None:
        """Keep an image in memory under its hash, for the life of this object (the command line's)."""
        with self._lock:
            self._held[sha256] = image.convert("RGB")

    def save(self, sha256: str, image: Image.Image) -> Path:
        """Write the normalised image to the folder once; blocking. Concurrent writers of the same image
        each write a temporary file, and the atomic replace makes whichever lands last as good as the
        first."""
        path = self.path(sha256)
        if path is None:
            raise ValueError("these source images have no folder to save to")
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            temp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
            try:
                image.save(temp, format="PNG")
                temp.replace(path)
            finally:
                temp.unlink(missing_ok=True)
        return path

    def open(self, sha256: str) -> Image.Image:
        """The RGB image with this hash; GenerationError, one sentence, when it is no longer kept."""
        with self._lock:
            held = self._held.get(sha256)
        if held is not None:
            return held
        path = self.path(sha256)
        try:
            if path is None:
                raise FileNotFoundError(sha256)
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise GenerationError(GONE) from None
