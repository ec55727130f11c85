"""Whose work the GPU thread takes next: urgent work, members' descriptions in turn, and generation.

Descriptions (interrogations) keep a member waiting on "thinking…", so they go ahead of generation, but
not without limit:

- Members' descriptions take turns round-robin, one per member per pass. A member with nothing waiting
  joins the ring ahead of every member served since their own last turn, so one member's backlog delays
  another member's description by at most the one of theirs that is running.
- Generation waits for at most one description per member: once every member with a description waiting
  has had one since the oldest generation task began to wait, that task goes next.

The ring is kept in order of members' last turns (least recent first), so "every waiting member has had a
turn" is "the member at the head of the ring has had one".

Plain state and no I/O: the GPU worker (gpu.py) holds its lock around every call.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Priority(enum.IntEnum):
    """Which lane a task joins: urgent work first, then descriptions, then generation (see the module)."""

    URGENT = 0
    INTERROGATE = 10
    GENERATE = 20


# Whose description a task is; None for work done for nobody in particular.
Member = int | None


class GpuTurns(Generic[T]):
    """The GPU thread's waiting tasks, handed out one at a time in the order the module describes."""

    def __init__(self) -> None:
        self._urgent: deque[T] = deque()
        self._generation: deque[T] = deque()
        # Members with descriptions waiting, next to serve first; each with its own, oldest first.
        self._ring: OrderedDict[Member, deque[T]] = OrderedDict()
        # The turn (a count of descriptions handed out) each member last had.
        self._last_turn: dict[Member, int] = {}
        self._turns = 0
        # The turn count when the oldest waiting generation task began to wait; None when none waits.
        self._generation_since: int | None = None

    def __len__(self) -> int:
        return len(self._urgent) + len(self._generation) + sum(map(len, self._ring.values()))

    def add(self, task: T, priority: Priority, member: Member = None) -> None:
        """Queue a task; `member` says whose description it is (it matters only for INTERROGATE)."""
        if priority == Priority.URGENT:
            self._urgent.append(task)
        elif priority == Priority.GENERATE:
            if not self._generation:
                self._generation_since = self._turns
            self._generation.append(task)
        elif priority == Priority.INTERROGATE:
            waiting = self._ring.get(member)
            if waiting is None:
                self._join(member, deque([task]))
            else:
                waiting.append(task)
        else:
            raise ValueError(f"no lane for priority {priority!r}")

    def pop(self) -> T | None:
        """The task to run next, taken out; None when nothing waits."""
        if self._urgent:
            return self._urgent.popleft()
        if self._ring and not self._generation_due():
            return self._next_description()
        if self._generation:
            task = self._generation.popleft()
            self._generation_since = self._turns if self._generation else None
            self._forget_turns()
            return task
        return None

    def _generation_due(self) -> bool:
        """Whether a generation task waits and every member in the ring has had a turn since it began to."""
        if self._generation_since is None:
            return False
        head = next(iter(self._ring))
        return self._last_turn.get(head, -1) >= self._generation_since

    def _next_description(self) -> T:
        member, waiting = next(iter(self._ring.items()))
        task = waiting.popleft()
        self._last_turn[member] = self._turns
        self._turns += 1
        if waiting:
            self._ring.move_to_end(member)
        else:
            del self._ring[member]
            self._forget_turns()
        return task

    def _join(self, member: Member, waiting: deque[T]) -> None:
        """Least recent turn first: a member joins ahead of everyone who had a turn after their own last."""
        turn = self._last_turn.get(member, -1)
        later = [other for other in self._ring if self._last_turn.get(other, -1) > turn]
        self._ring[member] = waiting
        for other in later:
            self._ring.move_to_end(other)

    def _forget_turns(self) -> None:
        """With no description and no generation waiting, past turns order nobody: let them go, so the
        record does not grow with every member ever served."""
        if not self._ring and not self._generation:
            self._last_turn.clear()
