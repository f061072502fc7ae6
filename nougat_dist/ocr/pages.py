"""Pages through the model: inference with OOM back-off, per-rank counters, and page rows."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from nougat_dist.ocr.model import PageResult, is_oom, page_results
from nougat_dist.store.manifest import DocEntry

log = logging.getLogger(__name__)


@dataclass
class RankStats:
    """One rank's counters for stats.json."""

    rank: int
    pages: int = 0
    units: int = 0
    units_stolen: int = 0
    busy_s: float = 0.0
    idle_s: float = 0.0
    wall_s: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    oom_retries: int = 0
    render_recoveries: int = 0
    rounds: int = 0
    work_start: float = 0.0  # epoch seconds: comparable across ranks, unlike monotonic clocks
    work_end: float = 0.0


class PageRunner:
    """Inference on one batch with OOM back-off: halve the batch and retry the pieces."""

    def __init__(self, model: Any, markdown: bool, skipping: bool, stats: RankStats) -> None:
        self.model = model
        self.markdown = markdown
        self.skipping = skipping
        self.stats = stats
        tok = getattr(getattr(model, "decoder", None), "tokenizer", None)
        self.pad_token_id = getattr(tok, "pad_token_id", None)

    def infer(self, images: torch.Tensor, pages: list[int]) -> list[PageResult]:
        """Per-page results of `images` (pages are their 1-based numbers, for the markers)."""
        out = self._attempt(images)
        if out is None:
            # Retried here, after the handler has ended: inside it the exception's traceback
            # keeps the failed attempt's frames and tensors alive through empty_cache() and both
            # retries, so each halving would start with less memory than the last.
            self.stats.oom_retries += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(images) // 2
            log.warning("out of memory on a batch of %d pages: retrying as %d + %d",
                        len(images), half, len(images) - half)
            return self.infer(images[:half], pages[:half]) + self.infer(images[half:], pages[half:])
        return page_results(out, pages, markdown=self.markdown, skipping=self.skipping,
                            pad_token_id=self.pad_token_id)

    def _attempt(self, images: torch.Tensor) -> dict[str, Any] | None:
        """One model.inference call; None when it ran out of memory on more than one page."""
        try:
            with torch.inference_mode():
                return self.model.inference(image_tensors=images, early_stopping=self.skipping)
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_oom(e) or len(images) == 1:
                raise
        return None


def page_row(entry: DocEntry, page: int, *, rank: int, model_id: str, dtype: str,
             result: PageResult | None, error: str | None, elapsed_ms: float,
             run_id: str | None = None) -> dict[str, Any]:
    """The Parquet row of one page: the model's result, or (result None) the render error.

    Page 0 stands for a document that could not be opened at all: its one row is an `error`.
    run_id names the run that made the row (see `provenance.new_run_id`); `ocr_at` is now.
    """
    row: dict[str, Any] = {"doc_id": entry.doc_id, "source": entry.source, "member": entry.member,
                           "page": page, "rank": rank, "model": model_id, "dtype": dtype,
                           "elapsed_ms": elapsed_ms, "run_id": run_id,
                           "ocr_at": datetime.now(timezone.utc)}
    if result is not None:
        row.update(text=result.text, status=result.status, error=None, n_tokens=result.n_tokens,
                   batch_steps=result.batch_steps)
    else:
        row.update(text="", status="error" if page == 0 else "render_error", error=error,
                   n_tokens=None, batch_steps=None)
    return row
