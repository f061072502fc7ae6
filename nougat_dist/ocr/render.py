"""Rendering pages into model input tensors, in DataLoader workers, one page at a time.

Only nougat's whole-document-at-once loading is replaced: pages stream one at a time, in the order
the live scheduler claims them (`LiveBatchSampler`), each under a timer in its worker. The page
itself is rendered as nougat does (raster.py); the workers are watched and stopped by
render_workers.py.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import pypdfium2
import torch
from PIL import Image

from nougat_dist import faults
from nougat_dist.ocr.raster import (NOUGAT_DPI, EncoderInput, crop_margin, kept_levels,
                                    render_and_predict, render_page, set_max_page_pixels)
from nougat_dist.ocr.render_workers import (RenderWatch, check_shm, close_loader, dead_workers,
                                            death_reason, discard_workers, is_poll_timeout,
                                            pin_thread_alive, shm_free, shm_needed)
from nougat_dist.store.manifest import DocEntry
from nougat_dist.inputs.sources import pdf_input

# The rank's loop (worker.py), the self test and the tests read the raster and worker names here,
# beside the dataset and loader they go with.
__all__ = ["NOUGAT_DPI", "POLL_S", "Batch", "EncoderInput", "LiveBatchSampler", "PageDataset",
           "PageItem", "RenderWatch", "check_shm", "close_loader", "collate", "crop_margin",
           "dead_workers", "death_reason", "discard_workers", "is_poll_timeout", "iterate",
           "kept_levels", "make_loader", "pin_thread_alive", "render_page", "set_max_page_pixels",
           "shm_free", "shm_needed"]

log = logging.getLogger(__name__)


@dataclass
class PageItem:
    """What a worker hands back for one (document, page)."""

    doc: int
    page: int
    image: torch.Tensor | None
    error: str | None
    elapsed_ms: float = 0.0
    predicted_tokens: float = 0.0  # ocr/predict.py, for length-aware batching


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
        faults.hit("render-start", name=Path(entry.member or entry.source).name, page=page)
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
        faults.hit("render", name=Path(entry.member or entry.source).name, page=page)
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
