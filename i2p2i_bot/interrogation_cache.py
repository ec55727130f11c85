"""Interrogations through the store: the same image bytes, mode and models are described once.

A miss runs on the GPU thread as its member's turn (gpu_turns.py: members take turns, ahead of generation,
which waits behind one description per member at most); identical requests that arrive meanwhile share it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

from i2p2i_bot.gpu import GpuWorker, Priority
from i2p2i_bot.interrogation import Interrogation
from i2p2i_bot.store import Store, StoredInterrogation

_Key = tuple[str, str, tuple[tuple[str, str], ...]]


class InterrogationCache:
    def __init__(self, store: Store, gpu: GpuWorker) -> None:
        self._store = store
        self._gpu = gpu
        self._running: dict[_Key, asyncio.Task[StoredInterrogation]] = {}
        self._looking_up: dict[_Key, asyncio.Task[Interrogation]] = {}

    async def interrogate(
        self,
        run: Callable[[], Interrogation],
        *,
        source_sha256: str,
        mode: str,
        models: Mapping[str, str],
        user_id: int,
        guild_id: int | None = None,
        channel_id: int | None = None,
    ) -> StoredInterrogation:
        """The stored result for this key, or `run()` on the GPU thread, stored for next time.

        `source_sha256` is the hash of the image file's bytes; `run` is the blocking interrogation in `mode`.
        Every call records the member's request, so their history shows it whether or not it was cached.
        """
        hit = await self._store.find_interrogation(source_sha256, mode, models)
        if hit is not None:
            result_id, interrogation = hit
            return await self._store.add_cache_hit(
                result_id,
                interrogation,
                source_sha256=source_sha256,
                user_id=user_id,
                guild_id=guild_id,
                channel_id=channel_id,
            )
        key: _Key = (source_sha256, mode, tuple(sorted(models.items())))
        shared = self._running.get(key)
        if shared is None:
            compute = self._compute(run, source_sha256, models, user_id, guild_id, channel_id)
            shared = asyncio.create_task(compute)
            self._running[key] = shared
            shared.add_done_callback(lambda _: self._running.pop(key, None))
            return await asyncio.shield(shared)
        first = await asyncio.shield(shared)
        return await self._store.add_cache_hit(
            first.result_id,
            first.interrogation,
            source_sha256=source_sha256,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
        )

    async def result(
        self,
        run: Callable[[], Interrogation],
        *,
        source_sha256: str,
        mode: str,
        models: Mapping[str, str],
        user_id: int | None = None,
    ) -> Interrogation:
        """The stored result for this key, or `run()` on the GPU thread, stored for next time, with no
        member's request: what a card looks up for itself (another mode's negative suggestion, say).

        A card pressed twice while `run` is on the GPU waits for that one run. `user_id` is whose turn on
        the GPU it takes.
        """
        hit = await self._store.find_interrogation(source_sha256, mode, models)
        if hit is not None:
            return hit[1]
        key: _Key = (source_sha256, mode, tuple(sorted(models.items())))
        shared = self._looking_up.get(key)
        if shared is None:
            shared = asyncio.create_task(self._compute_result(run, source_sha256, models, user_id))
            self._looking_up[key] = shared
            shared.add_done_callback(lambda _: self._looking_up.pop(key, None))
        return await asyncio.shield(shared)

    async def _compute_result(
        self,
        run: Callable[[], Interrogation],
        source_sha256: str,
        models: Mapping[str, str],
        user_id: int | None,
    ) -> Interrogation:
        interrogation = await self._gpu.run(run, priority=Priority.INTERROGATE, member=user_id)
        await self._store.add_result(interrogation, source_sha256=source_sha256, models=models)
        return interrogation

    async def _compute(
        self,
        run: Callable[[], Interrogation],
        source_sha256: str,
        models: Mapping[str, str],
        user_id: int,
        guild_id: int | None,
        channel_id: int | None,
    ) -> StoredInterrogation:
        interrogation = await self._gpu.run(run, priority=Priority.INTERROGATE, member=user_id)
        return await self._store.add_interrogation(
            interrogation,
            source_sha256=source_sha256,
            models=models,
            user_id=user_id,
            guild_id=guild_id,
            channel_id=channel_id,
        )
