"""The running bot's heartbeat file and the check that reads it (`i2p2i health`, the container HEALTHCHECK).

The bot rewrites `health.json` in its data directory every few seconds with what an operator needs to know:
is it serving, is it connected to Discord's gateway, is the GPU thread alive, is the job runner alive, how
many jobs wait. The file is replaced atomically (a temporary file, then `os.replace`), so a reader never sees
half of one. A heartbeat that stops changing means the process is gone or its event loop is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

log = logging.getLogger(__name__)

HEALTH_FILE = "health.json"
# How often the bot rewrites the heartbeat, and how old one may be before the bot counts as stuck or gone:
# six missed beats, so a slow disk or a long garbage collection pause is not mistaken for a dead bot.
HEARTBEAT_INTERVAL_S = 10.0
STALE_AFTER_S = 60.0
FORMAT = 1

BotState = Literal["starting", "ready", "stopping", "stopped"]
_STATES: tuple[str, ...] = get_args(BotState)


class HeartbeatError(Exception):
    """A heartbeat file that cannot be understood; the message is one line."""


@dataclass(frozen=True)
class BotStatus:
    """What the bot reports about itself at one moment."""

    state: BotState
    gateway_connected: bool
    queued_jobs: int
    running_jobs: int
    gpu_worker_alive: bool
    runner_alive: bool
    queue_paused: bool = False
    # The GPU thread has been on one task for far longer than any batch may take: a step that never returns.
    gpu_stuck: bool = False
    # A CUDA error left the GPU unusable until the process restarts (GpuWorker.device_fault).
    gpu_faulted: bool = False
    # queue.backend = "redis" and Redis cannot be reached: no batch goes out until it can.
    workers_unreachable: bool = False


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat: a status, when it was written and by which process."""

    written_at: float
    started_at: float
    pid: int
    status: BotStatus

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "format": FORMAT,
            "written_at": round(self.written_at, 3),
            # For people reading the file; the check uses written_at.
            "written_at_utc": _utc(self.written_at),
            "started_at": round(self.started_at, 3),
            "pid": self.pid,
            **dataclasses.asdict(self.status),
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Heartbeat:
        try:
            data = json.loads(text)
        except ValueError:
            raise HeartbeatError("not valid JSON") from None
        if not isinstance(data, dict):
            raise HeartbeatError("not a JSON object")
        if data.get("format") != FORMAT:
            raise HeartbeatError(f"unknown format {data.get('format')!r} (this version reads {FORMAT})")
        try:
            written_at = _number(data, "written_at")
            started_at = _number(data, "started_at")
            pid = data["pid"]
            state = data["state"]
            counts = {key: data[key] for key in ("queued_jobs", "running_jobs")}
            flags = {
                key: data[key]
                for key in ("gateway_connected", "gpu_worker_alive", "runner_alive", "queue_paused")
            }
            # Absent in files from older versions.
            flags["gpu_stuck"] = data.get("gpu_stuck", False)
            flags["gpu_faulted"] = data.get("gpu_faulted", False)
            flags["workers_unreachable"] = data.get("workers_unreachable", False)
        except KeyError as exc:
            raise HeartbeatError(f"the field {exc.args[0]} is missing") from None
        if state not in _STATES:
            raise HeartbeatError(f"unknown state {state!r}")
        for key, value in {"pid": pid, **counts}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise HeartbeatError(f"{key} must be a whole number (got {value!r})")
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise HeartbeatError(f"{key} must be true or false (got {value!r})")
        status = BotStatus(state=state, **counts, **flags)
        return cls(written_at=written_at, started_at=started_at, pid=pid, status=status)


@dataclass(frozen=True)
class HealthReport:
    """The verdict on a heartbeat file: healthy or not, and one line saying why."""

    healthy: bool
    reason: str
    heartbeat: Heartbeat | None = None


def write_heartbeat(path: Path, beat: Heartbeat) -> None:
    """Replace the heartbeat file atomically: readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(beat.to_json())
        # mkstemp makes the file private; a monitoring user may need to read it.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_heartbeat(path: Path) -> Heartbeat:
    """The heartbeat in `path`; FileNotFoundError if there is none, HeartbeatError if it is not one."""
    return Heartbeat.from_json(path.read_text(encoding="utf-8"))


def check_health(
    path: Path, *, now: float | None = None, stale_after_s: float = STALE_AFTER_S
) -> HealthReport:
    """Judge the heartbeat file: fresh, serving, connected, with a live GPU thread and job runner."""
    now = time.time() if now is None else now
    try:
        beat = read_heartbeat(path)
    except FileNotFoundError:
        return HealthReport(False, f"no heartbeat file at {path}: the bot is not running or has not started")
    except OSError as exc:
        return HealthReport(False, f"cannot read {path}: {exc.strerror or exc}")
    except HeartbeatError as exc:
        return HealthReport(False, f"{path} is not a heartbeat file: {exc}")
    status = beat.status
    age_s = now - beat.written_at

    def unhealthy(reason: str) -> HealthReport:
        return HealthReport(False, reason, beat)

    if status.state == "stopped":
        return unhealthy(f"the bot stopped at {_utc(beat.written_at)}")
    if age_s > stale_after_s:
        return unhealthy(
            f"the last heartbeat is {age_s:.0f} s old (the limit is {stale_after_s:.0f} s): "
            "the bot is stuck or has died"
        )
    if age_s < -stale_after_s:
        return unhealthy(f"the last heartbeat is dated {-age_s:.0f} s in the future: was the clock changed?")
    if status.state == "starting":
        return unhealthy("the bot is still starting (loading models, connecting to Discord)")
    if status.state == "stopping":
        return unhealthy("the bot is stopping")
    if not status.gpu_worker_alive:
        return unhealthy("the GPU worker thread has died; restart the bot")
    if status.gpu_stuck:
        return unhealthy(
            "the GPU thread has been on one task for more than twice queue.job_timeout_s; restart the bot "
            "(queued jobs resume after the restart)"
        )
    if status.gpu_faulted:
        return unhealthy(
            "a CUDA error left the GPU unusable until the bot restarts; restart the bot "
            "(queued jobs resume after the restart)"
        )
    if not status.runner_alive:
        return unhealthy("the job runner has stopped, so no job will run; restart the bot")
    if status.workers_unreachable:
        return unhealthy(
            "GPU workers unreachable: Redis cannot be reached; jobs wait in the queue and run once it can"
        )
    if not status.gateway_connected:
        return unhealthy("not connected to Discord's gateway (reconnecting, or Discord is unreachable)")
    paused = ", queue paused" if status.queue_paused else ""
    return HealthReport(
        True,
        f"healthy: heartbeat {max(age_s, 0.0):.0f} s ago, connected to Discord, "
        f"{status.queued_jobs} queued and {status.running_jobs} running jobs{paused}",
        beat,
    )


async def run_heartbeat(
    path: Path,
    status: Callable[[], BotStatus],
    *,
    interval_s: float | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Write a heartbeat from `status()` every interval until cancelled; then write a last, 'stopped' one."""
    interval_s = HEARTBEAT_INTERVAL_S if interval_s is None else interval_s
    started_at = clock()
    pid = os.getpid()
    failing = False
    try:
        while True:
            beat = Heartbeat(clock(), started_at, pid, status())
            try:
                # Off the event loop: a slow disk must not stall the bot.
                await asyncio.to_thread(write_heartbeat, path, beat)
            except OSError as exc:
                if not failing:
                    log.warning("cannot write the heartbeat file %s: %s", path, exc)
                failing = True
            else:
                if failing:
                    log.info("the heartbeat file %s is written again", path)
                failing = False
            await asyncio.sleep(interval_s)
    except asyncio.CancelledError:
        # A clean stop says so at once, instead of leaving a heartbeat that goes stale a minute later.
        try:
            final = dataclasses.replace(status(), state="stopped")
            write_heartbeat(path, Heartbeat(clock(), started_at, pid, final))
        except Exception:
            log.exception("could not write the last heartbeat to %s", path)
        raise


def _number(data: dict[str, Any], key: str) -> float:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise HeartbeatError(f"{key} must be a number (got {value!r})")
    return float(value)


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")
