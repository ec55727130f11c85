"""The byte-counting semaphore that bounds the memory decodes take together."""

from __future__ import annotations

import asyncio

import pytest

from i2p2i_bot.memory_budget import MemoryBudget, OverBudget


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(10):
        await asyncio.sleep(0)


class Holder:
    """A task that reserves `size` bytes and keeps them until released; records what happened."""

    def __init__(self, budget: MemoryBudget, name: str, size: int, log: list[str]) -> None:
        self.release = asyncio.Event()
        self.waited = False
        self.task = asyncio.create_task(self._run(budget, name, size, log))

    async def _run(self, budget: MemoryBudget, name: str, size: int, log: list[str]) -> None:
        async def on_wait() -> None:
            self.waited = True
            log.append(f"{name} waits")

        async with budget.reserve(size, on_wait=on_wait):
            log.append(f"{name} in ({budget.in_use_bytes})")
            await self.release.wait()
        log.append(f"{name} out")


async def test_reservations_that_fit_go_in_at_once_and_the_rest_wait_in_order() -> None:
    """Within the budget nothing waits; past it, waiters are let in first come, first served, each only
    once its bytes fit, and a large waiter at the head is not overtaken by a smaller one behind it."""
    budget = MemoryBudget(100)
    log: list[str] = []
    a = Holder(budget, "a", 60, log)
    b = Holder(budget, "b", 40, log)
    await settle()
    big = Holder(budget, "big", 90, log)
    small = Holder(budget, "small", 10, log)
    await settle()
    assert log == ["a in (60)", "b in (100)", "big waits", "small waits"]
    assert not a.waited and not b.waited and big.waited and small.waited
    assert budget.waiting == 2

    a.release.set()
    await settle()
    # 40 in use: the small one would fit now, but the big one is first in line.
    assert log[-1] == "a out" and budget.in_use_bytes == 40
    b.release.set()
    await settle()
    assert log[-3:] == ["b out", "big in (100)", "small in (100)"]  # both let in by the same release
    big.release.set()
    small.release.set()
    await asyncio.gather(a.task, b.task, big.task, small.task)
    assert budget.in_use_bytes == 0 and budget.peak_bytes == 100 and budget.waiting == 0


async def test_more_than_the_whole_budget_is_refused_at_once() -> None:
    budget = MemoryBudget(100)
    assert budget.fits(100) and not budget.fits(101)
    with pytest.raises(OverBudget):
        async with budget.reserve(101):
            pass
    assert budget.in_use_bytes == 0


async def test_a_cancelled_wait_takes_nothing_and_lets_the_next_in() -> None:
    """A waiter that gives up (its member left, the bot stops) leaves the line; one behind it that fits
    goes in at once instead of waiting for the bytes the leaver would have taken."""
    budget = MemoryBudget(100)
    log: list[str] = []
    first = Holder(budget, "first", 50, log)
    await settle()
    leaver = Holder(budget, "leaver", 80, log)
    behind = Holder(budget, "behind", 30, log)
    await settle()
    assert log == ["first in (50)", "leaver waits", "behind waits"]
    leaver.task.cancel()
    await settle()
    assert log[-1] == "behind in (80)" and budget.in_use_bytes == 80 and budget.waiting == 0
    first.release.set()
    behind.release.set()
    await asyncio.gather(first.task, behind.task)
    assert leaver.task.cancelled() and budget.in_use_bytes == 0


async def test_a_wait_cancelled_just_as_it_was_granted_gives_the_bytes_back() -> None:
    """Granted, then cancelled before it could run: the bytes go back instead of being lost for good."""
    budget = MemoryBudget(100)
    log: list[str] = []
    async with budget.reserve(100):
        second = Holder(budget, "second", 100, log)
        await settle()
        assert log == ["second waits"]
    # Leaving the block granted `second` without letting it run yet.
    assert budget.waiting == 0 and budget.in_use_bytes == 100
    second.task.cancel()
    await asyncio.gather(second.task, return_exceptions=True)
    assert second.task.cancelled() and log == ["second waits"]
    assert budget.in_use_bytes == 0


def test_a_budget_needs_a_size() -> None:
    with pytest.raises(ValueError):
        MemoryBudget(0)


async def test_bytes_go_back_in_parts_and_never_more_than_were_taken() -> None:
    """A decode keeps the part its picture holds and returns the rest; whoever waits for the returned part
    goes in at once."""
    budget = MemoryBudget(100)
    log: list[str] = []
    await budget.acquire(80)
    waiter = Holder(budget, "waiter", 50, log)
    await settle()
    budget.release(30)
    await settle()
    assert log == ["waiter waits", "waiter in (100)"]
    with pytest.raises(ValueError):
        budget.release(101)
    budget.release(50)
    waiter.release.set()
    await waiter.task
    assert budget.in_use_bytes == 0
