"""Testing only: deterministic crash points for the fault-tolerance tests.

NOUGAT_DIST_FAULT="point:n[@rank]" SIGKILLs the process the n-th time it reaches `point` (on
`rank` only, if given). Points: `commit` (chunk written and fsynced, not yet renamed into place),
`manifest` (after inspecting a document while building the manifest). Unset, this does nothing.

NOUGAT_DIST_FAULT="render-hang:NAME:PAGE" or "render-crash:NAME:PAGE" makes rendering page PAGE
of the file (or archive member) named NAME hang forever or die by SIGKILL, wherever it runs.
"""

from __future__ import annotations

import os
import signal
import time

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


def hit_render(name: str, page: int) -> None:
    spec = os.environ.get(ENV)
    if not spec or not spec.startswith("render-"):
        return
    kind, fname, fpage = spec.split(":")
    if fname != name or int(fpage) != page:
        return
    if kind == "render-hang":
        while True:
            time.sleep(3600)
    if kind == "render-crash":
        os.kill(os.getpid(), signal.SIGKILL)
