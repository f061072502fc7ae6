"""Testing only: deterministic crash points for the fault-tolerance tests.

NOUGAT_DIST_FAULT="point:n[@rank]" SIGKILLs the process the n-th time it reaches `point` (on
`rank` only, if given). Points: `commit` (chunk written and fsynced, not yet renamed into place),
`manifest` (after inspecting a document while building the manifest). Unset, this does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "NOUGAT_DIST_FAULT"
_counts: dict[str, int] = {}
_rank = 0


def configure(rank: int) -> None:
    global _rank
    _rank = rank


def hit(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, rank = spec.partition("@")
    name, _, nth = where.partition(":")
    if name != point or (rank and int(rank) != _rank):
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
