"""Whose work the GPU thread takes next: members' descriptions in turn, generation never starved."""

from __future__ import annotations

import random
from collections import Counter, deque

import pytest

from i2p2i_bot.gpu_turns import GpuTurns, Priority

DESCRIBE, GENERATE, URGENT = Priority.INTERROGATE, Priority.GENERATE, Priority.URGENT


def drain(turns: GpuTurns[str]) -> list[str]:
    order = []
    while (task := turns.pop()) is not None:
        order.append(task)
    return order


def test_a_flood_of_describes_leaves_another_member_and_a_job_their_turn() -> None:
    """50 describes of one member, then one of another and a job: each waits behind one of the 50."""
    turns: GpuTurns[str] = GpuTurns()
    for k in range(50):
        turns.add(f"a{k}", DESCRIBE, member=1)
    turns.add("b0", DESCRIBE, member=2)
    turns.add("job", GENERATE)
    assert len(turns) == 52
    assert drain(turns) == ["a0", "b0", "job", *(f"a{k}" for k in range(1, 50))]
    assert len(turns) == 0


def test_a_member_who_arrives_later_goes_ahead_of_the_flooding_member() -> None:
    """A member's single describe, sent while another's backlog runs, waits for none of that backlog."""
    turns: GpuTurns[str] = GpuTurns()
    for k in range(5):
        turns.add(f"a{k}", DESCRIBE, member=1)
    assert turns.pop() == "a0"  # running when bob asks
    turns.add("b0", DESCRIBE, member=2)
    assert drain(turns) == ["b0", "a1", "a2", "a3", "a4"]


def test_generation_waits_for_one_describe_per_waiting_member_at_most() -> None:
    """Three members flooding: a job goes after one describe of each, then the ring goes on in order."""
    turns: GpuTurns[str] = GpuTurns()
    for k in range(3):
        for member, name in ((1, "a"), (2, "b"), (3, "c")):
            turns.add(f"{name}{k}", DESCRIBE, member=member)
    turns.add("job1", GENERATE)
    turns.add("job2", GENERATE)
    assert drain(turns) == ["a0", "b0", "c0", "job1", "a1", "b1", "c1", "job2", "a2", "b2", "c2"]


def test_describes_still_go_ahead_of_a_job_that_has_waited_for_nobody() -> None:
    """A describe sent while a job waits goes first; the job runs before that member's next one."""
    turns: GpuTurns[str] = GpuTurns()
    turns.add("job", GENERATE)
    turns.add("a0", DESCRIBE, member=1)
    turns.add("a1", DESCRIBE, member=1)
    assert drain(turns) == ["a0", "job", "a1"]


def test_urgent_work_goes_first_and_work_for_nobody_takes_turns_too() -> None:
    """Urgent tasks jump every lane; a describe for no member takes its turn like a member's."""
    turns: GpuTurns[str] = GpuTurns()
    turns.add("a0", DESCRIBE, member=1)
    turns.add("a1", DESCRIBE, member=1)
    turns.add("lookup", DESCRIBE)
    turns.add("job", GENERATE)
    turns.add("load", URGENT)
    assert drain(turns) == ["load", "a0", "lookup", "job", "a1"]


def test_an_unknown_priority_is_refused() -> None:
    turns: GpuTurns[str] = GpuTurns()
    with pytest.raises(ValueError, match="no lane"):
        turns.add("x", 15)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(20))
def test_the_bounds_hold_for_any_arrivals(seed: int) -> None:
    """Random arrivals and hand-outs: while a member waits, no other member has two describes before the
    member's next one, nor any if their last turn came after the member's; and no member has two describes
    while a job is first in line."""
    rng = random.Random(seed)
    turns: GpuTurns[tuple[str, int]] = GpuTurns()
    members = range(1, rng.randint(2, 6))
    jobs: deque[tuple[str, int]] = deque()
    waiting: Counter[int] = Counter()  # describes waiting, per member
    # Describes of other members since each waiting member's wait began or its last turn; and since the
    # first job in line became first.
    before_turn: dict[int, Counter[int]] = {}
    before_job: Counter[int] = Counter()
    last_turn: dict[int, int] = {}  # forgotten whenever nothing waits
    for step in range(500):
        if rng.random() < 0.5:
            if rng.random() < 0.2:
                turns.add(("job", step), GENERATE)
                jobs.append(("job", step))
            else:
                member = rng.choice(members)
                turns.add(("describe", member), DESCRIBE, member=member)
                if not waiting[member]:
                    mine = last_turn.get(member, -1)
                    # Members served since this one's last turn may not go before it: count them as served.
                    before_turn[member] = Counter({o for o, t in last_turn.items() if t > mine})
                waiting[member] += 1
            continue
        task = turns.pop()
        if task is None:
            assert not jobs and not +waiting
        elif task[0] == "job":
            assert task == jobs.popleft()
            assert all(n <= 1 for n in before_job.values()), before_job
            before_job = Counter()
        else:
            member = task[1]
            assert waiting[member] > 0
            waiting[member] -= 1
            for other, counts in before_turn.items():
                if other != member and waiting[other]:
                    counts[member] += 1
                    assert counts[member] <= 1, (member, other, counts)
            before_turn[member] = Counter()
            last_turn[member] = step
            if jobs:
                before_job[member] += 1
        if len(turns) == 0:
            last_turn.clear()
