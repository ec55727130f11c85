"""The fair ring: which member goes next, and which images make up the next batch.

Each member has a FIFO of jobs, each job a list of images still to hand out. Members are served round-robin,
one image each per pass, so nobody waits behind another member's backlog. A batch holds images with the same
GenerationParams as the first member's next job, from several members in ring order; a member whose next job
has other params is skipped for that batch and keeps its place. A job marked solo runs in a batch of its own.
A plan may be limited to what can run now (remote GPU workers offer different guides): jobs that cannot
are passed over, their members keep their places, and among the rest the ring is as fair as ever.

Swapping a model preset onto the GPU costs seconds, so the ring prefers a batch for a resident preset (one
the GPU holds now, `resident`, which the GPU side keeps up to date): a member whose next job needs another
preset may be passed over once for a member later in the same pass whose job runs on a resident one, and
then leads the next batch whatever it needs. A member's wait thus grows by at most one batch per swap.

Plain state and no I/O: the job queue drives it on the event loop today, remote GPU workers may later.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from i2p2i_bot.request import GenerationParams


@dataclass(frozen=True)
class Pick:
    """The images the ring hands out next, as (job id, image index) in the order a batch runs them."""

    params: GenerationParams
    items: tuple[tuple[int, int], ...]
    # Members whose turn this batch took because their next job needs a preset that is not resident.
    passed_over: tuple[int, ...] = ()


@dataclass(frozen=True)
class Place:
    """Where a job's waiting images stand: how many images the ring hands out before its first and
    through its last (its own included), if nothing changes meanwhile."""

    pending: int
    ahead: int
    through: int


class _Job:
    """A job as the ring sees it: whose it is, its batch key and the images it has still to hand out."""

    __slots__ = ("id", "owner", "params", "pending", "retries", "solo")

    def __init__(
        self, job_id: int, owner: int, params: GenerationParams, pending: deque[int], solo: bool
    ) -> None:
        self.id = job_id
        self.owner = owner
        self.params = params
        self.pending = pending
        # How many images at the front of `pending` were handed out before and came back.
        self.retries = 0
        # After a failure shared by several jobs, each one retries alone so the blame lands on the right job.
        self.solo = solo


class FairRing:
    """Round-robin over members, one image each per pass, filling batches of compatible images."""

    def __init__(self, max_batch_images: int) -> None:
        if max_batch_images < 1:
            raise ValueError("a batch holds at least one image")
        self.max_batch_images = max_batch_images
        self._jobs: dict[int, _Job] = {}
        # Members with images waiting, next to serve first; each holds its jobs with waiting images, by id.
        self._members: OrderedDict[int, deque[_Job]] = OrderedDict()
        self._waiting: Counter[int] = Counter()
        # When each member was last served (a count of images handed out); orders newcomers into the ring.
        self._last_served: dict[int, int] = {}
        self._served_images = 0
        # The model presets the GPU holds now (the GPU side sets it); empty: no preference.
        self.resident: frozenset[str] = frozenset()
        # Members passed over once for a resident preset: they lead the next batch whatever it needs.
        self._deferred: set[int] = set()

    def add(
        self,
        job_id: int,
        owner: int,
        params: GenerationParams,
        pending: Iterable[int],
        *,
        solo: bool = False,
    ) -> None:
        """Take a job with the images it has still to make, in the order to make them."""
        if job_id in self._jobs:
            raise ValueError(f"job {job_id} is already in the ring")
        job = _Job(job_id, owner, params, deque(pending), solo)
        self._jobs[job_id] = job
        if not job.pending:
            return
        self._waiting[owner] += len(job.pending)
        jobs = self._members.get(owner)
        if jobs is None:
            self._join(owner, deque([job]))
        else:
            _insert_by_id(jobs, job)

    def remove(self, job_id: int) -> None:
        """Forget a job (finished, failed or cancelled), dropping the images it had still to hand out."""
        job = self._jobs.pop(job_id)
        if not job.pending:
            return
        owner = job.owner
        self._drop_waiting(owner, len(job.pending))
        job.pending.clear()
        jobs = self._members[owner]
        jobs.remove(job)
        if not jobs:
            del self._members[owner]
            self._deferred.discard(owner)
        elif job.retries and not any(other.retries for other in jobs):
            # Its place at the front was for the images it was retrying; without them the member goes
            # back to its turn.
            del self._members[owner]
            self._join(owner, jobs)

    def requeue(self, job_id: int, indices: Iterable[int], *, solo: bool = False) -> None:
        """Put images that were handed out back at the front of their job, and its member at the front of
        the ring until they are handed out again; `solo` makes the job run alone from now on."""
        job = self._jobs[job_id]
        back = set(indices)
        if not back.isdisjoint(job.pending):
            raise ValueError(f"job {job_id}: images {sorted(back & set(job.pending))} are not handed out")
        job.solo = job.solo or solo
        if not back:
            return
        was_waiting = bool(job.pending)
        job.pending = deque(sorted({*job.pending, *back}))
        job.retries += len(back)
        self._waiting[job.owner] += len(back)
        jobs = self._members.setdefault(job.owner, deque())
        if not was_waiting:
            _insert_by_id(jobs, job)
        self._members.move_to_end(job.owner, last=False)

    def withdraw(self, job_id: int, indices: Iterable[int]) -> None:
        """Take waiting images out of a job without handing them out: they are out already (a batch sent
        before a restart of the bot and found on a GPU worker). The member keeps its place in the ring."""
        job = self._jobs[job_id]
        gone = set(indices)
        if not gone <= set(job.pending):
            raise ValueError(f"job {job_id}: images {sorted(gone - set(job.pending))} are not waiting")
        if not gone:
            return
        job.pending = deque(index for index in job.pending if index not in gone)
        job.retries = min(job.retries, len(job.pending))
        self._drop_waiting(job.owner, len(gone))
        if not job.pending:
            jobs = self._members[job.owner]
            jobs.remove(job)
            if not jobs:
                del self._members[job.owner]

    def waiting(self, job_id: int) -> frozenset[int]:
        """The indices of a job's images that wait to be handed out."""
        return frozenset(self._jobs[job_id].pending)

    def plan(self, can_run: Callable[[GenerationParams], bool] | None = None) -> Pick | None:
        """The next batch, without handing it out: one image per member per pass, in ring order, all with
        the first member's next job's params; None when nothing waits.

        With `can_run`, jobs whose params it refuses are passed over as if they were not there: the first
        member with a job it accepts leads, each member's first such job sets what joins, and members
        passed over keep their places for when their jobs can run.

        A leader whose preset is not resident is passed over (once, see the module's docstring) for the
        first member whose next job runs on a resident preset; the Pick names the members passed over."""
        accepted = _Memo(can_run)
        limit = self.max_batch_images
        heads = (
            (owner, next((job for job in jobs if accepted(job.params)), None))
            for owner, jobs in self._members.items()
        )
        leaders = ((owner, job) for owner, job in heads if job is not None)
        first = next(leaders, None)
        if first is None:
            return None
        head = first[1]
        passed_over: tuple[int, ...] = ()
        if self._prefers_another(*first):
            behind = [first[0]]
            for owner, job in leaders:
                if job.params.preset in self.resident:
                    head, passed_over = job, tuple(behind)
                    break
                behind.append(owner)
        if head.solo:
            alone = tuple((head.id, index) for index in itertools.islice(head.pending, limit))
            return Pick(head.params, alone, passed_over)
        items: list[tuple[int, int]] = []
        streams = [_compatible(jobs, head.params, accepted) for jobs in self._members.values()]
        while streams and len(items) < limit:
            still: list[Iterator[tuple[int, int]]] = []
            for stream in streams:
                item = next(stream, None)
                if item is None:
                    continue
                items.append(item)
                if len(items) == limit:
                    break
                still.append(stream)
            streams = still
        return Pick(head.params, tuple(items), passed_over)

    def _prefers_another(self, owner: int, head: _Job) -> bool:
        """Whether the leader may wait one batch for a member whose preset is resident."""
        return bool(self.resident) and head.params.preset not in self.resident and owner not in self._deferred

    def take(self, pick: Pick) -> None:
        """Hand out a planned batch: its images leave their jobs, and the members served move to the back
        of the ring in the order of their last image in it, so a pass cut by the batch's end goes on next."""
        self._check(pick)
        last_position: dict[int, int] = {}
        for position, (job_id, _) in enumerate(pick.items):
            job = self._jobs[job_id]
            job.pending.popleft()
            job.retries = max(job.retries - 1, 0)
            self._drop_waiting(job.owner, 1)
            last_position[job.owner] = position
        for owner in last_position:
            # A pick limited to what can run may empty a job behind one passed over, not only the first.
            jobs = deque(job for job in self._members[owner] if job.pending)
            if jobs:
                self._members[owner] = jobs
            else:
                del self._members[owner]
        self._deferred.difference_update(last_position)
        self._deferred.update(owner for owner in pick.passed_over if owner in self._members)
        for owner in sorted(last_position, key=last_position.__getitem__):
            self._last_served[owner] = self._served_images + last_position[owner]
            if owner in self._members:
                self._members.move_to_end(owner)
        self._served_images += len(pick.items)

    def pending(self, job_id: int) -> int:
        """How many of a job's images wait to be handed out."""
        return len(self._jobs[job_id].pending)

    def place(self, job_id: int) -> Place:
        """Where a job's waiting images stand in the ring.

        Round-robin gives every other member one image per image of ours: a member ahead of ours in the ring
        gets at most one more than we have ahead of a given image, a member behind it at most as many. The
        estimate ignores that incompatible parameters wait for their own batches.
        """
        job = self._jobs[job_id]
        mine = len(job.pending)
        if not mine:
            return Place(0, 0, 0)
        owner = job.owner
        own_ahead = 0
        for other in self._members[owner]:
            if other is job:
                break
            own_ahead += len(other.pending)
        through = own_ahead + mine
        others_ahead = others_through = 0
        before = True
        for member in self._members:
            if member == owner:
                before = False
                continue
            waiting = self._waiting[member]
            others_ahead += min(waiting, own_ahead + 1 if before else own_ahead)
            others_through += min(waiting, through if before else through - 1)
        return Place(mine, own_ahead + others_ahead, through + others_through)

    def _join(self, owner: int, jobs: deque[_Job]) -> None:
        """Least recently served first: a member with nothing waiting joins ahead of everyone served since
        their own last turn, so a newcomer is not made to wait behind the member who was just served."""
        served = self._last_served.get(owner, -1)
        later = [member for member in self._members if self._last_served.get(member, -1) > served]
        self._members[owner] = jobs
        for member in later:
            self._members.move_to_end(member)

    def _check(self, pick: Pick) -> None:
        """A pick must take each job's next images in order, with the job's params; a job alone if solo."""
        taken: Counter[int] = Counter()
        for job_id, index in pick.items:
            job = self._jobs.get(job_id)
            if job is None or job.params != pick.params:
                raise ValueError(f"job {job_id} cannot join a batch with these params")
            at = taken[job_id]
            if at >= len(job.pending) or job.pending[at] != index:
                raise ValueError(f"job {job_id}: image {index} is not the next one waiting")
            taken[job_id] += 1
        if len(taken) > 1 and any(self._jobs[job_id].solo for job_id in taken):
            raise ValueError("a solo job runs in a batch of its own")
        if len(pick.items) > self.max_batch_images:
            raise ValueError(f"a batch holds at most {self.max_batch_images} images")

    def _drop_waiting(self, owner: int, n: int) -> None:
        self._waiting[owner] -= n
        if self._waiting[owner] <= 0:
            del self._waiting[owner]


def _compatible(
    jobs: deque[_Job], params: GenerationParams, accepted: Callable[[GenerationParams], bool]
) -> Iterator[tuple[int, int]]:
    """A member's images that can join a batch: their FIFO's first jobs with the same params, in order,
    passing over jobs that cannot run now."""
    for job in jobs:
        if not accepted(job.params):
            continue
        if job.solo or job.params != params:
            return
        for index in job.pending:
            yield job.id, index


class _Memo:
    """A plan's `can_run`, asked once per distinct params (None accepts everything)."""

    def __init__(self, can_run: Callable[[GenerationParams], bool] | None) -> None:
        self._can_run = can_run
        self._known: dict[GenerationParams, bool] = {}

    def __call__(self, params: GenerationParams) -> bool:
        if self._can_run is None:
            return True
        found = self._known.get(params)
        if found is None:
            found = self._known[params] = self._can_run(params)
        return found


def _insert_by_id(jobs: deque[_Job], job: _Job) -> None:
    if not jobs or jobs[-1].id < job.id:
        jobs.append(job)  # a new job: the usual case
        return
    ids = [j.id for j in jobs]
    jobs.insert(bisect.bisect(ids, job.id), job)
