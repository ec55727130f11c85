"""Job events to async subscribers, through bounded buffers that never make the publisher wait."""

from __future__ import annotations

import asyncio
from collections import deque

from i2p2i_bot.jobs import EventKind, JobEvent


class Subscription:
    """Events for one job, one member, or everything; iterate with `async for`.

    When the buffer is full the oldest step-progress event is dropped; other events are always kept. A
    subscription to one job ends after that job's final event.
    """

    def __init__(self, hub: EventHub, job_id: int | None, owner_id: int | None, maxsize: int) -> None:
        self._hub = hub
        self.job_id = job_id
        self.owner_id = owner_id
        self.maxsize = maxsize
        self.dropped = 0
        self._buffer: deque[JobEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def matches(self, event: JobEvent) -> bool:
        if self.job_id is not None and event.job_id != self.job_id:
            return False
        return self.owner_id is None or event.owner_id == self.owner_id

    def offer(self, event: JobEvent) -> None:
        """Buffer an event without ever blocking; called by the hub on the event loop."""
        if self._closed:
            return
        full = len(self._buffer) >= self.maxsize and not self._drop_oldest_step()
        if full and event.kind is EventKind.STEP:
            self.dropped += 1
            return
        self._buffer.append(event)
        if self.job_id is not None and event.kind.terminal:
            self._closed = True
            self._hub.discard(self)
        self._wake()

    def _drop_oldest_step(self) -> bool:
        for i, queued in enumerate(self._buffer):
            if queued.kind is EventKind.STEP:
                del self._buffer[i]
                self.dropped += 1
                return True
        return False

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def pending(self) -> int:
        return len(self._buffer)

    def get_nowait(self) -> JobEvent:
        """The next buffered event; raises asyncio.QueueEmpty when there is none."""
        if not self._buffer:
            raise asyncio.QueueEmpty
        return self._buffer.popleft()

    async def get(self) -> JobEvent:
        """The next event; raises StopAsyncIteration once closed and drained."""
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._buffer.popleft()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> JobEvent:
        return await self.get()

    def close(self) -> None:
        """Stop receiving; events already buffered can still be read."""
        self._closed = True
        self._hub.discard(self)
        self._wake()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class EventHub:
    """Fans job events out to subscribers. Publishing is synchronous and O(subscribers)."""

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._subscribers: list[Subscription] = []

    def subscribe(
        self, *, job_id: int | None = None, owner_id: int | None = None, maxsize: int | None = None
    ) -> Subscription:
        subscription = Subscription(self, job_id, owner_id, maxsize or self.maxsize)
        self._subscribers.append(subscription)
        return subscription

    def discard(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    def publish(self, event: JobEvent) -> None:
        for subscription in tuple(self._subscribers):
            if subscription.matches(event):
                subscription.offer(event)

    def __len__(self) -> int:
        return len(self._subscribers)
