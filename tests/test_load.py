"""A hundred members using the real bot at once: every interaction answered once, no job lost or doubled."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from i2p2i_bot.config import Settings
from i2p2i_bot.engine import Engine
from i2p2i_bot.source_images import SourceImages
from tests.bot_harness import INTERACTIONS_PER_MEMBER, quick_engine, run_crowd

MEMBERS = 100
EPHEMERAL = 64
# The first callback each kind of interaction must get: 5 deferred, 4 a message, 9 a modal.
FIRST_RESPONSE = {
    "/imagine-from": 5,
    "context menu": 5,
    "Generate": 5,
    "Reroll": 5,
    "modal submit": 5,
    "Info": 4,
    "/queue": 4,
    "Cancel": 4,
    "/history": 4,
    "/job": 4,
    "Edit prompt": 9,
}


async def test_hundred_members_ten_interactions_each(
    base_settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    """100 members × 10 interactions at once: one callback each, every job finished and delivered once."""
    fast = quick_engine(engine, steps=1)  # the fewest steps the settings allow
    run, report, server = await run_crowd(base_settings, tmp_path / "data", fast, members=MEMBERS)
    members = [f"member{k:03d}" for k in range(MEMBERS)]

    assert run.problems == []
    assert report.internal_errors == []
    assert report.failures(run) == []
    per_member = Counter(sent.member for sent in run.sent)
    assert per_member == dict.fromkeys(members, INTERACTIONS_PER_MEMBER)
    kinds = Counter(sent.kind for sent in run.sent)
    assert kinds["/imagine-from"] == 80 and kinds["context menu"] == 20
    for kind in ("Generate", "Reroll", "Edit prompt", "modal submit", "/queue", "/history", "/job"):
        assert kinds[kind] == MEMBERS, kind
    assert kinds["Cancel"] + kinds["Info"] == 2 * MEMBERS

    # Exactly one callback for every interaction the fake sent, accepted, of the right type; none unanswered.
    assert set(report.callbacks) == {sent.handle.id for sent in run.sent}
    assert report.callback_counts() == {1: MEMBERS * INTERACTIONS_PER_MEMBER}
    for sent in run.sent:
        (callback,) = report.callbacks[sent.handle.id]
        assert callback.ok and callback is sent.ack
        assert callback.json["type"] == FIRST_RESPONSE[sent.kind], (sent.kind, callback.json)
        if callback.json["type"] == 4:
            assert callback.json["data"]["flags"] & EPHEMERAL, (sent.kind, callback.json)

    # No job lost: the jobs members saw accepted are exactly the jobs stored, three per member.
    assert set(report.jobs) == set(run.jobs) and len(run.jobs) == 3 * MEMBERS
    user_ids = {name: server.user(name).id for name in members}
    cancels = [
        sent
        for sent in run.sent
        if sent.kind == "Cancel"
        and sent.ack is not None
        and sent.ack.json["data"]["content"].startswith("Cancelled job #")
    ]
    statuses = Counter(job.status for job in report.jobs.values())
    assert statuses == {"complete": 3 * MEMBERS - len(cancels), "cancelled": len(cancels)}
    for job_id, job in report.jobs.items():
        assert job.owner_id == user_ids[run.jobs[job_id]]
        assert job.count in (1, 2)
        if job.status == "complete":
            assert job.images == job.count, job
        else:
            assert job.images <= job.count, job
        # Delivered exactly once, with every image it kept (and a grid when there are several).
        assert job.delivered, job
        (delivery,) = report.deliveries[job_id]
        assert len(delivery.files) == job.expected_files, (job, [f.filename for f in delivery.files])
    assert set(report.deliveries) == set(report.jobs)


def test_one_image_saved_by_two_members_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two members describing the same picture at the same moment both get it stored, and intact."""
    both_written = threading.Barrier(2, timeout=10)
    original_save = Image.Image.save

    def save_then_wait(image: Image.Image, *args: object, **kwargs: object) -> None:
        original_save(image, *args, **kwargs)  # type: ignore[arg-type]
        both_written.wait()  # both copies are on disk before either is moved into place

    monkeypatch.setattr(Image.Image, "save", save_then_wait)
    picture = Image.new("RGB", (16, 16), (200, 40, 40))
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: SourceImages(tmp_path).save("ab" * 32, picture), range(2)))
    assert paths[0] == paths[1] == tmp_path / f"{'ab' * 32}.png"
    with Image.open(paths[0]) as stored:
        assert stored.size == (16, 16) and stored.convert("RGB").getpixel((3, 3)) == (200, 40, 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{'ab' * 32}.png"]  # no temporary file left
