"""The batch payload the bot hands GPU workers: what each image's spec carries across."""

from __future__ import annotations

import json

import pytest

from i2p2i_bot.batches import Batch, BatchItem
from i2p2i_bot.guides import Guide
from i2p2i_bot.remote_wire import WireError, as_request, batch_from_payload, batch_payload
from i2p2i_bot.request import GenerationParams, ImageSpec

PARAMS = GenerationParams("fake", 4, 7.5, 64, 64, "dpm")


def batch(params: GenerationParams, specs: list[ImageSpec]) -> Batch:
    return Batch(1, params, tuple(BatchItem(job_id=7, index=i, spec=s) for i, s in enumerate(specs)))


def test_each_spec_keeps_whether_its_flagged_pixels_are_kept() -> None:
    """A worker blacks out a flagged image unless its own spec says its job's channel may show it; a payload
    from a bot that does not say so is blacked out."""
    specs = [ImageSpec("a", "", 1, keep_flagged=True), ImageSpec("b", "", 2, (0.5, 0.5))]
    payload = batch_payload(batch(PARAMS, specs))
    assert batch_from_payload(payload) == (PARAMS, tuple(specs))
    for spec in payload["specs"]:
        del spec["keep_flagged"]
    _, older = batch_from_payload(payload)
    assert [s.keep_flagged for s in older] == [False, False]


def test_guides_and_each_images_source_cross_to_the_worker() -> None:
    """A guided batch reaches a worker guided, each image with its own source, and the worker's plan()
    sees the guides: before, the payload dropped them and the worker made prompt-only images."""
    guided = GenerationParams("fake", 4, 7.5, 64, 64, "dpm", keep=(Guide("layout", 0.6), Guide("edges", 0.9)))
    specs = [ImageSpec("a", "", 1, guide_source="aa" * 32), ImageSpec("b", "", 2, guide_source="bb" * 32)]
    payload = json.loads(json.dumps(batch_payload(batch(guided, specs))))  # as it travels, through JSON
    params, back = batch_from_payload(payload)
    assert (params, back) == (guided, tuple(specs))
    request = as_request(params, back[1])
    assert (request.keep, request.guide_source) == (guided.keep, "bb" * 32)
    payload["params"]["keep"] = [{"name": "layout", "weight": 7}]
    with pytest.raises(WireError):
        batch_from_payload(payload)


def test_an_upscale_batch_reaches_the_worker_as_an_upscale() -> None:
    """A worker plans an upscale's images again within generate.upscale_max_side: the payload says the
    batch is one, so a 128-pixel upscale where max_side is 64 is not refused there as too large."""
    upscale = GenerationParams("fake", 4, 7.5, 128, 128, "dpm", keep=(Guide("layout", 0.4),), upscale=True)
    specs = [ImageSpec("a", "", 1, guide_source="aa" * 32)]
    payload = json.loads(json.dumps(batch_payload(batch(upscale, specs))))
    params, back = batch_from_payload(payload)
    assert params == upscale and as_request(params, back[0]).upscale
    del payload["params"]["upscale"]
    assert not batch_from_payload(payload)[0].upscale
