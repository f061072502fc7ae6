"""Assignment of work units to ranks, and work stealing decided from gathered status rounds.

Everything that decides is a pure function of (state, rank, world_size), so every rank computes
the same decision from the same gathered vector and no rank ever has to ask another.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import torch

from nougat_dist.sched.queue import FAILURE_STATUSES, STATUS_LEN, RankStatus, apply_steals  # noqa: F401

# Positions in the int64 status vector each rank posts in a round (80 bytes; all_gather moves
# 80 x world_size), for readers of gathered rows; the fields are RankStatus's, in its order.
ST_DONE_PAGES = RankStatus.index("done_pages")
ST_CLAIMED = RankStatus.index("claimed")
ST_FINISHED = RankStatus.index("finished")
ST_RATE_MILLI = RankStatus.index("rate_milli")
ST_STOP = RankStatus.index("stop")
ST_RESERVE = RankStatus.index("reserve")
ST_INFLIGHT = RankStatus.index("inflight")
ST_FAIL = RankStatus.index("fail")
ST_RENDER_ERROR = RankStatus.index("render_error")
ST_ERROR = RankStatus.index("error")
FAILURE_FIELDS = {name: RankStatus.index(name) for name in FAILURE_STATUSES}


def assign(weights: Sequence[int], world_size: int) -> list[list[int]]:
    """Longest-processing-time-first: units by weight (pages), largest first, each to the rank
    with the least work so far. Returns one queue of unit indices per rank, largest first, so the
    small units sit at the tail where thieves take from."""
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    heap = [(0, r) for r in range(world_size)]
    queues: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        load, r = heapq.heappop(heap)
        queues[r].append(i)
        heapq.heappush(heap, (load + weights[i], r))
    return queues


@dataclass(frozen=True)
class Steal:
    thief: int
    victim: int
    units: tuple[int, ...]  # unit indices moved from the tail of the victim's queue


def plan_steals(queues: Sequence[Sequence[int]], status: Sequence[Sequence[int]],
                weights: Sequence[int], default_rate_milli: int = 1000) -> list[Steal]:
    """Decide which units move, from one round's gathered status (identical on every rank).

    Ranks are visited from the least to the most estimated time left (unclaimed pages / measured
    rate). Each takes units from the tail of the queue of the rank with the most time left, as many
    as equalise the two finishing times at their rates — so a fast rank pulls work early, before
    it runs dry, and a slow rank never pulls work a faster one would finish sooner. The victim keeps
    the units it may claim before this round is applied (`reserve`, posted by itself; at least one).
    """
    world = len(queues)
    st = [RankStatus.decode(row) for row in status]
    remaining = [list(queues[r][st[r].claimed:]) for r in range(world)]
    rate = [st[r].rate_milli if st[r].rate_milli > 0 else default_rate_milli for r in range(world)]
    keep = [max(st[r].reserve, 1) for r in range(world)]

    # Pages left per rank, kept up to date as units move: re-summing queues on every comparison
    # cost 16.6 s per round for 1.8 M units on 64 ranks, against ~1 s this way.
    # Claimed-but-unfinished pages count toward a rank's time left, though they cannot move.
    left = [sum(weights[u] for u in remaining[r]) + st[r].inflight for r in range(world)]

    def pages(r: int) -> int:
        return left[r]

    steals = []
    involved: set[int] = set()  # one move per rank per round: estimates are too stale for more
    for thief in sorted(range(world), key=lambda r: (pages(r) / rate[r], r)):
        if thief in involved:
            continue
        victims = [r for r in range(world)
                   if r != thief and r not in involved and len(remaining[r]) > keep[r]]
        if not victims:
            continue
        victim = max(victims, key=lambda r: (pages(r) / rate[r], -r))
        # pages x that make (P_t + x) / r_t == (P_v - x) / r_v
        x = (pages(victim) * rate[thief] - pages(thief) * rate[victim]) / (rate[thief] + rate[victim])
        taken: list[int] = []
        got = 0
        while len(remaining[victim]) - len(taken) > keep[victim]:
            u = remaining[victim][-1 - len(taken)]
            if got + weights[u] / 2 > x:  # round to the nearest unit
                break
            taken.append(u)
            got += weights[u]
        if not taken:
            continue
        taken.reverse()
        involved.update((thief, victim))
        left[victim] -= got
        left[thief] += got
        remaining[victim] = remaining[victim][: len(remaining[victim]) - len(taken)]
        remaining[thief] = remaining[thief] + taken
        steals.append(Steal(thief, victim, tuple(taken)))
    return steals


def all_finished(status: Sequence[Sequence[int]]) -> bool:
    """Every rank has processed all it claimed and has nothing left to claim."""
    return all(row[ST_FINISHED] for row in status)


def stop_requested(status: Sequence[Sequence[int]]) -> bool:
    """A graceful stop asked on any rank stops every rank at the same round."""
    return any(row[ST_STOP] for row in status)


class StatusRounds:
    """Asynchronous all_gather of status vectors on the job's process group.

    A rank posts round k and keeps working; it applies round k only once every rank has posted
    it, then posts k+1. Nobody blocks on a peer's batch unless it has nothing left to do.
    The vectors live on `device`: the rank's GPU on NCCL (is_completed() then asks the CUDA
    event, without waiting), the CPU on gloo — the same code either way.
    """

    def __init__(self, world_size: int, group: object | None,
                 device: torch.device | str = "cpu") -> None:
        self.world_size = world_size
        self.group = group
        self.device = torch.device(device)
        self.rounds = 0
        self._work = None
        self._posted = False
        self._out: list[torch.Tensor] = []

    def post(self, vector: Sequence[int]) -> None:
        import torch.distributed as dist

        assert not self._posted, "apply the posted round before posting the next"
        self._posted = True
        mine = torch.tensor(list(vector), dtype=torch.int64, device=self.device)
        if self.world_size == 1:
            self._out = [mine]
            return
        self._out = [torch.empty(STATUS_LEN, dtype=torch.int64, device=self.device)
                     for _ in range(self.world_size)]
        self._work = dist.all_gather(self._out, mine, group=self.group, async_op=True)

    def ready(self) -> bool:
        return self._work is None or self._work.is_completed()

    def collect(self) -> list[list[int]]:
        """Wait for the posted round (immediate if ready()) and return every rank's vector."""
        assert self._posted, "no round posted"
        if self._work is not None:
            self._work.wait()
            self._work = None
        self._posted = False
        self.rounds += 1
        # One copy to the host (on CUDA it also waits for the gather), not one per rank.
        return torch.stack(self._out).cpu().tolist()
