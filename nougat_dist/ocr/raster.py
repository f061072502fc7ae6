"""One PDF page to the model's input tensor, as nougat does it.

Rendering matches nougat's `rasterize_paper` (pypdfium2 at 96 dpi) pixel for pixel, and the tensor
comes from nougat's own `SwinEncoder.prepare_input(img, random_padding=False)`; only the margin
crop inside prepare_input is replaced by `crop_margin` below, which finds the same box three times
faster (tests/test_raster.py holds the two to the same tensors).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pypdfium2
import torch
from nougat.model import SwinEncoder
from nougat.transforms import test_transform
from PIL import Image

from nougat_dist.ocr.predict import predict_page

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
