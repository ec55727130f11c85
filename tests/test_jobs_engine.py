"""The job system with the real engine (tiny models): queue → GPU thread → store, pixels checked."""

from __future__ import annotations

import numpy as np
from PIL import Image

from i2p2i_bot.config import QueueSettings, Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.generate import GenerationRequest
from i2p2i_bot.gpu import GpuWorker
from i2p2i_bot.jobs import JobRequest
from i2p2i_bot.queue import JobQueue
from i2p2i_bot.runner import JobRunner
from i2p2i_bot.store import Store


async def test_jobs_run_on_the_real_engine(
    settings: Settings, engine: Engine, astronaut: Image.Image
) -> None:
    """Two members' jobs share batches, finish, and each stored PNG equals the image its seed makes alone."""
    store = await Store.from_settings(settings)
    gpu = GpuWorker()
    try:
        queue = await JobQueue.open(store, QueueSettings(max_batch_images=3))
        runner = JobRunner(queue, engine, gpu, timeout_s=120)
        runner.start()
        source = engine.interrogate(astronaut, "fast")
        stored = await store.add_interrogation(
            source, source_sha256="a" * 64, models=engine.models, user_id=1, guild_id=None, channel_id=None
        )
        params, _ = engine.generator.plan(GenerationRequest("x"))
        first = await queue.submit(
            JobRequest(
                owner_id=1, prompt="a red kite", params=params, count=2, seed=10, interrogation_id=stored.id
            )
        )
        second = await queue.submit(
            JobRequest(owner_id=2, prompt="a blue boat", params=params, count=2, seed=20)
        )
        await queue.join()
        await runner.stop(5)
        for job, prompt in ((first, "a red kite"), (second, "a blue boat")):
            record = await store.job_record(job.id)
            assert record is not None and record.job.status == "complete"
            assert [m.seed for m in record.images] == list(job.seeds)
            for meta in record.images:
                with Image.open(store.image_path(job.id, meta.index)) as png:
                    stored_pixels = np.asarray(png.convert("RGB"), dtype=np.int16)
                alone = engine.generate(GenerationRequest(prompt, seed=meta.seed)).images[0].image
                assert np.abs(stored_pixels - np.asarray(alone, dtype=np.int16)).max() <= 2
                if job is first:
                    assert meta.fidelity is not None and -1.0 <= meta.fidelity <= 1.0
                else:
                    assert meta.fidelity is None
    finally:
        gpu.close()
        await store.close()
