"""Source images carried through Redis to GPU workers that do not share the bot's data folder.

A guided batch names each image's source by hash; a worker opens `<its data dir>/sources/<hash>.png`. So
that a worker on another machine has it, the bot puts each source's PNG bytes in a Redis key with a time
to live before it sends the batch, and the batch carries the PNG's sha256. A worker that lacks the file
fetches it, checks the sha256 and that it decodes, and keeps it under its own data folder, where later
batches find it. Without torch or discord.
"""

from __future__ import annotations

import asyncio
import io
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import cast

import redis.asyncio as redis
from PIL import Image

from i2p2i_bot.i18n import N_
from i2p2i_bot.remote_wire import RESULT_TTL_S, SOURCE_KEY_PREFIX, sha256
from i2p2i_bot.source_images import GONE

# Why a worker could not have a batch's source, for the member whose job fails for it.
NOT_CARRIED = N_("the source image these guides keep elements of did not reach the GPU worker; try again")
NOT_FETCHED = N_("the GPU worker could not fetch the source image these guides keep elements of")
DAMAGED = N_(
    "the source image these guides keep elements of was damaged on its way to the GPU worker; try again"
)


class SourceUnavailable(Exception):
    """A batch's source image cannot be had; the message is one sentence for the member."""


def source_key(name: str) -> str:
    return f"{SOURCE_KEY_PREFIX}{name}"


def _read(directory: Path | None, names: Iterable[str]) -> dict[str, bytes]:
    found = {}
    for name in names:
        try:
            if directory is None:
                raise FileNotFoundError(name)
            found[name] = (directory / f"{name}.png").read_bytes()
        except FileNotFoundError:
            raise SourceUnavailable(GONE) from None
    return found


async def carry(client: redis.Redis, directory: Path | None, names: Iterable[str]) -> dict[str, str]:
    """Put the bot's source PNGs named here in Redis for the workers (each key lives RESULT_TTL_S, renewed
    by each batch that needs it); return each one's sha256. SourceUnavailable when one is no longer kept."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    blobs = await asyncio.to_thread(_read, directory, wanted)
    async with client.pipeline(transaction=False) as pipe:
        for name, blob in blobs.items():
            pipe.set(source_key(name), blob, ex=RESULT_TTL_S)
        await pipe.execute()
    return {name: sha256(blob) for name, blob in blobs.items()}


async def fetch(client: redis.Redis, directory: Path, wanted: Mapping[str, str]) -> None:
    """Make sure each source named here (name -> sha256 of its PNG) lies in `directory`, fetching from Redis
    those that do not; SourceUnavailable, one sentence, for one that is gone or not what the bot sent."""
    for name, digest in wanted.items():
        path = directory / f"{name}.png"
        if path.exists():
            continue
        blob = cast(bytes | None, await client.get(source_key(name)))
        if blob is None:
            raise SourceUnavailable(NOT_CARRIED)
        if sha256(blob) != digest:
            raise SourceUnavailable(DAMAGED)
        await asyncio.to_thread(_keep, path, blob)


def _keep(path: Path, blob: bytes) -> None:
    """Check that the PNG decodes as a member's upload would, then write it whole or not at all."""
    try:
        with Image.open(io.BytesIO(blob)) as image:
            if image.format != "PNG":
                raise ValueError(f"a {image.format} image, not a PNG")
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise SourceUnavailable(DAMAGED) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        temp.write_bytes(blob)
        temp.replace(path)
    finally:
        temp.unlink(missing_ok=True)
