"""Length predictor and the length-aware batching window (pure; a few rendered sample pages)."""

from __future__ import annotations

import random

import pypdfium2
import pytest
from PIL import Image

from nougat_dist.ocr import predict
from nougat_dist.ocr.render import NOUGAT_DPI
from nougat_dist.sched.batching import (LengthWindow, efficiency, length_aware_batches,
                                        make_batches)


def test_efficiency_counts_batch_size_times_longest_page():
    assert efficiency([[10, 10], [5]]) == 1.0
    # 10 + 30 tokens in 2 x 30 slots
    assert efficiency([[10, 30]]) == pytest.approx(40 / 60)
    assert efficiency([[10, 30], [20]]) == pytest.approx(60 / 80)


def test_every_page_exactly_once_and_batches_full():
    rng = random.Random(0)
    items = [(i, rng.uniform(10, 3000)) for i in range(203)]
    batches = make_batches("length_aware", items, 8, depth=4, max_age=6)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(203))
    # Only the batches emitted while the window drains at the end may be short.
    assert all(len(b) == 8 for b in batches[:-1]) and 0 < len(batches[-1]) <= 8


def test_no_page_waits_longer_than_max_age():
    rng = random.Random(1)
    items = [(i, rng.choice([10.0, 5000.0]) if i % 7 else 1e6) for i in range(400)]
    window: LengthWindow[int] = LengthWindow(8, depth=4, max_age=5)
    arrived: dict[int, int] = {}
    emitted = 0
    worst = 0
    for item, length in items:
        window.add(item, length)
        arrived[item] = emitted
        if window.full():
            for i in window.pop():
                worst = max(worst, emitted - arrived[i])
            emitted += 1
    assert len(window) <= window.capacity
    # A page that became due at age max_age goes into the very next batch.
    assert worst <= 5


def test_similar_lengths_share_a_batch():
    # Alternating short and long pages: document order mixes them in every batch.
    items = [(i, 50.0 if i % 2 else 2000.0) for i in range(96)]
    lengths = dict(items)
    doc = make_batches("document_order", items, 8)
    aware = make_batches("length_aware", items, 8, depth=4, max_age=8)
    eff_doc = efficiency([[lengths[i] for i in b] for b in doc])
    eff_aware = efficiency([[lengths[i] for i in b] for b in aware])
    assert eff_doc == pytest.approx((50 + 2000) / 2 / 2000)
    assert eff_aware > 0.95


def test_arrival_order_kept_within_a_batch_and_unknown_policy():
    batch = next(length_aware_batches([(i, 1.0) for i in range(8)], 4))
    assert batch == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown batching policy"):
        make_batches("sorted", [], 4)


def test_spearman():
    assert predict.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert predict.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert predict.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)


def test_ink_coverage_and_fallback():
    white = Image.new("RGB", (100, 100), "white")
    assert predict.ink_coverage(white) == 0.0
    half = white.copy()
    half.paste((0, 0, 0), (0, 0, 100, 50))
    assert predict.ink_coverage(half) == pytest.approx(0.5)
    assert predict.predict_tokens(0, 0.1) == (0.1 * predict.TOKENS_PER_INK, "ink")
    assert predict.predict_tokens(320, 0.1) == (100.0, "text")


def test_predictor_on_sample_pages(sample_pdfs):
    """On generated papers, text characters and ink both rise with the page's text."""
    doc = pypdfium2.PdfDocument(str(sample_pdfs[0]))
    preds = []
    for i in range(len(doc)):
        page = doc[i]
        img = page.render(scale=NOUGAT_DPI / 72).to_pil()
        preds.append(predict.predict_page(page, img))
        page.close()
    assert all(p.source == "text" and p.text_chars > predict.MIN_TEXT_CHARS for p in preds)
    assert all(0 < p.ink < 0.5 for p in preds)
    blank = Image.new("RGB", (200, 300), "white")
    scan = predict.predict_page(_blank_page(), blank)
    assert (scan.text_chars, scan.source, scan.tokens) == (0, "ink", 0.0)


def _blank_page() -> pypdfium2.PdfPage:
    pdf = pypdfium2.PdfDocument.new()
    return pdf.new_page(200, 300)


def test_batch_window_groups_rendered_pages_and_passes_failed_ones_through():
    """ocr/window.BatchWindow, what the work loop uses: rendered batches in, batches of similar
    predicted length out, each page's tensor and figures kept with its key; a page that did not
    render comes straight back."""
    import torch

    from nougat_dist.ocr.render import Batch
    from nougat_dist.ocr.window import BatchWindow

    w = BatchWindow(batch_size=2, depth=2)
    a = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    failed = w.take(Batch(keys=[(0, 1), (0, 2), (0, 3)], images=a, ok_index=[0, 2],
                          errors={1: "boom"}, render_ms=[1.0, 2.0, 3.0],
                          predicted_tokens=[10.0, 0.0, 500.0]))
    assert failed is not None and failed.keys == [(0, 2)] and failed.images is None
    assert failed.errors == {0: "boom"} and failed.render_ms == [2.0]
    assert w.keys() == {(0, 1), (0, 3)} and not w.full() and w.ready(drained=False)
    b = a + 1000
    assert w.take(Batch(keys=[(1, 1), (1, 2)], images=b, ok_index=[0, 1], errors={},
                        render_ms=[4.0, 5.0], predicted_tokens=[490.0, 12.0])) is None
    a.zero_()  # the window holds copies: the render workers' buffers can go
    assert w.full()
    first = w.pop()
    assert first.keys == [(0, 1), (1, 2)] and first.ok_index == [0, 1] and not first.errors
    assert first.render_ms == [1.0, 5.0] and first.predicted_tokens == [10.0, 12.0]
    assert torch.equal(first.images[0], torch.arange(48, dtype=torch.float32).reshape(3, 4, 4))
    assert torch.equal(first.images[1], b[1])
    second = w.pop()
    assert second.keys == [(0, 3), (1, 1)] and torch.equal(second.images[1], b[0])
    assert len(w) == 0 and not w.keys() and not w.ready(drained=True)
