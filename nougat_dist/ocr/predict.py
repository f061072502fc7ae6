"""A cheap prediction of how many tokens Nougat will decode for a page.

A batch costs as many decode steps as its longest page, so the work loop groups pages of similar
predicted length (nougat_dist/sched/batching.py). Two signals are available for every page without
running the model:

* the PDF text layer: born-digital pages carry their text, and Nougat's output is that text in
  markdown, so its length is close to the character count (about 3.2 characters per token for
  Nougat's BPE on English papers);
* ink coverage of the rendered image: the share of dark pixels, for scans, which have no text layer.

`bench/batching.py` measures how well each ranks pages by their true length (Spearman).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pypdfium2
from PIL import Image

log = logging.getLogger(__name__)

#: Characters per Nougat token on English academic text (the ratio the DESIGN's simulation uses).
CHARS_PER_TOKEN = 3.2
#: A page with fewer text-layer characters than this is treated as having no text layer: scans
#: often carry a page number or a stamp as text, which says nothing about the page.
MIN_TEXT_CHARS = 40
#: Grey level below which a pixel counts as ink (nougat's margin crop uses the same cut on a
#: stretched page).
INK_LEVEL = 200
#: Tokens per unit of ink coverage, fitted on the generated sample papers (pages that have both
#: signals) so that the two predictions share one scale within a window that mixes scans and
#: born-digital pages. See bench/batching.py --fit-ink.
TOKENS_PER_INK = 9000.0


@dataclass(frozen=True)
class PagePrediction:
    """What the render worker measured for one page; `tokens` is what batching sorts by."""

    text_chars: int
    ink: float
    tokens: float
    source: str  # "text" or "ink"


def text_chars(page: pypdfium2.PdfPage) -> int:
    """Non-whitespace characters in the page's text layer (0 for a scan)."""
    textpage = page.get_textpage()
    try:
        text = textpage.get_text_bounded()
    finally:
        textpage.close()
    return sum(1 for c in text if not c.isspace())


def ink_coverage(img: Image.Image) -> float:
    """Share of the page's pixels darker than INK_LEVEL, from the grey histogram (one C pass)."""
    hist = np.asarray(img.convert("L").histogram(), dtype=np.int64)
    total = int(hist.sum())
    return float(hist[:INK_LEVEL].sum()) / total if total else 0.0


def predict_tokens(chars: int, ink: float) -> tuple[float, str]:
    """Predicted decode length from the two signals: the text layer where there is one."""
    if chars >= MIN_TEXT_CHARS:
        return chars / CHARS_PER_TOKEN, "text"
    return ink * TOKENS_PER_INK, "ink"


def predict_page(page: pypdfium2.PdfPage, img: Image.Image) -> PagePrediction:
    """Both signals and the prediction for a rendered page."""
    chars = text_chars(page)
    ink = ink_coverage(img)
    tokens, source = predict_tokens(chars, ink)
    return PagePrediction(chars, ink, tokens, source)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan for fewer than 2 points or a
    constant series."""
    if len(x) != len(y):
        raise ValueError("series of different lengths")
    if len(x) < 2:
        return float("nan")
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), float)
    ranks[order] = np.arange(len(a), dtype=float)
    # Tied values share the mean of their ranks.
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]
