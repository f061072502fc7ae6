"""Testing only: deterministic crash points for the fault-tolerance tests.

NOUGAT_DIST_FAULT="point:n[@rank]" SIGKILLs the process the n-th time it reaches `point` (on
`rank` only, if given). Points: `commit` (chunk written and fsynced, not yet renamed into place),
`manifest` (after inspecting a document while building the manifest). Unset, this does nothing.

NOUGAT_DIST_FAULT="render-hang:NAME:PAGE" or "render-crash:NAME:PAGE" makes rendering page PAGE
of the file (or archive member) named NAME hang forever or die by SIGKILL, wherever it runs.
With NOUGAT_DIST_FAULT_GATE=PATH a render worker that reaches that page first waits (before the
page's timer starts) until PATH exists, and writes its pid to PATH.pid just before the fault: a
test opens the gate at the moment it wants the fault, and knows which process to watch die.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "NOUGAT_DIST_FAULT"
GATE_ENV = "NOUGAT_DIST_FAULT_GATE"
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


def _render_target(name: str, page: int) -> str | None:
    """The render fault's kind if it targets this page, else None."""
    spec = os.environ.get(ENV)
    if not spec or not spec.startswith("render-"):
        return None
    kind, fname, fpage = spec.split(":")
    return kind if fname == name and int(fpage) == page else None


def gate_render(name: str, page: int) -> None:
    """Wait for the test's gate before rendering the targeted page (see the module docstring)."""
    gate = os.environ.get(GATE_ENV)
    if gate and _render_target(name, page):
        while not os.path.exists(gate):
            time.sleep(0.01)


def hit_render(name: str, page: int) -> None:
    kind = _render_target(name, page)
    if kind is None:
        return
    gate = os.environ.get(GATE_ENV)
    if gate:
        with open(gate + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(gate + ".tmp", gate + ".pid")
    if kind == "render-hang":
        while True:
            time.sleep(3600)
    if kind == "render-crash":
        os.kill(os.getpid(), signal.SIGKILL)
