"""Keeping a rank's render workers honest: the /dev/shm they need, which page each is on, how
one died, and stopping them (even one hung inside pdfium, which ignores SIGTERM)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Sequence

import torch

from nougat_dist.errors import SetupError

SHM_PATH = "/dev/shm"


def shm_needed(input_size: Sequence[int], batch_size: int, num_workers: int, prefetch_factor: int,
               ranks_on_node: int = 1) -> int:
    """Bytes of /dev/shm the render workers of this node hold at once: each worker hands back its
    prefetched batches (float32 page tensors, 3 x H x W) through shared memory."""
    page = 3 * input_size[0] * input_size[1] * 4
    return page * batch_size * num_workers * prefetch_factor * ranks_on_node


def shm_free(path: str = SHM_PATH) -> int | None:
    """Free bytes in the shared-memory file system, or None where there is none to check."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def check_shm(needed: int, free: int | None, num_workers: int, prefetch_factor: int) -> None:
    """Fail at start, with what to change, instead of workers dying mid-job (Docker's default
    /dev/shm is 64 MB; one batch at nougat's real input size is hundreds)."""
    if free is None or num_workers == 0 or needed <= free:
        return
    mib = 2 ** 20
    raise SetupError(
        f"{SHM_PATH} has {free / mib:.0f} MiB free but the render workers of this node will hold "
        f"about {needed / mib:.0f} MiB in it ({num_workers} worker(s) x prefetch {prefetch_factor} "
        "batches per rank). In Docker run with --ipc=host or --shm-size=<more> (e.g. "
        f"--shm-size={max(1, -(-needed * 2 // 2**30))}g); or lower --num-workers / "
        "--prefetch-factor / --batch-size.")


class RenderWatch:
    """Which page each render worker is on, in memory shared with the workers.

    A worker writes the page's key before it renders and clears it after; when a worker dies (a
    crash in pdfium, or killed by its own page timer), the rank reads here which page it died on,
    so that page alone becomes an error row. Allocated before the workers fork, so they share it.
    """

    IDLE = -1

    def __init__(self, num_workers: int) -> None:
        self._slots = mp.RawArray("q", 2 * max(num_workers, 1))
        self.reset()

    def reset(self) -> None:
        """Forget every worker's page (the rank does this before starting fresh workers)."""
        for i in range(len(self._slots)):
            self._slots[i] = self.IDLE

    def begin(self, worker_id: int, key: tuple[int, int]) -> None:
        self._slots[2 * worker_id + 1] = key[1]
        self._slots[2 * worker_id] = key[0]

    def end(self, worker_id: int) -> None:
        self._slots[2 * worker_id] = self.IDLE

    def current(self, worker_id: int) -> tuple[int, int] | None:
        """The page worker `worker_id` was rendering, or None if it was between pages."""
        doc = self._slots[2 * worker_id]
        return None if doc == self.IDLE else (doc, self._slots[2 * worker_id + 1])



def is_poll_timeout(e: RuntimeError) -> bool:
    """Whether `next()` on a loader made with `poll_s` only ran out of patience (no batch yet)."""
    return str(e).startswith("DataLoader timed out after")


def pin_thread_alive(it: object) -> bool:
    """Whether the pin-memory thread of iterator `it` runs (True where it has none)."""
    thread = getattr(it, "_pin_memory_thread", None)
    return thread is None or thread.is_alive()


def dead_workers(it: object, wait_s: float = 0.0) -> list[tuple[int, int | None]]:
    """(worker id, exit code) of each render worker of iterator `it` that is no longer alive,
    waiting up to `wait_s` seconds for one to be."""
    workers = list(getattr(it, "_workers", []))
    deadline = time.monotonic() + wait_s
    while True:
        dead = [(i, w.exitcode) for i, w in enumerate(workers) if not w.is_alive()]
        if dead or not workers or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def death_reason(page: int, exitcode: int | None, page_timeout: float) -> str:
    """The error of the page a render worker died on, from how it died."""
    if exitcode == -signal.SIGALRM:
        return f"page {page}: rendering did not finish within {page_timeout:g}s (render worker stopped)"
    how = (f"killed by {signal.Signals(-exitcode).name}" if exitcode is not None and exitcode < 0
           else f"exit code {exitcode}")
    return f"page {page}: the renderer crashed ({how})"


def discard_workers(it: object) -> None:
    """Kill every worker of a failed DataLoader iterator (others may be hung inside pdfium).

    This reaches into DataLoader internals on purpose: the workers ignore SIGTERM (see
    render._worker_init), so DataLoader's own terminate() cannot stop a hung one.
    """
    from torch.utils.data._utils import signal_handling

    if getattr(it, "_worker_pids_set", False):
        signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False  # type: ignore[attr-defined]
    workers = list(getattr(it, "_workers", []))
    for w in workers:
        if w.is_alive():
            w.kill()
    for w in workers:
        w.join(5)
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def close_loader(loader: torch.utils.data.DataLoader) -> None:
    """Stop a loader's persistent workers now instead of whenever its iterator is collected.

    A worker still alive at interpreter exit blocks the process for good: multiprocessing's exit
    handler sends daemon children SIGTERM, which the workers ignore (see render._worker_init),
    then joins them. DataLoader stops its workers when the iterator is collected, and a reference cycle or
    gc.freeze() can put that off past the exit. A worker that does not stop within DataLoader's
    grace period (one hung in pdfium) is killed.
    """
    it = getattr(loader, "_iterator", None)
    if it is None:
        return
    loader._iterator = None  # type: ignore[attr-defined]
    workers = list(getattr(it, "_workers", []))
    it._shutdown_workers()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(5)
