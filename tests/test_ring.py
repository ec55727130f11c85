"""The fair ring driven directly: member order, batch assembly, solo jobs, requeues and position figures.

The property tests run random sequences of adds, takes, results, failures and cancels against a plain model of
each job's waiting images, and check every batch the ring hands out against it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from i2p2i_bot.request import GenerationParams
from i2p2i_bot.ring import FairRing, Pick, Place

SMALL = GenerationParams("tiny", 2, 7.5, 64, 64, "dpm")
LARGE = dataclasses.replace(SMALL, width=128)
SLOW = dataclasses.replace(SMALL, steps=20)
A, B, C, D = 1, 2, 3, 4
NAMES = {A: "A", B: "B", C: "C", D: "D"}

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, database=None)


class Jobs:
    """Adds jobs with increasing ids, as the store numbers them, and remembers whose each one is."""

    def __init__(self, ring: FairRing) -> None:
        self.ring = ring
        self.owner: dict[int, int] = {}
        self._next_id = 1

    def add(self, owner: int, count: int, params: GenerationParams = SMALL, *, solo: bool = False) -> int:
        job_id = self._next_id
        self._next_id += 1
        self.owner[job_id] = owner
        self.ring.add(job_id, owner, params, range(count), solo=solo)
        return job_id

    def take(self) -> Pick:
        pick = self.ring.plan()
        assert pick is not None
        self.ring.take(pick)
        return pick

    def owners(self, pick: Pick) -> str:
        return "".join(NAMES[self.owner[job_id]] for job_id, _ in pick.items)


def test_members_are_served_round_robin_one_image_each_per_pass() -> None:
    """Batches interleave members one image per pass; a pass cut by a batch's end goes on in the next."""
    jobs = Jobs(FairRing(4))
    for owner, count in ((A, 4), (A, 4), (A, 4), (B, 4), (C, 2), (C, 2)):
        jobs.add(owner, count)
    batches = [jobs.owners(jobs.take()) for _ in range(5)]
    assert batches == ["ABCA", "BCAB", "CABC", "AAAA", "AAAA"]
    assert jobs.ring.plan() is None


def test_a_member_with_other_params_is_skipped_and_goes_next() -> None:
    """A member whose next job has other params sits out a batch but keeps its place, so it leads the next."""
    jobs = Jobs(FairRing(4))
    a = jobs.add(A, 2)
    c = jobs.add(C, 2, LARGE)
    b = jobs.add(B, 2)
    first = jobs.take()
    assert first == Pick(SMALL, ((a, 0), (b, 0), (a, 1), (b, 1)))
    assert jobs.take() == Pick(LARGE, ((c, 0), (c, 1)))


def test_a_member_stops_at_its_first_job_with_other_params() -> None:
    """A member's later jobs never overtake an earlier one with other params."""
    jobs = Jobs(FairRing(8))
    first = jobs.add(A, 1)
    jobs.add(A, 2, LARGE)
    jobs.add(A, 2)
    b = jobs.add(B, 3)
    assert jobs.take() == Pick(SMALL, ((first, 0), (b, 0), (b, 1), (b, 2)))


def test_a_plan_limited_to_what_can_run_passes_over_the_rest_and_they_keep_their_places() -> None:
    """Jobs nothing can run now are passed over (a member's later job that can run goes instead); members
    with nothing that can run keep their places and lead once their jobs can run."""
    jobs = Jobs(FairRing(4))
    a_large = jobs.add(A, 2, LARGE)
    a_small = jobs.add(A, 2)
    b = jobs.add(B, 2)
    c = jobs.add(C, 1, LARGE)
    small_only = jobs.ring.plan(lambda params: params != LARGE)
    assert small_only == Pick(SMALL, ((a_small, 0), (b, 0), (a_small, 1), (b, 1)))
    jobs.ring.take(small_only)
    assert jobs.ring.plan(lambda params: params != LARGE) is None
    assert jobs.ring.waiting(a_large) == {0, 1} and jobs.ring.waiting(a_small) == frozenset()
    assert jobs.take() == Pick(LARGE, ((c, 0), (a_large, 0), (a_large, 1)))
    assert jobs.ring.plan() is None


def test_a_solo_job_runs_alone() -> None:
    """A solo job fills a batch by itself when its member's turn comes, and does not join anyone else's."""
    jobs = Jobs(FairRing(4))
    a = jobs.add(A, 2)
    b = jobs.add(B, 6, solo=True)
    c = jobs.add(C, 2)
    assert jobs.take() == Pick(SMALL, ((a, 0), (c, 0), (a, 1), (c, 1)))
    assert jobs.take() == Pick(SMALL, ((b, 0), (b, 1), (b, 2), (b, 3)))
    assert jobs.take() == Pick(SMALL, ((b, 4), (b, 5)))


def test_requeued_images_go_first_and_their_member_to_the_front() -> None:
    """Images handed back go to the front of their job, their member to the front of the ring."""
    jobs = Jobs(FairRing(2))
    a = jobs.add(A, 3)
    b = jobs.add(B, 3)
    assert jobs.take() == Pick(SMALL, ((a, 0), (b, 0)))
    assert jobs.take() == Pick(SMALL, ((a, 1), (b, 1)))
    jobs.ring.requeue(b, [0])
    assert jobs.ring.pending(b) == 2
    assert jobs.take() == Pick(SMALL, ((b, 0), (a, 2)))
    assert jobs.take() == Pick(SMALL, ((b, 2),))


def test_a_member_whose_retried_job_is_cancelled_goes_back_to_its_turn() -> None:
    """The front of the ring is for retrying handed-back images: when the job they belong to is cancelled,
    its member goes back behind those waiting since before its last turn, not first with its next job."""
    jobs = Jobs(FairRing(1))
    a1 = jobs.add(A, 1)
    a2 = jobs.add(A, 1)
    b = jobs.add(B, 2)
    assert jobs.take().items == ((a1, 0),)
    jobs.ring.requeue(a1, [0])
    jobs.ring.remove(a1)
    assert jobs.take().items == ((b, 0),)
    assert jobs.take().items == ((a2, 0),)
    assert jobs.take().items == ((b, 1),)


def test_a_shared_failure_makes_each_job_retry_alone() -> None:
    """Requeued with solo, jobs that shared a failed batch each run alone, in the order they ran."""
    jobs = Jobs(FairRing(4))
    a = jobs.add(A, 1)
    b = jobs.add(B, 1)
    assert jobs.take() == Pick(SMALL, ((a, 0), (b, 0)))
    for job_id in (b, a):  # last first, so that the first job ends at the front
        jobs.ring.requeue(job_id, [0], solo=True)
    assert jobs.take() == Pick(SMALL, ((a, 0),))
    assert jobs.take() == Pick(SMALL, ((b, 0),))


def test_a_newcomer_goes_before_the_member_just_served() -> None:
    """With batches of one, B arriving after A's first image gets the next turn, not A's second image."""
    jobs = Jobs(FairRing(1))
    a = jobs.add(A, 2)
    assert jobs.take().items == ((a, 0),)
    b = jobs.add(B, 1)
    assert jobs.ring.place(b).ahead == 0
    assert jobs.take().items == ((b, 0),)
    assert jobs.take().items == ((a, 1),)


def test_a_member_coming_back_goes_after_those_not_served_since() -> None:
    """A member whose work ran out and who adds more joins behind members waiting since before its turn."""
    jobs = Jobs(FairRing(1))
    a = jobs.add(A, 1)
    b = jobs.add(B, 2)
    assert jobs.take().items == ((a, 0),)
    again = jobs.add(A, 1)
    assert jobs.take().items == ((b, 0),)
    assert jobs.take().items == ((again, 0),)


def test_position_figures_follow_the_round_robin() -> None:
    """Images ahead and through a job count one image of each other member per image of ours."""
    jobs = Jobs(FairRing(4))
    a1 = jobs.add(A, 4)
    a2 = jobs.add(A, 4)
    b1 = jobs.add(B, 4)
    # Coming order: A B A B | A B A B | A A A A.
    assert jobs.ring.place(a1) == Place(4, 0, 7)
    assert jobs.ring.place(b1) == Place(4, 1, 8)
    assert jobs.ring.place(a2) == Place(4, 8, 12)
    jobs.take()
    assert jobs.ring.place(a2) == Place(4, 4, 8)
    jobs.take()
    assert jobs.ring.place(a1) == Place(0, 0, 0)  # all on the GPU: the queue counts those
    jobs.ring.remove(a1)
    with pytest.raises(KeyError):
        jobs.ring.place(a1)


def test_a_pick_is_pure_and_a_stale_one_is_refused() -> None:
    """Planning changes nothing; taking a pick the ring no longer matches is refused whole."""
    jobs = Jobs(FairRing(2))
    a = jobs.add(A, 2)
    pick = jobs.ring.plan()
    assert pick == jobs.ring.plan() == Pick(SMALL, ((a, 0), (a, 1)))
    assert jobs.ring.pending(a) == 2
    jobs.ring.take(pick)
    with pytest.raises(ValueError, match="not the next one waiting"):
        jobs.ring.take(pick)
    jobs.ring.requeue(a, [1])
    with pytest.raises(ValueError, match="not handed out"):
        jobs.ring.requeue(a, [1])


def test_a_cancelled_job_leaves_the_ring() -> None:
    """Removing a job drops its waiting images; its member's other jobs keep their place."""
    jobs = Jobs(FairRing(4))
    a1 = jobs.add(A, 3)
    a2 = jobs.add(A, 1)
    b = jobs.add(B, 1)
    jobs.ring.remove(a1)
    assert jobs.take() == Pick(SMALL, ((a2, 0), (b, 0)))
    assert jobs.ring.plan() is None


# -- properties -------------------------------------------------------------------------------------------


@dataclass
class ModelJob:
    owner: int
    params: GenerationParams
    count: int
    pending: list[int]
    solo: bool = False
    in_flight: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)


class Model:
    """Each job's waiting, running and made images, kept beside the ring, and the fairness ledger.

    The rule the ledger checks: while member m waits, no other member n gets two images before m's next one.
    `owed[m][n]` counts n's images since m's last image (or since m joined) handed out at moments when m could
    have had that place: m's next waiting job had the batch's params and was not solo, and the batch was not a
    solo job's. Retries (images handed out again after a requeue) are not counted: putting them first is the
    point of a requeue. A member that joins starts owing one image to each member served since its own last
    image (least recently served goes first), so those get none before it; the others at most one.
    """

    def __init__(self, max_batch_images: int) -> None:
        self.ring = FairRing(max_batch_images)
        self.limit = max_batch_images
        self.jobs: dict[int, ModelJob] = {}
        self.next_id = 1
        self.outstanding: list[Pick] = []
        self.retries: set[tuple[int, int]] = set()
        self.owed: dict[int, Counter[int]] = {}
        self.handed_out = 0
        self.last_image: dict[int, int] = {}

    # What each member could put in a batch with these params now.
    def head(self, owner: int) -> ModelJob | None:
        waiting = [job_id for job_id, job in self.jobs.items() if job.owner == owner and job.pending]
        return self.jobs[min(waiting)] if waiting else None

    def compatible(self, owner: int, params: GenerationParams) -> bool:
        head = self.head(owner)
        return head is not None and not head.solo and head.params == params

    def waiting(self, owner: int) -> bool:
        return self.head(owner) is not None

    def owners(self) -> set[int]:
        return {job.owner for job in self.jobs.values()}

    def join(self, owner: int) -> None:
        mine = self.last_image.get(owner, -1)
        self.owed[owner] = Counter({other: 1 for other, at in self.last_image.items() if at > mine})

    # Operations, each mirrored in the model and checked.
    def add(self, owner: int, count: int, params: GenerationParams, *, solo: bool) -> None:
        joining = not self.waiting(owner)
        job_id = self.next_id
        self.next_id += 1
        self.jobs[job_id] = ModelJob(owner, params, count, list(range(count)), solo)
        self.ring.add(job_id, owner, params, range(count), solo=solo)
        if joining:
            self.join(owner)

    def take(self) -> None:
        pick = self.ring.plan()
        assert pick == self.ring.plan(), "planning must change nothing"
        if not any(job.pending for job in self.jobs.values()):
            assert pick is None
            return
        assert pick is not None and pick.items
        self.check_batch(pick)
        self.ring.take(pick)
        self.hand_out(pick)
        self.outstanding.append(pick)

    def check_batch(self, pick: Pick) -> None:
        """One params value, at most max_batch_images, each job's next images in order, solo jobs alone."""
        assert len(pick.items) <= self.limit
        taken: dict[int, list[int]] = {}
        for job_id, index in pick.items:
            assert self.jobs[job_id].params == pick.params
            taken.setdefault(job_id, []).append(index)
        for job_id, indices in taken.items():
            assert indices == self.jobs[job_id].pending[: len(indices)], "a job's next images, in order"
        solo = any(self.jobs[job_id].solo for job_id in taken)
        assert not solo or len(taken) == 1, "a solo job runs alone"
        if not solo and len(pick.items) < self.limit:
            # Not full: everyone who could have added an image did, down to their last compatible one.
            for owner in self.owners():
                left = [
                    job
                    for job_id, job in sorted(self.jobs.items())
                    if job.owner == owner and len(job.pending) > len(taken.get(job_id, ()))
                ]
                if left:
                    first = left[0]
                    assert first.solo or first.params != pick.params, f"{owner} could have joined"

    def hand_out(self, pick: Pick) -> None:
        """Move the images to in flight one at a time, keeping the fairness ledger image by image."""
        solo_batch = self.jobs[pick.items[0][0]].solo
        for job_id, index in pick.items:
            job = self.jobs[job_id]
            owner = job.owner
            if not solo_batch and (job_id, index) not in self.retries:
                for other, owed in self.owed.items():
                    if other != owner and self.compatible(other, pick.params):
                        owed[owner] += 1
                        assert owed[owner] <= 1, (
                            f"member {owner} got a second image while member {other} waited"
                        )
            assert job.pending[0] == index
            job.pending.pop(0)
            job.in_flight.add(index)
            self.owed[owner] = Counter()
            self.last_image[owner] = self.handed_out
            self.handed_out += 1
        for owner in {self.jobs[job_id].owner for job_id, _ in pick.items}:
            if not self.waiting(owner):
                del self.owed[owner]

    def finish(self, which: int) -> None:
        """The batch's images are made; jobs with all their images made complete and leave the ring."""
        pick = self.outstanding.pop(which % len(self.outstanding))
        for job_id, index in pick.items:
            job = self.jobs.get(job_id)
            if job is None:  # cancelled meanwhile: the image goes to nobody
                continue
            job.in_flight.remove(index)
            assert index not in job.done, "no image is made twice"
            job.done.add(index)
            if len(job.done) == job.count:
                self.ring.remove(job_id)
                del self.jobs[job_id]

    def fail(self, which: int, solo: bool, give_up: int) -> None:
        """The batch failed: one job may give up first; the others go back, last first, as the queue does."""
        pick = self.outstanding.pop(which % len(self.outstanding))
        sent: dict[int, list[int]] = {}
        for job_id, index in pick.items:
            if job_id in self.jobs:
                sent.setdefault(job_id, []).append(index)
        alone = solo and len(sent) > 1
        if 0 <= give_up < len(sent):
            self.cancel_job(list(sent)[give_up])
        for job_id, indices in reversed(sent.items()):
            job = self.jobs.get(job_id)
            if job is None:
                continue
            job.in_flight.difference_update(indices)
            joining = not self.waiting(job.owner)
            job.pending = sorted({*job.pending, *indices})
            job.solo = job.solo or alone
            self.retries.update((job_id, index) for index in indices)
            self.ring.requeue(job_id, indices, solo=alone)
            if joining:
                self.join(job.owner)

    def cancel(self, which: int) -> None:
        if self.jobs:
            self.cancel_job(sorted(self.jobs)[which % len(self.jobs)])

    def cancel_job(self, job_id: int) -> None:
        job = self.jobs.pop(job_id)
        self.ring.remove(job_id)
        if not self.waiting(job.owner):
            self.owed.pop(job.owner, None)

    def check(self) -> None:
        """Every image of every job is waiting, in flight or made, exactly once, and the ring agrees."""
        for job_id, job in self.jobs.items():
            assert self.ring.pending(job_id) == len(job.pending)
            assert job.pending == sorted(job.pending)
            parts = [set(job.pending), job.in_flight, job.done]
            assert sum(len(p) for p in parts) == job.count
            assert set.union(*parts) == set(range(job.count)), "no image lost"
        assert (self.ring.plan() is None) == (not any(job.pending for job in self.jobs.values()))

    def drain(self) -> None:
        """Finish everything: every job completes and the ring ends empty."""
        while self.outstanding:
            self.finish(0)
        for _ in range(sum(job.count for job in self.jobs.values())):
            if self.ring.plan() is None:
                break
            self.take()
            self.finish(0)
        assert self.ring.plan() is None
        assert not self.jobs, "every job completes"


OWNERS = st.sampled_from([A, B, C, D])
# Most jobs share one params value, so that batches mix members; the others make members sit batches out.
# A job recovered after an interrupted batch comes back solo.
ADD = st.tuples(
    st.just("add"),
    OWNERS,
    st.integers(1, 8),
    st.sampled_from([SMALL, SMALL, SMALL, LARGE, SLOW]),
    st.sampled_from([False] * 7 + [True]),
)
OPERATIONS = st.one_of(
    ADD,
    ADD,
    st.tuples(st.just("take")),
    st.tuples(st.just("take")),
    st.tuples(st.just("finish"), st.integers(0, 3)),
    st.tuples(st.just("fail"), st.integers(0, 3), st.booleans(), st.integers(-1, 3)),
    st.tuples(st.just("cancel"), st.integers(0, 20)),
)


def run(model: Model, operations: list[tuple[object, ...]]) -> None:
    for operation in operations:
        match operation:
            case ("add", int(owner), int(count), GenerationParams() as params, bool(solo)):
                model.add(owner, count, params, solo=solo)
            case ("take",):
                model.take()
            case ("finish", int(which)) if model.outstanding:
                model.finish(which)
            case ("fail", int(which), bool(solo), int(give_up)) if model.outstanding:
                model.fail(which, solo, give_up)
            case ("cancel", int(which)):
                model.cancel(which)
        model.check()
    model.drain()


@PROPERTY_SETTINGS
@given(st.integers(1, 6), st.lists(ADD, min_size=2, max_size=8), st.lists(OPERATIONS, max_size=60))
def test_random_work_is_served_fairly_in_valid_batches(
    limit: int, added: list[tuple[object, ...]], operations: list[tuple[object, ...]]
) -> None:
    """Under random adds, takes, results, failures and cancels: between two images of a member (or since it
    joined), no other member gets two while it waited with work for the same batch, nor one that was served
    since the member's last image before it joined; batches hold one params value, at most max_batch_images,
    each job's next images in order, solo jobs alone, and are full when they can be; no image is lost or
    made twice, and all work ends."""
    run(Model(limit), added + operations)


@PROPERTY_SETTINGS
@given(
    st.integers(1, 6),
    st.lists(st.tuples(OWNERS, st.integers(1, 8)), min_size=1, max_size=12),
    st.integers(0, 6),
    st.data(),
)
def test_position_figures_are_exact_for_one_params_value(
    limit: int, added: list[tuple[int, int]], takes: int, data: st.DataObject
) -> None:
    """With one params value and nothing else changing, place() says exactly how many images go out before
    a job's first and through its last."""
    jobs = Jobs(FairRing(limit))
    for owner, count in added:
        jobs.add(owner, count)
    for _ in range(takes):
        if jobs.ring.plan() is not None:
            jobs.take()
    waiting = [job_id for job_id in jobs.owner if jobs.ring.pending(job_id)]
    if not waiting:
        return
    job_id = data.draw(st.sampled_from(waiting))
    place = jobs.ring.place(job_id)
    handed: list[int] = []
    while (pick := jobs.ring.plan()) is not None:
        jobs.ring.take(pick)
        handed.extend(item_job for item_job, _ in pick.items)
    assert place.pending == handed.count(job_id)
    assert place.ahead == handed.index(job_id)
    assert place.through == len(handed) - handed[::-1].index(job_id)


OTHER_MODEL = dataclasses.replace(SMALL, preset="sd2")


def test_a_resident_preset_is_preferred_within_a_pass() -> None:
    """With sd-v1-4 on the GPU, B's sd-v1-4 batch goes before A's sd2 one, though A leads the ring."""
    ring = FairRing(2)
    ring.resident = frozenset({SMALL.preset})
    jobs = Jobs(ring)
    jobs.add(A, 2, OTHER_MODEL)
    jobs.add(B, 2)
    first = jobs.take()
    assert (jobs.owners(first), first.params.preset, first.passed_over) == ("BB", SMALL.preset, (A,))
    assert jobs.owners(jobs.take()) == "AA"


def test_a_member_waits_at_most_one_batch_for_a_swap() -> None:
    """A's job for a preset not on the GPU runs after one batch of preference, while B's backlog on the
    resident preset would fill many more; once sd2 is on the GPU, B is passed over for it once in turn."""
    ring = FairRing(2)
    ring.resident = frozenset({SMALL.preset})
    jobs = Jobs(ring)
    jobs.add(A, 2, OTHER_MODEL)
    jobs.add(A, 2, OTHER_MODEL)
    for _ in range(5):
        jobs.add(B, 2)
    order = []
    for _ in range(4):
        pick = jobs.take()
        order.append(jobs.owners(pick))
        # The GPU side reports the preset it holds after each batch.
        ring.resident = frozenset({pick.params.preset})
    assert order == ["BB", "AA", "AA", "BB"]


def test_without_resident_presets_the_ring_keeps_its_order() -> None:
    """No preference when the GPU side says nothing (remote workers, tests): plain round robin."""
    jobs = Jobs(FairRing(2))
    jobs.add(A, 2, OTHER_MODEL)
    jobs.add(B, 2)
    pick = jobs.take()
    assert (jobs.owners(pick), pick.passed_over) == ("AA", ())


@PROPERTY_SETTINGS
@given(
    st.integers(1, 4),
    st.lists(st.tuples(OWNERS, st.integers(1, 4), st.booleans()), min_size=1, max_size=12),
)
def test_a_swap_never_passes_a_member_over_twice(limit: int, added: list[tuple[int, int, bool]]) -> None:
    """With one preset resident at a time, the one the last batch ran: a batch that passes members over for
    the resident preset is followed by one led by the first of them, which passes nobody over; every image
    is handed out once."""
    jobs = Jobs(FairRing(limit))
    for owner, count, other in added:
        jobs.add(owner, count, OTHER_MODEL if other else SMALL)
    jobs.ring.resident = frozenset({SMALL.preset})
    handed: list[tuple[int, int]] = []
    previous: Pick | None = None
    while (pick := jobs.ring.plan()) is not None:
        if previous is not None and previous.passed_over:
            assert jobs.owner[pick.items[0][0]] == previous.passed_over[0]
            assert pick.passed_over == ()
        assert all(jobs.owner[job_id] not in pick.passed_over for job_id, _ in pick.items)
        jobs.ring.take(pick)
        jobs.ring.resident = frozenset({pick.params.preset})
        handed.extend(pick.items)
        previous = pick
    assert len(handed) == len(set(handed)) == sum(count for _, count, _ in added)
