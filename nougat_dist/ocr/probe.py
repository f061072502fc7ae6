"""The largest batch a GPU holds for a worst-case decode, found by probing.

A page costs the most when its decode runs to the checkpoint's max_length: nougat keeps every
step's scores (batch x vocabulary per token) and the KV cache, both linear in the tokens decoded,
and stacks the scores at the end. The peak of one batch is the larger of two regimes, the encoder's
activations (linear in the batch) and the decode's memory (linear in batch x tokens), so short
decodes say nothing about a full one when the encoder's peak hides the decode's: measured on an
H200 with the real 0.1.0-small architecture, decodes of 224 and 448 tokens peaked at the same
memory, and a line through them promised 585 pages at 3584 tokens where the scores alone need
about 0.7 GB a page. The probe therefore decodes the full max_length at two small batches, fits
peak = fixed + batch x per_page at that length, and verifies the batch it implies with one full
decode (stepping down on OOM).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from nougat_dist.ocr.model import is_oom

log = logging.getLogger(__name__)

#: Share of the free GPU memory a batch may use: the rest absorbs allocator fragmentation, NCCL's
#: buffers and the pinned-copy staging of a real job.
HEADROOM = 0.9


@contextlib.contextmanager
def forced_length(model: Any, tokens: int) -> Iterator[None]:
    """Every decode `model.inference` starts runs to exactly `tokens` tokens: end-of-sequence is
    held off (min_length) and no stopping criterion applies. nougat's own inference code runs
    unchanged around it, so the memory it takes is the real worst case."""
    from transformers import StoppingCriteriaList

    decoder = model.decoder.model
    generate = decoder.generate

    def worst_case(*args: Any, **kwargs: Any) -> Any:
        kwargs["min_length"] = kwargs["max_length"] = tokens
        kwargs["stopping_criteria"] = StoppingCriteriaList([])
        return generate(*args, **kwargs)

    decoder.generate = worst_case
    try:
        yield
    finally:
        del decoder.generate  # the class's method again


def batch_of(images: torch.Tensor, n: int) -> torch.Tensor:
    """n page tensors, cycling through the given ones."""
    return images[torch.arange(n) % len(images)]


def _peak(model: Any, images: torch.Tensor, batch: int, tokens: int) -> int:
    """Peak bytes a forced decode of `batch` pages x `tokens` tokens allocates beyond the model."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with forced_length(model, tokens), torch.inference_mode():
        model.inference(image_tensors=batch_of(images, batch))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@dataclass
class Line:
    """peak(batch) = fixed + batch x per_page, for decodes of one fixed length."""

    fixed: float
    per_page: float

    def peak(self, batch: int) -> float:
        return self.fixed + batch * self.per_page

    def largest_batch(self, budget: float) -> int:
        if self.per_page <= 0:
            return 0
        return max(0, int((budget - self.fixed) // self.per_page))


def fit(b1: int, b2: int, p1: float, p2: float) -> Line:
    """The line through the peaks p1, p2 measured at batches b1 < b2."""
    per_page = max(0.0, (p2 - p1) / (b2 - b1))
    return Line(fixed=max(0.0, p1 - b1 * per_page), per_page=per_page)


#: Beyond this a batch buys nothing on any current GPU (the decode is memory-bound long before),
#: and the pages in flight (render workers x prefetch x batch) would crowd /dev/shm and host RAM.
MAX_BATCH = 256


@dataclass
class ProbeResult:
    batch: int
    verified: bool
    line: Line
    budget: int
    seconds: float | None  # one worst-case batch, when verified
    notes: list[str]


def _fits(measure: Callable[[int, int], float], batch: int, tokens: int) -> tuple[bool, float]:
    t0 = time.monotonic()
    try:
        measure(batch, tokens)
        ok = True
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
        if not is_oom(e):
            raise
        ok = False
    # Outside the handler: the failed attempt's frames (and its tensors) are gone by now.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ok, time.monotonic() - t0


def largest_batch(model: Any, images: torch.Tensor, max_length: int, verify: bool = True,
                  budget: int | None = None,
                  measure: Callable[[int, int], float] | None = None) -> ProbeResult:
    """The batch size to run with on this GPU: as many pages as fit a max_length decode each.

    `measure(batch, tokens)` returns the peak bytes of one forced decode (default: on the GPU,
    with `model` and `images`); `budget` defaults to HEADROOM of the free GPU memory."""
    if measure is None:
        def measure(batch: int, tokens: int) -> float:
            return _peak(model, images, batch, tokens)
    if budget is None:
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        budget = int(free * HEADROOM)
    b1, b2 = 2, 4
    p1, p2 = measure(b1, max_length), measure(b2, max_length)
    line = fit(b1, b2, p1, p2)
    batch = line.largest_batch(budget)
    notes = [f"full {max_length}-token decodes peaked at {p1 / 2**20:.0f} MiB ({b1} pages) and "
             f"{p2 / 2**20:.0f} MiB ({b2} pages)"]
    if batch > MAX_BATCH:
        notes.append(f"{batch} would fit; capped at {MAX_BATCH}")
        batch = MAX_BATCH
    if not verify or batch < 1:
        return ProbeResult(batch, False, line, budget, None, notes)
    for _ in range(8):
        ok, seconds = _fits(measure, batch, max_length)
        if ok:
            return ProbeResult(batch, True, line, budget, seconds, notes)
        notes.append(f"{batch} pages ran out of memory at {max_length} tokens")
        batch = int(batch * 0.85)
        if batch < 1:
            break
    return ProbeResult(batch, False, line, budget, None, notes)
