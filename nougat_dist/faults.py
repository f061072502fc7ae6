"""The fault hook: named points where a fault-tolerance test may crash, hang or hold a run.

$NOUGAT_DIST_FAULT names the function called at every point (hooks.py; the tests' is
testing/faults.py). Unset, `hit` returns at once. Points:

- `commit`: a chunk is written and fsynced, not yet renamed into place;
- `manifest`: a document was inspected while the manifest is built;
- `render-start`: a page is about to render, before its render timer starts;
- `render`: a page is rendering (in its render worker, where one is used).

Each call passes `rank` (set by `configure`) and, for the render points, `name` (the file or
archive member) and `page`.
"""

from __future__ import annotations

from typing import Any

from nougat_dist import hooks

ENV = "NOUGAT_DIST_FAULT"
_rank = 0


def configure(rank: int) -> None:
    """The rank this process's fault points report."""
    global _rank
    _rank = rank


def hit(point: str, **where: Any) -> None:
    """Fault point `point`: hand it to the test's function, if one is set."""
    fault = hooks.from_env(ENV)
    if fault is not None:
        fault(point, rank=_rank, **where)
