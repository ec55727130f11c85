"""Discord snowflake ids: time-ordered 64-bit ids whose top bits are milliseconds since 2015."""

from __future__ import annotations

import datetime as dt
import itertools
import time

DISCORD_EPOCH_MS = 1_420_070_400_000


class SnowflakeFactory:
    """Makes unique snowflakes; ``at`` (epoch seconds) back-dates one, e.g. for an old interaction."""

    def __init__(self, worker_id: int = 1) -> None:
        self._worker_id = worker_id & 0x1F
        self._increment = itertools.count(1)

    def next(self, at: float | None = None) -> int:
        ms = int((time.time() if at is None else at) * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (self._worker_id << 17) | (next(self._increment) & 0xFFF)


def snowflake_time(snowflake: int) -> float:
    """Epoch seconds encoded in a snowflake."""
    return ((snowflake >> 22) + DISCORD_EPOCH_MS) / 1000


def iso_timestamp(epoch_s: float) -> str:
    """The ISO 8601 form Discord uses for timestamps."""
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).isoformat()
