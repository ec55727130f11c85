"""The batch payload the bot hands GPU workers: what each image's spec carries across."""

from __future__ import annotations

from i2p2i_bot.remote_wire import batch_from_payload, batch_payload
from i2p2i_bot.request import GenerationParams, ImageSpec

PARAMS = GenerationParams("fake", 4, 7.5, 64, 64, "dpm")


def test_each_spec_keeps_whether_its_flagged_pixels_are_kept() -> None:
    """A worker blacks out a flagged image unless its own spec says its job's channel may show it; a payload
    from a bot that does not say so is blacked out."""
    specs = [ImageSpec("a", "", 1, keep_flagged=True), ImageSpec("b", "", 2, (0.5, 0.5))]
    payload = batch_payload(PARAMS, specs)
    assert batch_from_payload(payload) == (PARAMS, tuple(specs))
    for spec in payload["specs"]:
        del spec["keep_flagged"]
    _, older = batch_from_payload(payload)
    assert [s.keep_flagged for s in older] == [False, False]
