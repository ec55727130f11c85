"""The one thread that owns the GPU: every model call runs here, submitted from asyncio or plain threads.

torch is imported only by the helpers that need it, so that a process whose engine does not use it (a
GPU worker running a stand-in engine, the bot with remote workers) starts without its seconds of import.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

from i2p2i_bot.gpu_turns import GpuTurns, Member, Priority

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class GpuClosed(RuntimeError):
    """The GPU thread is stopping and takes no new work."""


class GpuOutOfMemory(Exception):
    """Even a single image does not fit in GPU memory; the message is meant for the user."""


class GpuFault(RuntimeError):
    """A CUDA error left the GPU unusable until the process restarts (see cuda_context_lost).

    `ran` is True for the task whose error did it (that error is the cause), False for a task refused unrun.
    """

    def __init__(self, message: str, *, ran: bool) -> None:
        super().__init__(message)
        self.ran = ran


@dataclass
class _Task:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: concurrent.futures.Future[Any]


class GpuWorker:
    """A single daemon thread that runs submitted callables, surviving every failure.

    Which waiting task runs next is GpuTurns' choice (gpu_turns.py): urgent work, then members'
    descriptions in turn, with generation waiting behind at most one description per member.
    """

    def __init__(self, name: str = "i2p2i-gpu") -> None:
        self._turns: GpuTurns[_Task] = GpuTurns()
        self._closed = False
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._busy_since: float | None = None  # time.monotonic() when the running task started
        self._fault: str | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def pending(self) -> int:
        with self._lock:
            return len(self._turns)

    def busy_for_s(self) -> float:
        """How long the thread has been on its current task (0 when idle): a step that never returns shows."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def device_fault(self) -> str | None:
        """The CUDA error that made the GPU unusable until a restart (see cuda_context_lost); None if none.

        The task that raised it fails with GpuFault(ran=True); from then on every task fails with
        GpuFault(ran=False) without running.
        """
        return self._fault

    def submit(
        self,
        fn: Callable[..., R],
        *args: Any,
        priority: Priority = Priority.GENERATE,
        member: Member = None,
        **kwargs: Any,
    ) -> concurrent.futures.Future[R]:
        """Queue fn(*args, **kwargs) for the GPU thread; the future carries its result or exception.

        `member` is whose description an INTERROGATE task is, so members take turns (see gpu_turns.py).
        """
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise GpuClosed("the GPU worker is shutting down")
            self._turns.add(_Task(fn, args, kwargs, future), Priority(priority), member)
            self._wake.notify()
        return future

    async def run(
        self,
        fn: Callable[..., R],
        *args: Any,
        priority: Priority = Priority.GENERATE,
        member: Member = None,
        **kwargs: Any,
    ) -> R:
        """Run fn on the GPU thread and await its result without blocking the event loop."""
        future = self.submit(fn, *args, priority=priority, member=member, **kwargs)
        return await asyncio.wrap_future(future)

    def close(self, wait: bool = True, timeout_s: float | None = None) -> None:
        """Stop taking work; queued tasks still run, then the thread exits."""
        with self._lock:
            self._closed = True
            self._wake.notify()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _next(self) -> _Task | None:
        """The next task to run, waiting for one; None once closed with nothing left."""
        with self._lock:
            while (task := self._turns.pop()) is None:
                if self._closed:
                    return None
                self._wake.wait()
            return task

    def _loop(self) -> None:
        while (task := self._next()) is not None:
            if not task.future.set_running_or_notify_cancel():
                continue
            if self._fault is not None:
                refused = GpuFault(f"the GPU is unusable until a restart ({self._fault})", ran=False)
                task.future.set_exception(refused)
                continue
            self._busy_since = time.monotonic()
            try:
                result = task.fn(*task.args, **task.kwargs)
            except BaseException as exc:  # the thread must outlive any model failure
                error = exc
                if self._fault is None and cuda_context_lost(exc):
                    self._fault = f"{type(exc).__name__}: {exc}"
                    log.critical("the GPU cannot be used until the process restarts: %s", self._fault)
                    error = GpuFault(f"the GPU is unusable until a restart ({self._fault})", ran=True)
                    error.__cause__ = exc
                task.future.set_exception(error)
                if not isinstance(exc, Exception):
                    log.error("GPU task raised %r; the GPU thread keeps running", exc)
                continue
            finally:
                self._busy_since = None
            task.future.set_result(result)


def cuda_context_lost(exc: BaseException) -> bool:
    """Whether exc is a CUDA error after which this process can no longer use the GPU.

    Kernel faults (an illegal memory access, a device-side assert, a launch failure) are sticky: CUDA fails
    every later call in the process, and only a restart gets the GPU back. Other CUDA errors (a bad launch
    configuration) leave it usable; a synchronisation tells the two apart, and fails only after a sticky one.
    """
    if not isinstance(exc, RuntimeError) or not str(exc).startswith("CUDA error"):
        return False
    torch = sys.modules.get("torch")  # a process that never imported torch has no CUDA context
    if torch is None or not torch.cuda.is_initialized():
        return True  # no context to ask (tests raise such errors on the CPU): take the error at its word
    try:
        for index in range(torch.cuda.device_count()):
            if torch.cuda.memory_reserved(index):  # a device this process works on
                torch.cuda.synchronize(index)
    except RuntimeError:
        return True
    return False


def split_on_oom(
    run: Callable[[Sequence[T]], list[R]],
    items: Sequence[T],
    *,
    on_split: Callable[[int], None] | None = None,
) -> list[R]:
    """Run a batch; on CUDA out-of-memory run each half instead, down to single items.

    Results keep the order of items. A single item that still does not fit raises GpuOutOfMemory.
    """
    import torch

    try:
        return run(items)
    except torch.cuda.OutOfMemoryError:
        # Nothing more happens in the handler: its exception's traceback holds the failed attempt's frames and
        # with them every tensor they made, so memory could be neither freed nor reused by a retry from here.
        pass
    _release_cached_memory()
    if len(items) <= 1:
        raise GpuOutOfMemory("The GPU ran out of memory even for a single image; try a smaller size.")
    half = (len(items) + 1) // 2
    rest = len(items) - half
    log.warning("CUDA out of memory at batch %d; retrying as %d + %d", len(items), half, rest)
    if on_split is not None:
        on_split(half)
    return split_on_oom(run, items[:half], on_split=on_split) + split_on_oom(
        run, items[half:], on_split=on_split
    )


def out_of_memory_as(message: str, run: Callable[[], R]) -> R:
    """run(), with CUDA out-of-memory turned into GpuOutOfMemory(message) once its memory is released."""
    import torch

    try:
        return run()
    except torch.cuda.OutOfMemoryError:
        pass  # as in split_on_oom: the handler's traceback would keep the failed attempt's tensors alive
    _release_cached_memory()
    raise GpuOutOfMemory(message)


def _release_cached_memory() -> None:
    import torch

    # Tensors of the failed attempt that sit in reference cycles are only freed by a collection.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def default_dtype(device: torch.device) -> torch.dtype:
    """The models' precision where nothing else is asked: fp16 on CUDA, fp32 elsewhere."""
    import torch

    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """Turn the models.precision setting into a dtype; 'auto' is `default_dtype`."""
    import torch

    if setting == "auto":
        return default_dtype(device)
    return {"fp16": torch.float16, "fp32": torch.float32}[setting]


def resolve_device(setting: str) -> torch.device:
    """Turn the models.device setting into a torch device; 'auto' prefers CUDA."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"models.device is {setting!r} but CUDA is not available on this machine")
    return device


# Above this much GPU memory two SD generators fit beside the interrogation models (SDXL takes about 7 GB).
_ROOM_FOR_TWO_BYTES = 16 * 1024**3


def resolve_max_resident(setting: int, device: torch.device) -> int:
    """Turn models.max_resident into a count; 0 ('auto'): 2 on a GPU with more than 16 GB, else 1."""
    if setting:
        return setting
    if device.type != "cuda":
        return 1
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    return 2 if total > _ROOM_FOR_TWO_BYTES else 1
