"""A memory budget shared by concurrent tasks: each reserves the bytes it is about to use, or waits its turn.

An asyncio semaphore counted in bytes rather than in tasks. Waiters are served first come, first served: a
large reservation at the head of the line is not overtaken by smaller ones behind it, so it cannot starve.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass


class OverBudget(ValueError):
    """A reservation larger than the whole budget: it could never be granted."""


@dataclass
class _Waiter:
    size_bytes: int
    granted: asyncio.Future[None]


class MemoryBudget:
    """Up to ``capacity_bytes`` reserved at once; ``reserve`` waits, in order of arrival, until it fits."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"a memory budget needs at least one byte (got {capacity_bytes})")
        self.capacity_bytes = capacity_bytes
        self._in_use = 0
        self._peak = 0
        self._line: collections.deque[_Waiter] = collections.deque()

    @property
    def in_use_bytes(self) -> int:
        """Bytes reserved now."""
        return self._in_use

    @property
    def peak_bytes(self) -> int:
        """The most bytes ever reserved at once."""
        return self._peak

    @property
    def waiting(self) -> int:
        """Reservations waiting for their turn."""
        return len(self._line)

    def fits(self, size_bytes: int) -> bool:
        """Whether a reservation of this size can ever be granted."""
        return size_bytes <= self.capacity_bytes

    @contextlib.asynccontextmanager
    async def reserve(
        self, size_bytes: int, *, on_wait: Callable[[], Awaitable[object]] | None = None
    ) -> AsyncIterator[None]:
        """Hold ``size_bytes`` of the budget for the block; ``on_wait`` is awaited once if it must wait first.

        Raises OverBudget at once for more than the whole budget. A cancelled wait takes nothing.
        """
        await self.acquire(size_bytes, on_wait=on_wait)
        try:
            yield
        finally:
            self.release(size_bytes)

    async def acquire(
        self, size_bytes: int, *, on_wait: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        """Take ``size_bytes``, waiting as `reserve` does; give them back with `release`, all at once or in
        parts (a decode keeps only the picture it made)."""
        if size_bytes < 0:
            raise ValueError(f"cannot reserve a negative size ({size_bytes})")
        if not self.fits(size_bytes):
            raise OverBudget(f"{size_bytes} bytes is more than the whole budget of {self.capacity_bytes}")
        if not self._line and self._in_use + size_bytes <= self.capacity_bytes:
            self._take(size_bytes)
            return
        waiter = _Waiter(size_bytes, asyncio.get_running_loop().create_future())
        self._line.append(waiter)
        try:
            if on_wait is not None:
                await on_wait()
            await waiter.granted
        except BaseException:
            if waiter.granted.done() and not waiter.granted.cancelled():
                # Granted just as the wait was given up: hand the bytes back to whoever is next.
                self.release(size_bytes)
            else:
                waiter.granted.cancel()
                with contextlib.suppress(ValueError):
                    self._line.remove(waiter)
                # A large waiter leaving the head of the line may let smaller ones behind it in.
                self._grant()
            raise

    def _take(self, size_bytes: int) -> None:
        self._in_use += size_bytes
        self._peak = max(self._peak, self._in_use)

    def release(self, size_bytes: int) -> None:
        """Give back bytes taken with `acquire`."""
        if not 0 <= size_bytes <= self._in_use:
            raise ValueError(f"cannot release {size_bytes} bytes of the {self._in_use} reserved")
        self._in_use -= size_bytes
        self._grant()

    def _grant(self) -> None:
        """Grant waiting reservations from the head of the line while they fit."""
        while self._line:
            head = self._line[0]
            if head.granted.done():  # cancelled, and its own except clause removes it
                self._line.popleft()
                continue
            if self._in_use + head.size_bytes > self.capacity_bytes:
                return
            self._line.popleft()
            self._take(head.size_bytes)
            head.granted.set_result(None)
