"""An engine for worker processes in tests and the scale benchmark: FakeEngine's images, a sleep per step.

Selected with I2P2I_TEST_ENGINE=tests.stub_engine:load. I2P2I_STUB_STEP_S sets the sleep per denoising
step; I2P2I_STUB_LOG names a file that gets one JSON line per batch the worker starts (its pid and seeds),
so a test can tell when a batch is on a worker and which one, and whether its process imported torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence

from i2p2i_bot.batches import BatchResult, StepCallback
from i2p2i_bot.config import GenerateSettings, Settings
from i2p2i_bot.request import GenerationParams, ImageSpec
from tests.fake_engine import FakeEngine


class StubEngine(FakeEngine):
    settings = GenerateSettings(steps=2, max_steps=50, width=64, height=64, min_side=64, max_side=128)

    def __init__(self, step_s: float, log_path: str | None) -> None:
        super().__init__()
        self.step_s = step_s
        self.log_path = log_path

    def generate_batch(
        self, params: GenerationParams, specs: Sequence[ImageSpec], on_step: StepCallback | None = None
    ) -> BatchResult:
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as log:
                line = {"pid": os.getpid(), "seeds": [s.seed for s in specs], "torch": "torch" in sys.modules}
                log.write(json.dumps(line) + "\n")

        def slow_step(step: int, total: int) -> None:
            time.sleep(self.step_s)
            if on_step is not None:
                on_step(step, total)

        return super().generate_batch(params, specs, slow_step)


def load(settings: Settings) -> StubEngine:
    return StubEngine(float(os.environ.get("I2P2I_STUB_STEP_S", "0.05")), os.environ.get("I2P2I_STUB_LOG"))
