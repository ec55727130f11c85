"""The GPU thread: one owner for every model call, priorities, survival, and OOM splitting."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Sequence

import pytest
import torch

from i2p2i_bot.gpu import (
    GpuClosed,
    GpuFault,
    GpuOutOfMemory,
    GpuWorker,
    Priority,
    cuda_context_lost,
    split_on_oom,
)


async def test_runs_on_the_worker_thread() -> None:
    """Awaited work runs on the one GPU thread and returns its value."""
    gpu = GpuWorker()
    try:
        name = await gpu.run(lambda: threading.current_thread().name)
        assert name == "i2p2i-gpu"
        assert await gpu.run(lambda a, b=0: a + b, 2, b=3) == 5
    finally:
        gpu.close()


async def test_interrogation_jumps_the_generation_queue() -> None:
    """Queued work runs by priority, then in submission order."""
    gpu = GpuWorker()
    gate = threading.Event()
    order: list[str] = []
    try:
        blocker = gpu.submit(gate.wait)
        futures = [
            gpu.submit(order.append, "gen-1", priority=Priority.GENERATE),
            gpu.submit(order.append, "gen-2", priority=Priority.GENERATE),
            gpu.submit(order.append, "describe", priority=Priority.INTERROGATE),
        ]
        gate.set()
        await asyncio.wrap_future(blocker)
        for f in futures:
            await asyncio.wrap_future(f)
        assert order == ["describe", "gen-1", "gen-2"]
    finally:
        gpu.close()


async def test_a_describe_flood_waits_its_turn_behind_other_members_and_generation() -> None:
    """One member's ten describes queued first: another member's describe and a batch each wait behind
    only one of them."""
    gpu = GpuWorker()
    gate = threading.Event()
    order: list[str] = []
    try:
        blocker = gpu.submit(gate.wait, priority=Priority.URGENT)
        futures = [
            *(gpu.submit(order.append, f"a{k}", priority=Priority.INTERROGATE, member=1) for k in range(10)),
            gpu.submit(order.append, "b", priority=Priority.INTERROGATE, member=2),
            gpu.submit(order.append, "batch", priority=Priority.GENERATE),
        ]
        gate.set()
        await asyncio.wrap_future(blocker)
        for f in futures:
            await asyncio.wrap_future(f)
        assert order == ["a0", "b", "batch", *(f"a{k}" for k in range(1, 10))]
    finally:
        gate.set()
        gpu.close()


async def test_thread_survives_failures() -> None:
    """An exception reaches the caller and the thread keeps serving."""
    gpu = GpuWorker()

    def boom() -> None:
        raise RuntimeError("model exploded")

    try:
        with pytest.raises(RuntimeError, match="model exploded"):
            await gpu.run(boom)
        assert await gpu.run(lambda: 42) == 42
        assert gpu.thread.is_alive()
    finally:
        gpu.close()


def test_close_drains_then_refuses() -> None:
    """Closing lets queued work finish and refuses new work."""
    gpu = GpuWorker()
    gate = threading.Event()
    gpu.submit(gate.wait)
    done = gpu.submit(lambda: "finished")
    threading.Timer(0.05, gate.set).start()
    gpu.close(wait=True, timeout_s=10)
    assert done.result(timeout=1) == "finished"
    assert not gpu.thread.is_alive()
    with pytest.raises(GpuClosed):
        gpu.submit(lambda: None)


def test_split_on_oom_halves_until_it_fits() -> None:
    """A batch that runs out of memory is retried in halves; results keep their order."""
    calls: list[int] = []

    def run(items: Sequence[int]) -> list[int]:
        calls.append(len(items))
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [i * 10 for i in items]

    assert split_on_oom(run, list(range(8))) == [0, 10, 20, 30, 40, 50, 60, 70]
    assert calls == [8, 4, 2, 2, 4, 2, 2]


def test_split_on_oom_gives_up_at_one() -> None:
    """When a single item does not fit, the error is one sentence for the user."""

    def run(items: Sequence[int]) -> list[int]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(GpuOutOfMemory, match="even for a single image"):
        split_on_oom(run, [1, 2, 3])


def test_split_on_oom_lets_go_of_the_failed_attempt_before_retrying() -> None:
    """Every retry starts with nothing of a failed attempt still alive, so its memory can be reused.

    A retry made inside the except block would run while the traceback still pins the failed call's
    frame, and so every tensor it had made: on a GPU, the halves would then run out of memory as well.
    """
    made: list[weakref.ref[torch.Tensor]] = []
    alive_when_called: list[int] = []

    def run(items: Sequence[int]) -> list[int]:
        alive_when_called.append(sum(ref() is not None for ref in made))
        activations = torch.ones(len(items), 256)  # what a real attempt would hold on the GPU
        made.append(weakref.ref(activations))
        if len(items) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return [int(row.sum()) + item for row, item in zip(activations, items, strict=True)]

    assert split_on_oom(run, list(range(8))) == [256 + i for i in range(8)]
    assert len(alive_when_called) == 7 and set(alive_when_called) == {0}


def test_split_on_oom_reports_each_split_and_does_not_chain_the_cuda_error() -> None:
    """on_split hears the size of each first half; the final error carries no CUDA traceback to log."""
    halves: list[int] = []

    def run(items: Sequence[int]) -> list[int]:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(GpuOutOfMemory) as caught:
        split_on_oom(run, [1, 2, 3, 4, 5], on_split=halves.append)
    assert halves == [3, 2, 1]  # 5 → 3 + 2, 3 → 2 + 1, 2 → 1 + 1, and the first single item fails
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_busy_for_s_shows_how_long_the_current_task_has_run() -> None:
    """A step that never returns shows as a growing busy time; an idle thread shows zero."""
    worker = GpuWorker()
    release = threading.Event()
    started = threading.Event()

    def hang() -> None:
        started.set()
        release.wait(10)

    try:
        assert worker.busy_for_s() == 0.0
        future = worker.submit(hang)
        assert started.wait(5)
        first = worker.busy_for_s()
        time.sleep(0.05)
        assert worker.busy_for_s() > first > 0.0
        release.set()
        future.result(5)
        worker.submit(lambda: None).result(5)
        assert worker.busy_for_s() == 0.0
    finally:
        release.set()
        worker.close()


ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def test_a_cuda_error_is_taken_at_its_word_where_no_cuda_context_exists() -> None:
    """Only a RuntimeError that CUDA raised counts; out-of-memory and other errors never do."""
    assert cuda_context_lost(RuntimeError(ILLEGAL_ACCESS))
    assert cuda_context_lost(RuntimeError("CUDA error: device-side assert triggered"))
    assert not cuda_context_lost(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not cuda_context_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not cuda_context_lost(ValueError(ILLEGAL_ACCESS))


@pytest.mark.parametrize("sticky", [True, False])
def test_a_synchronisation_tells_a_sticky_cuda_error_from_one_the_gpu_survives(
    sticky: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a live CUDA context, the error is fatal only if synchronising the device used fails too."""
    synchronised: list[int] = []

    def synchronize(index: int) -> None:
        synchronised.append(index)
        if sticky:
            raise RuntimeError(ILLEGAL_ACCESS)

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: 2**20 if index == 1 else 0)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    assert cuda_context_lost(RuntimeError("CUDA error: invalid configuration argument")) is sticky
    assert synchronised == [1]  # not the device this process never touched


async def test_after_a_lost_cuda_context_every_task_is_refused_unrun() -> None:
    """The task that broke the GPU fails with its error as the cause; later ones are refused; close works."""
    gpu = GpuWorker()
    ran: list[str] = []

    def fault() -> None:
        raise RuntimeError(ILLEGAL_ACCESS)

    try:
        assert gpu.device_fault is None
        with pytest.raises(GpuFault, match="illegal memory access") as broke:
            await gpu.run(fault)
        assert broke.value.ran and isinstance(broke.value.__cause__, RuntimeError)
        assert gpu.device_fault == f"RuntimeError: {ILLEGAL_ACCESS}"
        with pytest.raises(GpuFault, match="unusable until a restart") as refused:
            await gpu.run(ran.append, "later")
        assert not refused.value.ran
        assert ran == [] and gpu.thread.is_alive()
    finally:
        gpu.close(timeout_s=5)
    assert not gpu.thread.is_alive()


async def test_an_ordinary_error_leaves_the_gpu_usable() -> None:
    """A model error that is not a CUDA fault is the caller's business alone."""
    gpu = GpuWorker()

    def boom() -> None:
        raise RuntimeError("expected all tensors to be on the same device")

    try:
        with pytest.raises(RuntimeError):
            await gpu.run(boom)
        assert gpu.device_fault is None
        assert await gpu.run(lambda: 7) == 7
    finally:
        gpu.close()
