"""Rendering pages into model input tensors, in DataLoader workers, one page at a time.

Rendering matches nougat's `rasterize_paper` (pypdfium2 at 96 dpi) pixel for pixel, and the tensor
comes from nougat's own `SwinEncoder.prepare_input(img, random_padding=False)`; only the whole-
document-at-once loading is replaced by streaming single pages, and the margin crop inside
prepare_input by `crop_margin` below, which finds the same box three times faster
(tests/test_raster.py holds the two to the same tensors).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pypdfium2
import torch
from nougat.model import SwinEncoder
from nougat.transforms import test_transform
from PIL import Image

from nougat_dist import faults
from nougat_dist.errors import SetupError
from nougat_dist.ocr.predict import predict_page
from nougat_dist.store.manifest import DocEntry
from nougat_dist.inputs.sources import pdf_input

log = logging.getLogger(__name__)

NOUGAT_DPI = 96
MAX_PIXELS_ENV = "NOUGAT_DIST_MAX_PAGE_PIXELS"
DEFAULT_MAX_PAGE_PIXELS = 40_000_000


def set_max_page_pixels(limit: int) -> None:
    """Set the page raster cap for this process and its render workers (any start method)."""
    os.environ[MAX_PIXELS_ENV] = str(int(limit))


def check_page_size(p: pypdfium2.PdfPage, page: int) -> None:
    """Raise ValueError for a page whose 96 dpi raster would exceed the cap, before rendering:
    pdfium allocates the whole bitmap at once (a 20000 pt square page is 711 million pixels)."""
    limit = int(os.environ.get(MAX_PIXELS_ENV) or DEFAULT_MAX_PAGE_PIXELS)
    w_pt, h_pt = p.get_size()
    w, h = round(w_pt * NOUGAT_DPI / 72), round(h_pt * NOUGAT_DPI / 72)
    if w * h > limit:
        raise ValueError(f"page {page} is {w_pt:g} x {h_pt:g} pt, a {w} x {h} px raster at "
                         f"{NOUGAT_DPI} dpi, above --max-page-pixels {limit}: not rendered")


def kept_levels(lo: int, hi: int) -> np.ndarray:
    """For each grey level 0..255 of a page whose darkest pixel is `lo` and lightest `hi` (lo < hi),
    whether nougat's margin crop counts it as ink: the very expression nougat evaluates per pixel,
    `(data - min) / (max - min) * 255 < 200` on uint8 data, evaluated once per level."""
    lo8, hi8 = np.uint8(lo), np.uint8(hi)
    # Levels below the darkest never occur; clamping keeps the uint8 subtraction from wrapping.
    levels = np.maximum(np.arange(256, dtype=np.uint8), lo8)
    return (levels - lo8) / (hi8 - lo8) * 255 < 200


def crop_margin(img: Image.Image) -> Image.Image:
    """`SwinEncoder.crop_margin`, the same box in a third of the time.

    nougat greys the page, stretches it to 0..255 by its darkest and lightest pixel in float64,
    keeps the pixels below 200 and crops to their bounding box (OpenCV). Whether a pixel is kept
    depends on its grey level alone, so the test runs once per level (`kept_levels`), and PIL
    applies that table and finds the box in C.
    """
    gray = img.convert("L")
    lo, hi = gray.getextrema()
    if lo == hi:
        return img
    table = (kept_levels(lo, hi) * 255).astype(np.uint8).tolist()
    return img.crop(gray.point(table).getbbox())


class EncoderInput:
    """Carries exactly the attributes `SwinEncoder.prepare_input` reads, so DataLoader workers run
    nougat's own preprocessing code without holding (or forking) the model weights."""

    crop_margin = staticmethod(crop_margin)

    def __init__(self, input_size: Sequence[int], align_long_axis: bool) -> None:
        self.input_size = list(input_size)
        self.align_long_axis = align_long_axis
        self.to_tensor = test_transform  # what an eval-mode SwinEncoder uses

    def __call__(self, img: Image.Image) -> torch.Tensor | None:
        return SwinEncoder.prepare_input(self, img, random_padding=False)


def render_page(doc: pypdfium2.PdfDocument, page: int) -> Image.Image:
    """Render 1-based page at nougat's resolution."""
    p = doc[page - 1]
    try:
        check_page_size(p, page)
        return p.render(scale=NOUGAT_DPI / 72).to_pil()
    finally:
        p.close()


def render_and_predict(doc: pypdfium2.PdfDocument, page: int) -> tuple[Image.Image, float]:
    """Render 1-based page at nougat's resolution, with its predicted decode length (tokens)."""
    p = doc[page - 1]
    try:
        check_page_size(p, page)
        img = p.render(scale=NOUGAT_DPI / 72).to_pil()
        return img, predict_page(p, img).tokens
    finally:
        p.close()


@dataclass
class PageItem:
    """What a worker hands back for one (document, page)."""

    doc: int
    page: int
    image: torch.Tensor | None
    error: str | None
    elapsed_ms: float = 0.0
    predicted_tokens: float = 0.0  # ocr/predict.py, for length-aware batching


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


class PageDataset(torch.utils.data.Dataset):
    """Map-style dataset over (doc index, page) keys; the live scheduler picks the keys.

    In a render worker each page runs under a timer of `page_timeout` seconds (ITIMER_REAL): at
    expiry the kernel ends the worker with SIGALRM, whatever it is doing, even inside pdfium's C
    code where no Python handler could run. The rank finds the dead worker and the page in
    `watch`. Pages in `failed` (key -> reason) are not rendered again: their item is the error.
    """

    def __init__(self, docs: Sequence[DocEntry], prepare: Callable[[Image.Image], torch.Tensor | None],
                 page_timeout: float = 0.0, watch: RenderWatch | None = None) -> None:
        self.docs = docs
        self.prepare = prepare
        self.page_timeout = page_timeout
        self.watch = watch
        self.failed: dict[tuple[int, int], str] = {}
        self._open_doc: tuple[int, pypdfium2.PdfDocument] | None = None

    def _document(self, doc: int) -> pypdfium2.PdfDocument:
        # Units hand consecutive pages of one document to the same batch, so keeping the last
        # document open saves re-parsing it for every page.
        if self._open_doc is not None and self._open_doc[0] == doc:
            return self._open_doc[1]
        self.close()
        pdf = pypdfium2.PdfDocument(pdf_input(self.docs[doc].to_source()))
        self._open_doc = (doc, pdf)
        return pdf

    def close(self) -> None:
        if self._open_doc is not None:
            self._open_doc[1].close()
            self._open_doc = None

    def __len__(self) -> int:  # keys are (doc, page) tuples; the length is never used for sampling
        return len(self.docs)

    def __getitem__(self, key: tuple[int, int]) -> PageItem:
        doc, page = key
        entry = self.docs[doc]
        if page == 0:
            return PageItem(doc, 0, None, entry.error or "PDF has 0 pages")
        if key in self.failed:
            return PageItem(doc, page, None, self.failed[key])
        info = torch.utils.data.get_worker_info()
        if info is None:  # rendering in the rank itself (--num-workers 0): no timer, no watch
            return self._render(key)
        faults.gate_render(Path(entry.member or entry.source).name, page)
        if self.watch is not None:
            self.watch.begin(info.id, key)
        if self.page_timeout > 0:
            signal.setitimer(signal.ITIMER_REAL, self.page_timeout)
        try:
            return self._render(key)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if self.watch is not None:
                self.watch.end(info.id)

    def _render(self, key: tuple[int, int]) -> PageItem:
        doc, page = key
        entry = self.docs[doc]
        faults.hit_render(Path(entry.member or entry.source).name, page)
        t0 = time.perf_counter()
        try:
            pdf = self._document(doc)
        except (pypdfium2.PdfiumError, OSError) as e:
            return PageItem(doc, page, None, f"cannot open document: {e}")
        try:
            img, predicted = render_and_predict(pdf, page)
        except (pypdfium2.PdfiumError, OSError, ValueError) as e:
            return PageItem(doc, page, None, f"page {page} failed to render: {e}")
        try:
            tensor = self.prepare(img)
        except (OSError, ValueError) as e:
            return PageItem(doc, page, None, f"page {page} failed in prepare_input: {e}")
        if tensor is None:
            # nougat's prepare_input returns None for a broken or zero-size image; the stock CLI
            # then drops the page silently.
            return PageItem(doc, page, None, f"page {page}: nougat's prepare_input rejected the image")
        return PageItem(doc, page, tensor, None, (time.perf_counter() - t0) * 1000, predicted)


@dataclass
class Batch:
    keys: list[tuple[int, int]]  # every page of the batch, in order
    images: torch.Tensor | None  # stacked tensors of the pages that rendered (ok_index order)
    ok_index: list[int]  # positions in keys that have an image
    errors: dict[int, str]  # position in keys → render error
    render_ms: list[float]
    predicted_tokens: list[float] = dataclasses.field(default_factory=list)  # per key

    def pin_memory(self) -> "Batch":
        """Called by DataLoader's pin-memory thread (pin_memory=True): page-locked images make
        the rank's `.to(device, non_blocking=True)` a real asynchronous copy. Without this method
        the thread would pass the dataclass through untouched, from pageable memory."""
        if self.images is None:
            return self
        return dataclasses.replace(self, images=self.images.pin_memory())


def collate(items: list[PageItem]) -> Batch:
    ok = [i for i, it in enumerate(items) if it.image is not None]
    images = torch.stack([items[i].image for i in ok]) if ok else None
    return Batch(
        keys=[(it.doc, it.page) for it in items],
        images=images,
        ok_index=ok,
        errors={i: it.error for i, it in enumerate(items) if it.image is None},
        render_ms=[it.elapsed_ms for it in items],
        predicted_tokens=[it.predicted_tokens for it in items],
    )


def _worker_init(_: int) -> None:
    # Each worker renders one page at a time; more intra-op threads would only fight the model.
    torch.set_num_threads(1)
    # Slurm, torchrun and Ctrl-C signal the whole process group; the rank decides when to stop
    # (after committing), and its workers exit with it. A worker dying on the signal would
    # instead crash the rank mid-batch.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    # A page's timer (PageDataset.page_timeout) ends the worker by the default action of SIGALRM.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)


class LiveBatchSampler:
    """Yields batches of page keys taken from a queue that the scheduler can grow or shrink.

    It is iterated in the main process (DataLoader sends only the keys to workers), so claiming a
    unit here is visible to the scheduler immediately.
    """

    def __init__(self, next_unit_pages: Callable[[], list[tuple[int, int]] | None], batch_size: int):
        self.next_unit_pages = next_unit_pages
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch: list[tuple[int, int]] = []
        while True:
            keys = self.next_unit_pages()
            if keys is None:
                break
            for k in keys:
                batch.append(k)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch


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


#: How long the rank waits for a rendered batch before it gets on with other work (a status
#: round, a stop request) and looks again. It is also how soon a dead render worker is noticed.
POLL_S = 1.0


def make_loader(dataset: PageDataset, sampler: LiveBatchSampler, num_workers: int,
                prefetch_factor: int, pin_memory: bool,
                poll_s: float = 0.0) -> torch.utils.data.DataLoader:
    """Workers render ahead of the model. With `poll_s`, waiting for a batch gives up after that
    many seconds (`is_poll_timeout`), so the rank never sits in one wait longer (needs
    num_workers > 0)."""
    kwargs = {}
    if num_workers > 0:
        kwargs = dict(prefetch_factor=prefetch_factor, persistent_workers=True,
                      worker_init_fn=_worker_init, timeout=poll_s)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate, pin_memory=pin_memory, **kwargs)


def iterate(loader: torch.utils.data.DataLoader) -> Iterator[Batch]:
    """`iter(loader)`, with a dead worker reported only where the rank asks for a batch.

    DataLoader's SIGCHLD handler raises "worker killed by signal" in the main thread wherever it
    is when a worker dies: inside model.inference, a commit, a collective, the model's loading.
    No recovery is possible from there. Without the handler a dead worker is found where the rank
    waits for a batch (`dead_workers`), and only that page is lost. The handler is never
    installed in this process, and removed if it already was (it is torch's, process-wide).
    """
    from torch.utils.data._utils import signal_handling

    if loader.num_workers > 0:
        signal_handling._SIGCHLD_handler_set = True  # torch checks this before installing it
        handler = signal.getsignal(signal.SIGCHLD)
        if callable(handler) and getattr(handler, "__module__", "") == signal_handling.__name__:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return iter(loader)


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
    _worker_init), so DataLoader's own terminate() cannot stop a hung one.
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
    handler sends daemon children SIGTERM, which the workers ignore (see _worker_init), then joins
    them. DataLoader stops its workers when the iterator is collected, and a reference cycle or
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
