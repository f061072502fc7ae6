"""Deterministic faults for the fault-tolerance tests, behind the product's fault hook.

`env(spec)` is the environment that arms `spec` in a run (nougat_dist/faults.py calls in):

- "point:n[@rank]" SIGKILLs the process the n-th time it reaches `point` (on `rank` only, if
  given); points `commit` and `manifest`.
- "render-hang:NAME:PAGE" or "render-crash:NAME:PAGE" makes rendering page PAGE of the file (or
  archive member) named NAME hang forever or die by SIGKILL, wherever it runs.

With NOUGAT_DIST_FAULT_GATE=PATH a render worker that reaches that page first waits (before the
page's timer starts) until PATH exists, and writes its pid to PATH.pid just before the fault: a
test opens the gate at the moment it wants the fault, and knows which process to watch die.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable

ENV = "NOUGAT_DIST_FAULT"  # = nougat_dist.faults.ENV
GATE_ENV = "NOUGAT_DIST_FAULT_GATE"


def value(spec: str) -> str:
    """The hook's value that arms `spec` (for $NOUGAT_DIST_FAULT)."""
    return f"{__name__}:points:{spec}"


def env(spec: str) -> dict[str, str]:
    """The environment that arms `spec` in a run."""
    return {ENV: value(spec)}


def points(spec: str) -> Callable[..., None]:
    """The fault function for `spec` (called by the product's hook once per process)."""
    if spec.startswith("render-"):
        kind, target_name, target_page = spec.split(":")
        return lambda point, **where: _render(point, kind, (target_name, int(target_page)), **where)
    where, _, rank = spec.partition("@")
    target, _, nth = where.partition(":")
    count = 0

    def kill_at_nth(point: str, rank: int = 0, **_: Any) -> None:
        nonlocal count
        if point != target or (rank_only is not None and rank != rank_only):
            return
        count += 1
        if count == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)

    rank_only = int(rank) if rank else None
    return kill_at_nth


def _render(point: str, kind: str, target: tuple[str, int], **where: Any) -> None:
    if (where.get("name"), where.get("page")) != target:
        return
    gate = os.environ.get(GATE_ENV)
    if point == "render-start":
        while gate and not os.path.exists(gate):
            time.sleep(0.01)
        return
    if point != "render":
        return
    if gate:
        with open(gate + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(gate + ".tmp", gate + ".pid")
    if kind == "render-hang":
        while True:
            time.sleep(3600)
    if kind == "render-crash":
        os.kill(os.getpid(), signal.SIGKILL)
