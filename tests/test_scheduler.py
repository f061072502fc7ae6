"""Assignment and steal rule as pure functions of (state, rank, world_size): no process group."""

from __future__ import annotations

import random

from nougat_dist.sched.steal import (STATUS_LEN, ST_CLAIMED, ST_FINISHED, ST_RATE_MILLI, ST_RESERVE,
                                   ST_STOP, all_finished, apply_steals, assign, plan_steals,
                                   stop_requested)


def status(claimed: int, rate: int = 1000, finished: int = 0, reserve: int = 0,
           stop: int = 0) -> list[int]:
    row = [0] * STATUS_LEN
    row[ST_CLAIMED], row[ST_RATE_MILLI], row[ST_FINISHED] = claimed, rate, finished
    row[ST_RESERVE], row[ST_STOP] = reserve, stop
    return row


def test_assign_covers_every_unit_once_and_balances_pages():
    rng = random.Random(0)
    weights = [rng.randint(1, 16) for _ in range(200)]
    for world in (1, 2, 3, 8):
        queues = assign(weights, world)
        flat = sorted(u for q in queues for u in q)
        assert flat == list(range(len(weights)))
        loads = [sum(weights[u] for u in q) for q in queues]
        # LPT bound: no rank exceeds the mean by more than the largest unit
        assert max(loads) - min(loads) <= max(weights)


def test_assign_is_longest_first_and_deterministic():
    weights = [3, 16, 1, 16, 8]
    q = assign(weights, 2)
    assert q == assign(weights, 2)
    assert q[0][0] in (1, 3) and q[1][0] in (1, 3)  # the two 16-page units go first, one each
    for queue in q:
        assert [weights[u] for u in queue] == sorted((weights[u] for u in queue), reverse=True)


def test_more_ranks_than_units_leaves_ranks_empty():
    assert sorted(map(len, assign([5], 3))) == [0, 0, 1]


def test_hungry_rank_steals_from_tail_of_most_loaded():
    queues = [[0, 1], [2, 3, 4, 5, 6, 7]]
    weights = [1] * 8
    st = [status(claimed=2), status(claimed=1)]
    steals = plan_steals(queues, st, weights)
    assert len(steals) == 1
    s = steals[0]
    assert (s.thief, s.victim) == (0, 1)
    # equal rates: the thief takes about half of the 5 unclaimed units, from the tail
    assert s.units == (5, 6, 7)
    apply_steals(queues, steals)
    assert queues[1][: len(queues[1])] == [2, 3, 4, 5, 6, 7][: len(queues[1])]
    assert sorted(queues[0] + queues[1]) == list(range(8))


def test_steal_share_follows_rates():
    queues = [[], list(range(20))]
    weights = [1] * 20
    fast_thief = plan_steals(queues, [status(0, rate=9000), status(0, rate=1000)], weights)[0]
    slow_thief = plan_steals(queues, [status(0, rate=1000), status(0, rate=9000)], weights)[0]
    assert len(fast_thief.units) >= 15  # 9x faster thief takes ~90%
    assert len(slow_thief.units) <= 3


def test_victim_keeps_next_unit_and_no_steal_from_single_unit():
    queues = [[], [0, 1]]
    s = plan_steals(queues, [status(0), status(0)], [1, 1])
    assert s and s[0].units == (1,)  # never the head unit the victim is about to claim
    assert plan_steals([[], [0]], [status(0), status(0)], [1]) == []
    assert plan_steals([[], [0, 1]], [status(0), status(1)], [1, 1]) == []  # only 1 unclaimed


def test_every_rank_computes_the_same_decision():
    rng = random.Random(1)
    for _ in range(50):
        world = rng.randint(2, 5)
        weights = [rng.randint(1, 10) for _ in range(40)]
        queues = assign(weights, world)
        st = [status(rng.randint(0, len(q)), rate=rng.randint(0, 5000)) for q in queues]
        views = [[list(q) for q in queues] for _ in range(world)]
        decisions = [plan_steals(v, st, weights) for v in views]
        assert all(d == decisions[0] for d in decisions)
        for v in views:
            apply_steals(v, decisions[0])
        assert all(v == views[0] for v in views)
        assert sorted(u for q in views[0] for u in q) == list(range(40))


def test_all_finished():
    assert all_finished([status(0, finished=1), status(3, finished=1)])
    assert not all_finished([status(0, finished=1), status(3, finished=0)])


def test_slow_rank_does_not_take_work_a_fast_rank_finishes_sooner():
    queues = [[0, 1, 2, 3], []]
    st = [status(1, rate=10000), status(0, rate=1000)]
    assert plan_steals(queues, st, [1] * 4) == []


def test_fast_rank_pulls_work_before_running_dry():
    queues = [list(range(0, 10)), list(range(10, 20))]
    st = [status(1, rate=10000), status(1, rate=1000)]  # both still have 9 unclaimed units
    steals = plan_steals(queues, st, [1] * 20)
    assert [(s.thief, s.victim) for s in steals] == [(0, 1)]
    assert len(steals[0].units) >= 6


def test_reserved_units_are_never_stolen():
    queues = [[], [0, 1, 2, 3, 4]]
    steals = plan_steals(queues, [status(0), status(0, reserve=3)], [1] * 5)
    assert steals and set(steals[0].units) <= {3, 4}  # units 0-2 are reserved by the victim


def test_stop_on_any_rank_stops_all():
    assert stop_requested([status(0), status(0, stop=1)])
    assert not stop_requested([status(0), status(0)])
