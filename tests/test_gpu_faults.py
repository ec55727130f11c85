"""GPU faults on the real (tiny) engine, through the real runner, queue and store.

Faults are injected into the model itself: CUDA out-of-memory from the UNet for batches over two images
or for any, a RuntimeError from the VAE decoder, a CUDA fault that leaves the GPU unusable, and a denoising
step that blocks until released.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from i2p2i_bot.config import QueueSettings
from i2p2i_bot.engine import Engine
from i2p2i_bot.gpu import GpuWorker
from i2p2i_bot.jobs import EventKind, Job, JobStatus
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.request import GenerationParams, GenerationRequest, ImageSpec
from i2p2i_bot.runner import GPU_FAULT_REASON, JobRunner
from i2p2i_bot.store import Store
from tests.requests import job_request

# Stored PNGs against images made alone: batch composition may move a float by an ulp, not a pixel level.
PIXEL_TOLERANCE = 2


@pytest.fixture
def params(engine: Engine) -> GenerationParams:
    """The engine's defaults: 3 steps at 64×64 with classifier-free guidance (two UNet rows per image)."""
    planned = engine.plan(GenerationRequest("x")).params
    assert planned.guidance > 1
    return planned


def patch_module(
    monkeypatch: pytest.MonkeyPatch, module: torch.nn.Module, name: str, fault: Callable[..., Any]
) -> Any:
    """Replace one method on one model instance for this test; returns the original to call through."""
    original = getattr(module, name)
    monkeypatch.setitem(vars(module), name, fault)
    return original


def made_alone(engine: Engine, params: GenerationParams, prompt: str, seed: int) -> np.ndarray:
    """The image a seed makes in a batch of its own."""
    result = engine.generate_batch(params, [ImageSpec(prompt, "", seed)])
    return np.asarray(result.images[0].image, dtype=np.int16)


def stored_pixels(store: Store, job: Job, index: int) -> np.ndarray:
    with Image.open(store.image_path(job.id, index)) as png:
        return np.asarray(png.convert("RGB"), dtype=np.int16)


async def finish(queue: JobQueue, runner: JobRunner) -> None:
    await asyncio.wait_for(queue.join(), timeout=300)
    await runner.stop(grace_s=30)


@pytest.mark.timeout(600)
async def test_out_of_memory_at_batch_eight_splits_and_every_image_matches_its_seed(
    store: Store, gpu: GpuWorker, engine: Engine, params: GenerationParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA OOM for any UNet call over 2 images: the batch of 8 splits to pairs and all 8 images are exact."""
    unet = engine.generator.pipe.unet
    images_per_call: list[int] = []

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        images = sample.shape[0] // 2  # classifier-free guidance: a conditioned and an unconditioned row
        images_per_call.append(images)
        if images > 2:
            # The very class split_on_oom catches: torch.cuda.OutOfMemoryError is another name for it.
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(sample, *args, **kwargs)

    original = patch_module(monkeypatch, unet, "forward", forward)
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=8))
    runner = JobRunner(queue, engine, gpu, timeout_s=300)
    job = await queue.submit(job_request(1, "a lighthouse at dusk", params, count=8, seed=4242))
    events = queue.subscribe(job_id=job.id)
    runner.start()
    kinds = [event.kind async for event in events]
    await finish(queue, runner)

    # One batch of 8 reached the model, failed, and was retried as 4 + 4, each 4 as 2 + 2.
    assert runner.batches_run == 1
    assert [n for n in images_per_call if n > 2] == [8, 4, 4]
    assert images_per_call.count(2) == 4 * params.steps and set(images_per_call) == {2, 4, 8}
    record = await store.job_record(job.id)
    assert record is not None
    assert (record.job.status, record.job.attempts, record.job.error) == (JobStatus.COMPLETE, 0, None)
    assert [image.seed for image in record.images] == list(range(4242, 4250))
    assert kinds.count(EventKind.IMAGE) == 8 and kinds[-1] is EventKind.FINISHED
    for image in record.images:
        alone = made_alone(engine, params, "a lighthouse at dusk", image.seed)
        assert np.abs(stored_pixels(store, job, image.index) - alone).max() <= PIXEL_TOLERANCE
    # The images are not all alike, so matching them one by one means something.
    assert np.abs(stored_pixels(store, job, 0) - stored_pixels(store, job, 1)).max() > 10


@pytest.mark.timeout(600)
async def test_out_of_memory_even_for_one_image_fails_the_job_with_a_sentence_for_the_user(
    store: Store, gpu: GpuWorker, engine: Engine, params: GenerationParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA OOM at every UNet call: the batch of 2 splits to 1 + 1, the first single image fails too, and
    the job fails at once (no retry could fit) with the sentence the member is shown."""
    unet = engine.generator.pipe.unet
    images_per_call: list[int] = []

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        images_per_call.append(sample.shape[0] // 2)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    patch_module(monkeypatch, unet, "forward", forward)
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=2, max_attempts=3))
    runner = JobRunner(queue, engine, gpu, timeout_s=300)
    job = await queue.submit(job_request(1, "a huge mural", params, count=2, seed=9))
    events = queue.subscribe(job_id=job.id)
    runner.start()
    last = [event async for event in events][-1]
    await finish(queue, runner)

    assert images_per_call == [2, 1]
    sentence = "The GPU ran out of memory even for a single image; try a smaller size."
    assert (last.kind, last.error) == (EventKind.FAILED, sentence)
    record = await store.job_record(job.id)
    assert record is not None and record.images == ()
    assert (record.job.status, record.job.attempts, record.job.error) == (JobStatus.FAILED, 0, sentence)
    assert gpu.device_fault is None and runner.batches_run == 1


@pytest.mark.timeout(600)
async def test_a_cuda_fault_holds_its_batch_and_the_rest_for_a_restart(
    store: Store, gpu: GpuWorker, engine: Engine, params: GenerationParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An illegal memory access in the UNet poisons a real CUDA context: the jobs in that batch stay in
    flight with the reason, for the next start to charge and retry, the GPU reports the fault, and the
    runner stops instead of failing every job behind."""
    unet = engine.generator.pipe.unet
    calls: list[int] = []

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(sample.shape[0])
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    patch_module(monkeypatch, unet, "forward", forward)
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=2, max_attempts=3))
    runner = JobRunner(queue, engine, gpu, timeout_s=300)
    submit = queue.submit
    # One image each: the first two share batch 1, the third waits for batch 2.
    in_batch = [await submit(job_request(owner, "a glitch", params, seed=owner)) for owner in (1, 2)]
    behind = await submit(job_request(3, "a calm lake", params, seed=3))
    await asyncio.wait_for(runner.start(), timeout=300)

    assert calls == [4]  # one UNet call for the batch: neither split nor retried
    assert gpu.device_fault == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert not runner.running and runner.batches_run == 1
    in_flight = {job.id: flag for job, flag in await store.active_jobs()}
    for job in in_batch:
        record = await store.job_record(job.id)
        assert record is not None and record.images == ()
        assert (record.job.status, record.job.attempts) == (JobStatus.RUNNING, 0)
        assert record.job.error == GPU_FAULT_REASON and in_flight[job.id]
    waiting = await store.job_record(behind.id)
    assert waiting is not None and waiting.job.status is JobStatus.QUEUED and waiting.job.attempts == 0
    await runner.stop()


@pytest.mark.timeout(600)
async def test_a_model_that_raises_fails_its_job_with_a_reason_and_the_queue_goes_on(
    store: Store, gpu: GpuWorker, engine: Engine, params: GenerationParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The VAE raises whenever it decodes one job's latents: the shared batch is retried job by job, that
    job fails after max_attempts with a readable reason, and the jobs beside and behind it complete."""
    vae = engine.generator.pipe.vae
    poisoned = {100, 101}  # the unlucky job's seeds
    decoded: list[set[int]] = []

    def decode(latents: torch.Tensor, *args: Any, generator: Any = None, **kwargs: Any) -> Any:
        # The pipeline hands the VAE one seeded generator per image, which says whose latents these are.
        seeds = {g.initial_seed() for g in (generator if isinstance(generator, list) else [generator]) if g}
        decoded.append(seeds)
        if seeds & poisoned:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
        return original(latents, *args, generator=generator, **kwargs)

    original = patch_module(monkeypatch, vae, "decode", decode)
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=4, max_attempts=2))
    runner = JobRunner(queue, engine, gpu, timeout_s=300)
    submit = queue.submit
    unlucky = await submit(job_request(1, "a red kite", params, count=2, seed=100))
    beside = await submit(job_request(2, "a blue boat", params, count=2, seed=200))
    behind = await submit(job_request(3, "a green hill", params, count=1, seed=300))
    runner.start()
    await finish(queue, runner)

    # Once in the shared first batch, then twice alone (max_attempts); never again after it failed.
    assert [seeds for seeds in decoded if seeds & poisoned][1:] == [poisoned, poisoned]
    assert len(decoded[0]) == 4 and decoded[0] & poisoned
    failed = await store.job_record(unlucky.id)
    assert failed is not None and failed.images == ()
    assert (failed.job.status, failed.job.attempts) == (JobStatus.FAILED, 2)
    assert (
        failed.job.error == "generation failed with an internal error (RuntimeError) (gave up after 2 tries)"
    )
    for job, prompt in ((beside, "a blue boat"), (behind, "a green hill")):
        record = await store.job_record(job.id)
        assert record is not None and record.job.status is JobStatus.COMPLETE and record.job.attempts == 0
        assert [image.seed for image in record.images] == list(job.request.seeds)
        for image in record.images:
            alone = made_alone(engine, params, prompt, image.seed)
            assert np.abs(stored_pixels(store, job, image.index) - alone).max() <= PIXEL_TOLERANCE


@pytest.mark.timeout(600)
async def test_a_hung_step_fails_its_job_after_the_timeout_and_the_next_job_completes(
    store: Store,
    gpu: GpuWorker,
    engine: Engine,
    params: GenerationParams,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A denoising step blocks: the job fails with "took longer than …"; once the step is released, the
    abandoned batch's late images are thrown away and the job queued behind it completes."""
    unet = engine.generator.pipe.unet
    hang = threading.Event()
    hang.set()
    hanging = threading.Event()
    release = threading.Event()

    def forward(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if hang.is_set():
            hang.clear()  # only the first step of the first batch hangs
            hanging.set()
            release.wait(120)
        return original(sample, *args, **kwargs)

    original = patch_module(monkeypatch, unet, "forward", forward)
    timeout_s = 5.0  # generous: under load one 64×64 image must still fit in it
    queue = await JobQueue.open(store, QueueSettings(max_batch_images=1, job_timeout_s=timeout_s))
    runner = JobRunner(queue, engine, gpu, timeout_s=timeout_s)
    stuck = await queue.submit(job_request(1, "a stuck clock", params, seed=7))
    waiting = queue.subscribe(job_id=stuck.id)
    after = await queue.submit(job_request(2, "a moving train", params, seed=8))
    runner.start()
    try:
        events = [event async for event in waiting]
        assert hanging.is_set() and not release.is_set()  # it failed while the step was still blocked
    finally:
        release.set()
    await finish(queue, runner)

    assert events[-1].kind is EventKind.FAILED
    assert events[-1].error == "generation took longer than 5 s and was abandoned"
    failed = await store.job_record(stuck.id)
    assert failed is not None and failed.job.status is JobStatus.FAILED and failed.images == ()
    assert not (tmp_path / "images" / str(stuck.id)).exists()  # its late images were never written
    done = await store.job_record(after.id)
    assert done is not None and done.job.status is JobStatus.COMPLETE and done.job.error is None
    alone = made_alone(engine, params, "a moving train", 8)
    assert np.abs(stored_pixels(store, after, 0) - alone).max() <= PIXEL_TOLERANCE
