"""A rank's claim state: which units it has claimed, which pages are in flight, and the status
vector it posts in a round. Pure Python (no torch), so the work loop's bookkeeping is testable
without a process group.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Sequence

if TYPE_CHECKING:
    from nougat_dist.store.manifest import Unit

#: Failed page statuses counted in the status vector, in wire order.
FAILURE_STATUSES = ("fail", "render_error", "error")


@dataclass(frozen=True)
class RankStatus:
    """What one rank posts in a status round. On the wire it is a fixed-length int64 vector
    (all_gather needs equal sizes on every rank) in field order; `encode`/`decode` are the one
    place that maps between the two."""

    done_pages: int = 0
    claimed: int = 0  # units of its queue claimed so far
    finished: int = 0  # 1: queue exhausted and every claimed page processed
    rate_milli: int = 0  # pages/s x 1000 over the time it had work
    stop: int = 0  # 1: a graceful stop was requested on this rank
    reserve: int = 0  # units it may claim before applying this round: thieves leave them
    inflight: int = 0  # claimed pages not yet processed
    fail: int = 0
    render_error: int = 0
    error: int = 0

    def encode(self) -> list[int]:
        return [int(getattr(self, f.name)) for f in dataclasses.fields(self)]

    @classmethod
    def decode(cls, row: Sequence[int]) -> "RankStatus":
        if len(row) != STATUS_LEN:
            raise ValueError(f"status vector has {len(row)} fields, expected {STATUS_LEN}")
        return cls(*(int(v) for v in row))

    @classmethod
    def index(cls, name: str) -> int:
        """Position of a field in the wire vector."""
        return [f.name for f in dataclasses.fields(cls)].index(name)

    def failures(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in FAILURE_STATUSES}


STATUS_LEN = len(dataclasses.fields(RankStatus))


@dataclass(frozen=True)
class Claim:
    """One claimed unit: its key in the chunk footer, its page count and the page keys to render."""

    unit_key: str
    n_pages: int
    pages: list[tuple[int, int]]  # (doc index, page); page 0 = the document's error row


class DocIds(Sequence[str]):
    """doc_id by document index, read lazily (the plan's documents may be a DocTable)."""

    def __init__(self, docs: Sequence[Any]) -> None:
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i):  # type: ignore[override]
        return self.docs[i].doc_id


class StealLike(Protocol):
    """The shape of `sched.steal.Steal`, named here so this module needs no torch."""

    thief: int
    victim: int
    units: tuple[int, ...]


class ClaimQueue:
    """Every rank's queue as this rank sees it (identical on all ranks between rounds), and what
    this rank has claimed from its own. It owns the queue lists: steals change them only through
    `apply_steals`, so the claim pointer and the queues stay consistent."""

    def __init__(self, queues: Sequence[Sequence[int]], rank: int, units: Sequence["Unit"],
                 doc_ids: Sequence[str], weights: Sequence[int],
                 skip: "set[tuple[int, int]] | frozenset[tuple[int, int]]" = frozenset()) -> None:
        self.queues = [list(q) for q in queues]
        # pages an earlier run committed inside units that are not done (another --unit-pages)
        self.skip = skip
        self.rank = rank
        self.units = units
        self.doc_ids = doc_ids
        self.weights = weights
        self.ptr = 0
        self.claimed_pages = 0
        self._page_unit: dict[tuple[int, int], str] = {}

    @property
    def mine(self) -> list[int]:
        return self.queues[self.rank]

    @property
    def exhausted(self) -> bool:
        """Nothing left to claim (claimed pages may still be in flight)."""
        return self.ptr >= len(self.mine)

    def claim(self) -> Claim | None:
        """Claim the next unit of this rank's queue, or None when it is exhausted."""
        if self.exhausted:
            return None
        u = self.units[self.mine[self.ptr]]
        self.ptr += 1
        key = u.key(self.doc_ids[u.doc])
        pages = [(u.doc, p) for p in u.pages()] if u.first else [(u.doc, 0)]
        if self.skip:
            pages = [k for k in pages if k not in self.skip]
        for k in pages:
            self._page_unit[k] = key
        self.claimed_pages += len(pages)
        return Claim(key, len(pages), pages)

    def finish(self, page: tuple[int, int]) -> str:
        """Mark a claimed page processed; returns the key of the unit it belongs to."""
        return self._page_unit.pop(page)

    def in_flight(self) -> list[tuple[int, int]]:
        """Claimed pages not yet finished, in (doc, page) order."""
        return sorted(self._page_unit)

    def reserve(self, batch_size: int) -> int:
        """Units this rank may claim before it applies the round it is posting (about one batch:
        a round completes when the slowest rank posts after its batch). Thieves leave them alone
        so a steal rarely races a claim; a race that does happen only costs a duplicate unit,
        dropped at gather."""
        reserve, pages_ahead, i = 0, 0, self.ptr
        q = self.mine
        while i < len(q) and pages_ahead < batch_size:
            pages_ahead += self.weights[q[i]]
            reserve += 1
            i += 1
        return reserve

    def status(self, done_pages: int, rate_milli: int, stop: bool, batch_size: int,
               failures: dict[str, int]) -> RankStatus:
        """The vector this rank posts, given what only the worker knows (pages done, rate)."""
        finished = self.exhausted and done_pages == self.claimed_pages
        return RankStatus(done_pages=done_pages, claimed=self.ptr, finished=int(finished),
                          rate_milli=rate_milli, stop=int(stop), reserve=self.reserve(batch_size),
                          inflight=self.claimed_pages - done_pages,
                          **{name: failures.get(name, 0) for name in FAILURE_STATUSES})

    def apply_steals(self, steals: Sequence["StealLike"]) -> int:
        """Move stolen units in this rank's view; returns how many units this rank took."""
        apply_steals(self.queues, steals)
        self.ptr = min(self.ptr, len(self.mine))
        return sum(len(s.units) for s in steals if s.thief == self.rank)


def apply_steals(queues: list[list[int]], steals: Sequence[StealLike]) -> None:
    """Move stolen units; identical on every rank, so the queue views stay in agreement.

    A thief's stolen units go after its own unclaimed ones, which by construction is where
    plan_steals counted them.
    """
    for s in steals:
        n = len(s.units)
        assert tuple(queues[s.victim][-n:]) == tuple(s.units), "queue views diverged between ranks"
        del queues[s.victim][-n:]
        queues[s.thief].extend(s.units)
