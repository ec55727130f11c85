"""How many descriptions each member has in flight, held under a cap (interrogate.max_describes_per_user).

A description is in flight from the moment it is accepted until its card is posted or it fails: download,
decode and the turn on the GPU. The check and the hold happen together, before the interaction is answered,
so a refusal is a private first answer rather than a public "thinking…" taken back.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator


class DescribeRefused(Exception):
    """A member asked for more descriptions at once than allowed; the message is one sentence for them."""


class DescribesInFlight:
    """Per-member counts of descriptions in flight; `hold` takes a place under the cap or refuses."""

    def __init__(self, max_per_member: int) -> None:
        if max_per_member < 1:
            raise ValueError("a member may have at least one description in flight")
        self.max_per_member = max_per_member
        self._held: Counter[int] = Counter()

    def count(self, member: int) -> int:
        """How many descriptions `member` has in flight."""
        return self._held[member]

    @contextlib.contextmanager
    def hold(self, member: int) -> Iterator[None]:
        """A place for one description of `member` while the block runs; DescribeRefused past the cap.

        Nothing awaits between the check and the hold, so members' concurrent requests cannot both pass it.
        """
        cap = self.max_per_member
        if self._held[member] >= cap:
            if cap == 1:
                raise DescribeRefused(
                    "You already have 1 picture being described, the most at once; wait for a card, "
                    "then ask again."
                )
            raise DescribeRefused(
                f"You already have {cap} pictures being described, the most at once; wait for a card, "
                "then ask again."
            )
        self._held[member] += 1
        try:
            yield
        finally:
            self._held[member] -= 1
            if not self._held[member]:
                del self._held[member]
