"""The render workers' margin crop against nougat's own: same ink levels, same box, same tensor."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pypdfium2
import pytest
import torch
from nougat.model import SwinEncoder
from PIL import Image

from nougat_dist.store.manifest import DocTable, inspect
from nougat_dist.ocr.render import (EncoderInput, LiveBatchSampler, PageDataset, close_loader,
                                crop_margin, kept_levels, make_loader, render_page)
from nougat_dist.inputs.sources import Source
from testing import faults


class NougatInput(EncoderInput):
    """prepare_input exactly as nougat ships it, margin crop included."""

    crop_margin = staticmethod(SwinEncoder.crop_margin)


def nougat_kept(lo: int, hi: int) -> np.ndarray:
    """nougat's per-pixel ink test, run on a page holding every level from lo to hi."""
    data = np.arange(lo, hi + 1, dtype=np.uint8)
    min_val, max_val = data.min(), data.max()
    return (data - min_val) / (max_val - min_val) * 255 < 200


def test_kept_levels_match_nougat_for_every_darkest_and_lightest_level() -> None:
    mismatches = [(lo, hi) for lo in range(256) for hi in range(lo + 1, 256)
                  if not np.array_equal(kept_levels(lo, hi)[lo:hi + 1], nougat_kept(lo, hi))]
    assert mismatches == []


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def synthetic_pages() -> list[tuple[str, Image.Image]]:
    rng = np.random.default_rng(7)
    pages = [("blank white", Image.new("RGB", (60, 80), (255, 255, 255))),
             ("blank grey", Image.new("RGB", (60, 80), (128, 128, 128)))]
    dot = np.full((80, 60, 3), 255, np.uint8)
    dot[79, 59] = 0
    pages.append(("one dark pixel in the corner", Image.fromarray(dot)))
    ramp = np.tile(np.linspace(0, 255, 60).astype(np.uint8)[None, :, None], (80, 1, 3))
    pages.append(("horizontal ramp", Image.fromarray(ramp)))
    for lo, hi in ((0, 255), (199, 200), (150, 230), (40, 41), (3, 254)):
        pix = rng.integers(lo, hi + 1, size=(90, 70, 3), dtype=np.uint8)
        # a light page with scattered ink, so the box is strictly inside the page
        page = np.full_like(pix, hi)
        mask = rng.random((90, 70)) < 0.01
        page[mask] = pix[mask]
        page[0, 0], page[-1, -1] = lo, hi
        pages.append((f"noise {lo}..{hi}", Image.fromarray(pix)))
        pages.append((f"sparse ink {lo}..{hi}", Image.fromarray(page)))
    colour = rng.integers(0, 256, size=(50, 40, 3), dtype=np.uint8)
    pages.append(("colour noise", Image.fromarray(colour)))
    return pages


@pytest.mark.parametrize("name,img", synthetic_pages(), ids=[n for n, _ in synthetic_pages()])
def test_crop_margin_crops_like_nougat(name: str, img: Image.Image) -> None:
    assert _same(crop_margin(img), SwinEncoder.crop_margin(img))


def test_rendered_pages_give_nougats_tensors(sample_pdfs: list[Path]) -> None:
    """Every page of the sample papers, in the tiny and the real input size: bit-identical tensors."""
    ours = [EncoderInput([448, 224], True), EncoderInput([896, 672], True)]
    ref = [NougatInput([448, 224], True), NougatInput([896, 672], True)]
    pages = 0
    for path in sample_pdfs:
        doc = pypdfium2.PdfDocument(str(path))
        try:
            for page in range(1, len(doc) + 1):
                img = render_page(doc, page)
                assert _same(crop_margin(img.convert("RGB")), SwinEncoder.crop_margin(img.convert("RGB")))
                for a, b in zip(ours, ref):
                    assert torch.equal(a(img), b(img)), (path.name, page, a.input_size)
                pages += 1
        finally:
            doc.close()
    assert pages >= 6


def _loader(pdfs: list[Path], keys: list[tuple[int, int]]) -> torch.utils.data.DataLoader:
    docs = DocTable.from_entries([inspect(Source(str(p))) for p in pdfs])
    queue = [keys]
    sampler = LiveBatchSampler(lambda: queue.pop() if queue else None, batch_size=2)
    dataset = PageDataset(docs, EncoderInput([448, 224], True))
    return make_loader(dataset, sampler, num_workers=2, prefetch_factor=2, pin_memory=False)


def test_close_loader_stops_the_persistent_workers(sample_pdfs: list[Path]) -> None:
    """Left to the garbage collector, the workers can outlive the run and hang its exit."""
    loader = _loader(sample_pdfs[:1], [(0, 1), (0, 2)])
    it = iter(loader)
    assert [b.keys for b in it] == [[(0, 1), (0, 2)]]
    workers = list(it._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    close_loader(loader)
    assert not any(w.is_alive() for w in workers)
    close_loader(loader)  # a second call is harmless


def test_close_loader_kills_a_worker_hung_in_a_page(sample_pdfs: list[Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, faults.value(f"render-hang:{sample_pdfs[0].name}:1"))
    loader = _loader(sample_pdfs[:1], [(0, 1), (0, 2)])
    it = iter(loader)
    workers = list(it._workers)
    time.sleep(1)  # a worker takes the hanging page
    try:
        close_loader(loader)
        assert not any(w.is_alive() for w in workers)
    finally:
        for w in workers:  # else a failure here would hang pytest's own exit the same way
            w.kill()
