"""The largest batch a GPU holds for a worst-case decode, found by probing.

A page costs the most when its decode runs to the checkpoint's max_length: nougat keeps every
step's scores (batch x vocabulary per token) and the KV cache, both linear in the tokens decoded,
and stacks the scores at the end. So peak memory is about fixed + batch x (a + c x tokens): short
forced decodes at two batch sizes and two lengths give the line, the line gives the batch for
max_length, and one full-length decode at that batch verifies it (stepping down on OOM).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterator

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
    """peak(batch, tokens) = fixed + batch x (per_page + per_token x tokens)"""

    fixed: float
    per_page: float
    per_token: float

    def peak(self, batch: int, tokens: int) -> float:
        return self.fixed + batch * (self.per_page + self.per_token * tokens)

    def largest_batch(self, budget: float, tokens: int) -> int:
        per = self.per_page + self.per_token * tokens
        return max(0, int((budget - self.fixed) // per)) if per > 0 else 0


def fit(b1: int, b2: int, t1: int, t2: int, p11: float, p21: float, p12: float, p22: float) -> Line:
    """The line through four measured peaks p{batch}{tokens} (batches b1 < b2, tokens t1 < t2)."""
    slope1 = (p21 - p11) / (b2 - b1)  # bytes per page at t1 tokens
    slope2 = (p22 - p12) / (b2 - b1)
    per_token = max(0.0, (slope2 - slope1) / (t2 - t1))
    per_page = slope2 - per_token * t2
    fixed = p12 - b1 * slope2
    return Line(fixed=max(0.0, fixed), per_page=max(0.0, per_page), per_token=per_token)


@dataclass
class ProbeResult:
    batch: int
    verified: bool
    line: Line
    budget: int
    seconds: float | None  # one worst-case batch, when verified
    notes: list[str]


def _fits(model: Any, images: torch.Tensor, batch: int, tokens: int) -> tuple[bool, float]:
    t0 = time.monotonic()
    try:
        _peak(model, images, batch, tokens)
        ok = True
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
        if not is_oom(e):
            raise
        ok = False
    # Outside the handler: the failed attempt's frames (and its tensors) are gone by now.
    torch.cuda.empty_cache()
    return ok, time.monotonic() - t0


def largest_batch(model: Any, images: torch.Tensor, max_length: int, verify: bool = True) -> ProbeResult:
    """The batch size to run with on this GPU: as many pages as fit a max_length decode each."""
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    budget = int(free * HEADROOM)
    b1, b2 = 2, 8
    t1, t2 = max(4, max_length // 16), max(8, max_length // 8)
    peaks = [_peak(model, images, b, t) for t in (t1, t2) for b in (b1, b2)]
    line = fit(b1, b2, t1, t2, *peaks)
    batch = line.largest_batch(budget, max_length)
    notes = [f"peaks at {b1}/{b2} pages x {t1}/{t2} tokens: "
             + ", ".join(f"{p / 2**20:.0f}" for p in peaks) + " MiB"]
    if not verify or batch < 1:
        return ProbeResult(batch, False, line, budget, None, notes)
    for _ in range(4):
        ok, seconds = _fits(model, images, batch, max_length)
        if ok:
            return ProbeResult(batch, True, line, budget, seconds, notes)
        notes.append(f"{batch} pages ran out of memory at {max_length} tokens")
        batch = int(batch * 0.85)
        if batch < 1:
            break
    return ProbeResult(batch, False, line, budget, None, notes)
