"""Deterministic sample PDFs for the demo and the test-suite.

Three families of inputs are produced:

* :func:`write_sample_pdfs` -- a few realistic, multi-page "academic paper" PDFs
  (title block, abstract, numbered sections, justified body text, displayed
  equations, a two-column page, a bordered results table, running header and
  page numbers).  They exist so that the Nougat pipeline sees something that
  looks like its training distribution (arXiv papers) without shipping binary
  fixtures in the repository.
* :func:`write_long_pdf` -- one long, cheap PDF (hundreds of pages) used to
  exercise batching/sharding and progress reporting.
* :func:`write_bad_inputs` -- hostile files (empty, not a PDF, truncated,
  password protected, zero pages) used to check that the pipeline degrades
  gracefully instead of crashing.

Everything is byte-for-byte deterministic for given arguments: all randomness
comes from :class:`random.Random` instances seeded with *strings* (string seeds
are hashed with SHA-512 by CPython, so they do not depend on ``PYTHONHASHSEED``),
and every piece of metadata that fpdf2 would otherwise take from the clock or
from its own version number is pinned.

Behaviour of the bad inputs, verified with pypdfium2 4.30.0 (PDFium 6462),
pypdf 7.1.0 and nougat-ocr 0.1.17 (``tests/test_samples.py`` asserts the
pypdfium2 and pypdf parts):

* ``zero_byte``
    - ``pypdfium2.PdfDocument(path)``: PdfiumError
      "Failed to load document (PDFium: Data format error)."
    - ``pypdf.PdfReader(path)``: EmptyFileError "Cannot read an empty file"
* ``not_a_pdf``
    - pypdfium2: PdfiumError "... (PDFium: Data format error)."
    - pypdf: logs "invalid pdf header", raises PdfStreamError
      "Stream has ended unexpectedly"
* ``truncated``
    - pypdfium2: PdfiumError "... (PDFium: Data format error)."
    - pypdf: PdfStreamError "Stream has ended unexpectedly"
* ``encrypted``
    - pypdfium2: PdfiumError "... (PDFium: Incorrect password error)."; opens
      with ``password=`` set to either the user or the owner password.
    - pypdf: opens, ``is_encrypted`` is True, ``len(reader.pages)`` raises
      FileNotDecryptedError "File has not been decrypted" until
      ``reader.decrypt(user_pw)`` (RC4 needs no ``cryptography`` package).
* ``zero_pages``
    - pypdfium2: PdfiumError "Failed to load document (PDFium: <stale>)." --
      *not* ``len(doc) == 0``, see below.
    - pypdf: opens, ``len(reader.pages) == 0``.

All pypdf exceptions above are subclasses of ``pypdf.errors.PdfReadError``;
``PdfiumError`` is a ``RuntimeError``.

``zero_pages``: pypdfium2 never returns a document with ``len(doc) == 0`` from a
file.  ``pypdfium2._helpers.document._open_pdf`` treats ``FPDF_GetPageCount() < 1``
as a load failure and formats ``FPDF_GetLastError()`` into the message -- but
PDFium parsed the file fine and set no error, and successful loads do not
reset the code either, so the message shows the error of the most recent
*failed* load in the process ("Success" if none failed yet): after a failed
open of the encrypted file, the zero-page file reports "Incorrect password
error" -- even if good files were opened in between.  Callers must not use the
text in parentheses to classify zero-page files (pypdf can: it reports 0
pages).

``nougat.dataset.rasterize.rasterize_paper(path, return_pil=True)`` catches
*every* exception, reports it with ``logging.error`` on the root logger and
returns what it rendered so far; since every kind fails in ``PdfDocument()``
(before any page is rendered) it returns ``[]`` for all five.  A caller cannot
tell "broken file" from "password protected" from "valid but empty" by the
return value.  For good files its pages are the same pixels as rendering each
page with ``pypdfium2.PdfDocument(p)[i].render(scale=96/72).to_pil()``
(it uses the deprecated ``PdfDocument.render``, which in 4.30 is just that loop,
and saves BMP bytes).

Truncation: fpdf2 writes the catalog and page tree *first*, then the page
content streams and fonts, then the xref table and the trailer.  PDFium 6462
can rebuild a damaged xref by scanning for objects, but it still needs the
trailer dictionary: every cut that loses any byte up to the trailer's closing
``>>`` fails with "Data format error" (0 %..~99.5 % of these files, including
the 40 % used here), and every longer cut (only ``startxref``/``%%EOF`` lost)
opens and renders *all* pages.  PDFium never opens a truncated fpdf2 file with
a subset of its pages -- it is all or nothing.  pypdf is stricter still: its
constructor raises PdfStreamError unless the file is complete up to the start
of the final ``%%EOF`` marker.  :func:`describe_truncation` reports the PDFium behaviour for
arbitrary cut points.
"""

from __future__ import annotations

import argparse
import io
import random
import struct
import sys
import zlib
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

if TYPE_CHECKING:  # pragma: no cover - only for type checkers
    from fpdf import FPDF

__all__ = [
    "BAD_INPUT_KINDS",
    "FIXED_DATE",
    "PRODUCER",
    "ENCRYPTED_USER_PASSWORD",
    "ENCRYPTED_OWNER_PASSWORD",
    "PAGE_KINDS",
    "PageKind",
    "SamplePlan",
    "TRUNCATE_FRACTION",
    "describe_truncation",
    "plan_samples",
    "write_bad_inputs",
    "write_long_pdf",
    "write_sample_pdfs",
    "main",
]

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

#: Every PDF gets this creation date.  fpdf2 defaults to ``datetime.now()``,
#: which is written into /Info *and* hashed into the trailer /ID, so leaving it
#: alone would make every run produce different bytes.  It must be timezone
#: aware: fpdf2 calls ``astimezone()`` on naive datetimes, i.e. it would pick up
#: the machine's local timezone.
FIXED_DATE = datetime(2024, 1, 1, 0, 0, 0, tzinfo=timezone.utc)

#: Pinned producer/creator strings.  fpdf2's default producer contains its own
#: version ("PyFPDF/fpdf2.8.9"), which would change the bytes on an upgrade.
PRODUCER = "nougat-dist samples"
CREATOR = "testing.samples"

#: Passwords of the ``encrypted`` bad input.  The user password is what a
#: reader would need to open it; pipelines are expected *not* to know it.
ENCRYPTED_USER_PASSWORD = "user-secret"
ENCRYPTED_OWNER_PASSWORD = "owner-secret"

#: Fraction of the bytes kept for the ``truncated`` bad input.
TRUNCATE_FRACTION = 0.40

#: Keys of :func:`write_bad_inputs`, in a stable order.
BAD_INPUT_KINDS: tuple[str, ...] = (
    "zero_byte",
    "not_a_pdf",
    "truncated",
    "encrypted",
    "zero_pages",
)

# Page kinds of the sample papers (see :class:`SamplePlan`).
PageKind = str
PAGE_KINDS: tuple[PageKind, ...] = ("title", "title_two_column", "single", "two_column", "table")

# Page geometry, in millimetres (fpdf2's default unit), A4 portrait.
_PAGE_W = 210.0
_PAGE_H = 297.0
_MARGIN = 20.0
_TOP = 22.0  # leaves room for the running header on pages > 1
_BOTTOM = _PAGE_H - 20.0  # below this only the page number is printed
_GUTTER = 8.0
_TEXT_W = _PAGE_W - 2 * _MARGIN
_COL_W = (_TEXT_W - _GUTTER) / 2

# Typography.  10 pt body text on a 4.6 mm leading is close to the classic
# LaTeX article look that Nougat was trained on.
_BODY_PT = 10
_LINE_H = 4.6
_PARA_GAP = 2.2
_HEAD_PT = 12
_SUBHEAD_PT = 10.5
_EQ_PT = 10
_EQ_H = 9.0

# Candidate page counts of the sample papers.  They are dealt out without
# repetition (until exhausted) so that different documents get different
# page counts.
_PAGE_COUNTS = (2, 3, 4, 5, 6)


# ---------------------------------------------------------------------------
# Planning (pure, no fpdf2 needed)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplePlan:
    """What :func:`write_sample_pdfs` will put into one document.

    Attributes:
        filename: base name of the PDF inside the output directory.
        n_pages: exact number of pages (the layout never overflows).
        page_kinds: one entry of :data:`PAGE_KINDS` per page.  ``"title"`` and
            ``"title_two_column"`` only appear on page 0; the latter has its
            body (below the full-width title block) set in two columns.
    """

    filename: str
    n_pages: int
    page_kinds: tuple[PageKind, ...]

    @property
    def two_column_pages(self) -> tuple[int, ...]:
        """Indices of the pages whose body text is set in two columns."""
        return tuple(i for i, k in enumerate(self.page_kinds) if "two_column" in k)


def _doc_rng(seed: int, doc_index: int, purpose: str) -> random.Random:
    """Independent, reproducible random stream for one document and purpose.

    Separate streams for the plan and for the text mean that changing how text
    is generated never changes the page counts, which the tests rely on.
    """
    return random.Random(f"nougat-dist/samples/{purpose}/{seed}/{doc_index}")


def plan_samples(n_docs: int = 3, *, seed: int = 0) -> list[SamplePlan]:
    """Return the layout plan used by :func:`write_sample_pdfs`.

    Pure function (does not need fpdf2), exposed so that tests and the demo can
    know page counts and two-column pages without parsing PDFs.

    Every document with at least two pages has at least one two-column page;
    every document with at least three pages has a table page.
    """
    if n_docs < 0:
        raise ValueError(f"n_docs must be >= 0, got {n_docs}")
    width = max(3, len(str(max(n_docs - 1, 0))))
    counts: list[int] = []
    deal_rng = random.Random(f"nougat-dist/samples/page-counts/{seed}")
    plans: list[SamplePlan] = []
    for i in range(n_docs):
        if not counts:  # shuffle a fresh "deck" of page counts when exhausted
            counts = list(_PAGE_COUNTS)
            deal_rng.shuffle(counts)
        n_pages = counts.pop()
        rng = _doc_rng(seed, i, "plan")
        first: PageKind = "title_two_column" if rng.random() < 0.3 else "title"
        rest: list[PageKind] = []
        if n_pages >= 2:
            rest.append("two_column")
        if n_pages >= 3:
            rest.append("table")
        while len(rest) < n_pages - 1:
            rest.append(rng.choice(("single", "single", "two_column", "table")))
        rng.shuffle(rest)
        plans.append(
            SamplePlan(
                filename=f"sample_{i:0{width}d}.pdf",
                n_pages=n_pages,
                page_kinds=(first, *rest),
            )
        )
    return plans


# ---------------------------------------------------------------------------
# Text generation
# ---------------------------------------------------------------------------

_ADJ = (
    "scalable", "robust", "efficient", "sparse", "hierarchical", "adaptive",
    "self-supervised", "probabilistic", "contrastive", "lightweight", "multimodal",
    "end-to-end", "structured", "non-parametric", "equivariant", "latent",
)
_NOUN = (
    "transformer", "encoder", "representation", "estimator", "retrieval model",
    "attention mechanism", "decoder", "kernel", "graph network", "tokenizer",
    "diffusion process", "objective", "sampler", "memory module", "regularizer",
)
_TASK = (
    "document understanding", "optical character recognition", "table extraction",
    "mathematical formula recognition", "layout analysis", "scientific text parsing",
    "handwriting recognition", "citation linking", "figure captioning",
    "question answering over papers", "equation retrieval", "reading order detection",
)
_DOMAIN = (
    "scanned journals", "arXiv preprints", "historical newspapers", "patent filings",
    "lecture notes", "technical reports", "physics papers", "medical records",
)
_METHOD = (
    "Masked Pretraining", "Cross-Attention Distillation", "Curriculum Learning",
    "Optimal Transport", "Beam Search Decoding", "Low-Rank Adaptation",
    "Variational Inference", "Contrastive Alignment", "Sliding-Window Attention",
)
_PROPERTY = ("robustness", "sample complexity", "calibration", "generalization", "stability")
_FIRST = (
    "Alice", "Bruno", "Chen", "Dalia", "Elif", "Farid", "Greta", "Hiro", "Ines",
    "Jonas", "Kavya", "Luca", "Mei", "Nadia", "Omar", "Priya", "Rafael", "Sofia",
)
_LAST = (
    "Andersen", "Baptiste", "Castillo", "Dubois", "Eriksen", "Fischer", "Gupta",
    "Hoffmann", "Ivanova", "Jensen", "Kowalski", "Lindqvist", "Moreau", "Nakamura",
    "Okafor", "Petrov", "Rossi", "Schmidt", "Tanaka", "Varga", "Weber", "Zhou",
)
_AFFIL = (
    "Department of Computer Science, University of Example",
    "Institute for Document Intelligence, Sample Technical University",
    "School of Informatics, Placeholder Institute of Technology",
    "Research Lab for Machine Reading, Fictional University",
)
_DATASET = ("arXiv-OCR", "PubLayNet-S", "DocBank-M", "SciTab", "FormulaNet", "ReadOrder-10k")
_SECTIONS = (
    "Related Work", "Background", "Method", "Training Objective", "Experimental Setup",
    "Results", "Ablation Study", "Discussion", "Limitations", "Conclusion",
)
_SUBSECTIONS = (
    "Model Architecture", "Data Collection", "Preprocessing", "Implementation Details",
    "Evaluation Metrics", "Baselines", "Error Analysis", "Complexity",
)

# Sentence templates.  Slots are filled from the banks above; the numbers make
# every paragraph different even when templates repeat.
_SENTENCES = (
    "We propose a {adj} {noun} for {task} that operates directly on page images.",
    "Prior approaches to {task} rely on hand-crafted pipelines that break on {domain}.",
    "Our {noun} reduces the error rate by {pct}% relative to the strongest baseline.",
    "In contrast to earlier work, the {noun} is trained without any manual annotation.",
    "We evaluate on {dataset}, which contains {count} pages drawn from {domain}.",
    "The {adj} variant converges after {count} steps with a batch size of {small}.",
    "Table {table} summarizes the results, and the equations below define the loss.",
    "This observation suggests that {task} benefits from a {adj} {noun}.",
    "A detailed analysis shows that most remaining errors occur in dense {domain}.",
    "We further combine the {noun} with {method} to improve {prop}.",
    "All models are trained for {small} epochs on {gpus} GPUs using mixed precision.",
    "The learning rate follows a cosine schedule with a peak value of {lr}.",
    "Compared with {method}, our approach is {factor} times faster at inference time.",
    "We release the code and the {dataset} splits to facilitate future research.",
    "Section {sec} describes the {noun} in detail, and Section {sec2} reports experiments.",
    "Empirically, the {prop} of the {noun} improves monotonically with model size.",
    "Formally, let x denote a page image and y the corresponding markup sequence.",
    "The decoder predicts y token by token, conditioned on the encoded image features.",
    "We observe that {method} alone is insufficient for {task} on {domain}.",
    "Finally, we discuss the {prop} of the method and outline directions for future work.",
)


class _TextGen:
    """Generates plausible academic prose from one seeded RNG."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def _fill(self, template: str) -> str:
        r = self.rng
        return template.format(
            adj=r.choice(_ADJ),
            noun=r.choice(_NOUN),
            task=r.choice(_TASK),
            domain=r.choice(_DOMAIN),
            dataset=r.choice(_DATASET),
            method=r.choice(_METHOD),
            prop=r.choice(_PROPERTY),
            pct=f"{r.uniform(3, 45):.1f}",
            count=f"{r.randrange(1_000, 900_000):,}",
            small=r.choice((8, 16, 32, 64, 128)),
            gpus=r.choice((1, 4, 8, 16, 32)),
            lr=f"{r.choice((1, 2, 3, 5))}e-{r.choice((4, 5))}",
            factor=f"{r.uniform(1.2, 9.0):.1f}",
            table=r.randrange(1, 4),
            sec=r.randrange(2, 5),
            sec2=r.randrange(4, 7),
        )

    def sentence(self) -> str:
        """One sentence."""
        return self._fill(self.rng.choice(_SENTENCES))

    def paragraph(self, lo: int = 3, hi: int = 7) -> str:
        """A paragraph of ``lo..hi`` sentences."""
        return " ".join(self.sentence() for _ in range(self.rng.randint(lo, hi)))

    def title(self) -> str:
        """A paper title."""
        r = self.rng

        def cap(text: str) -> str:
            # Not str.title(): that would give "End-To-End" and "Arxiv".
            return " ".join(w[:1].upper() + w[1:] for w in text.split())

        adj, noun, task = cap(r.choice(_ADJ)), cap(r.choice(_NOUN)), cap(r.choice(_TASK))
        method, prop, domain = r.choice(_METHOD), cap(r.choice(_PROPERTY)), cap(r.choice(_DOMAIN))
        forms = (
            f"{adj} {noun}s for {task}",
            f"Towards {adj} {task} with {method}",
            f"{method}: A {adj} Approach to {task}",
            f"On the {prop} of {method} for {domain}",
        )
        return r.choice(forms)

    def authors(self) -> list[str]:
        """2..5 distinct author names."""
        r = self.rng
        names: list[str] = []
        while len(names) < r.randint(2, 5):
            n = f"{r.choice(_FIRST)} {r.choice(_LAST)}"
            if n not in names:
                names.append(n)
        return names


# An equation is a list of (font, text) runs.  "H" is Helvetica, "S" the core
# Symbol font: core fonts only cover Latin-1, but the Symbol font's built-in
# encoding gives real Greek letters and math operators (PDFium and pypdf both
# extract them as Unicode, e.g. U+2211 for the sum sign) without embedding a TTF.
_Run = tuple[str, str]
_SYM = {
    "sum": "\xe5", "int": "\xf2", "inf": "\xa5", "sqrt": "\xd6", "pi": "p",
    "leq": "\xa3", "geq": "\xb3", "neq": "\xb9", "pm": "\xb1", "nabla": "\xd1",
    "partial": "\xb6", "alpha": "a", "beta": "b", "theta": "q", "eta": "h",
    "lambda": "l", "sigma": "s", "mu": "m", "epsilon": "e", "in": "\xce",
    "approx": "\xbb", "times": "\xb4", "rarrow": "\xae",
}


def _equation(rng: random.Random) -> list[_Run]:
    """One displayed equation as a list of font runs."""
    S = _SYM
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    n = rng.choice(("n", "N", "K", "T"))
    forms: list[list[_Run]] = [
        [("H", "E = m c^2")],
        [("H", "E = m·c²,   p = m v")],
        [("S", S["sum"]), ("H", f"_{{i=1}}^{{{n}}} x_i = {n} · "), ("S", S["mu"])],
        [("H", f"sum_{{i=1}}^{{{n}}} w_i x_i + b = y")],
        [("S", S["int"]), ("H", "_0^"), ("S", S["inf"]), ("H", " exp(-x^2) dx = "),
         ("S", S["sqrt"] + S["pi"]), ("H", "/2")],
        [("H", f"integral_0^1 x^{a} dx = 1/{a + 1}")],
        [("H", "L("), ("S", S["theta"]), ("H", f") = -1/{n} "), ("S", S["sum"]),
         ("H", "_i log p(y_i | x_i; "), ("S", S["theta"]), ("H", ")")],
        [("S", S["theta"]), ("H", "_{t+1} = "), ("S", S["theta"]), ("H", "_t - "),
         ("S", S["eta"] + " " + S["nabla"]), ("H", " L("), ("S", S["theta"]), ("H", "_t)")],
        [("H", "|| W x - y ||_2^2 "), ("S", S["leq"] + " " + S["epsilon"]),
         ("H", ",   W "), ("S", S["in"]), ("H", f" R^{{{a}x{b}}}")],
        [("H", "P(A | B) = P(B | A) P(A) / P(B)")],
        [("H", f"f(x) = a_0 + a_1 x + a_2 x^2 + ... + a_{a} x^{a}")],
        [("H", "softmax(z)_j = exp(z_j) / "), ("S", S["sum"]), ("H", "_k exp(z_k)")],
        [("S", S["partial"]), ("H", "u/"), ("S", S["partial"]), ("H", "t = "),
         ("S", S["alpha"] + " " + S["nabla"]), ("H", "^2 u")],
        [("H", "Attention(Q, K, V) = softmax(Q K^T / "), ("S", S["sqrt"]), ("H", "d_k) V")],
        [("H", "x = (-b "), ("S", S["pm"]), ("H", " "), ("S", S["sqrt"]),
         ("H", "(b^2 - 4ac)) / 2a")],
    ]
    return rng.choice(forms)


# ---------------------------------------------------------------------------
# Flowing layout
# ---------------------------------------------------------------------------


@dataclass
class _Block:
    """A unit of body content consumed by :func:`_flow`."""

    kind: str  # "heading" | "subheading" | "para" | "equation"
    text: str = ""
    runs: Sequence[_Run] = ()
    number: int = 0  # equation number


class _BlockStream:
    """Infinite iterator of body blocks with push-back.

    Push-back lets a region hand the unused remainder of a paragraph (or a block
    that did not fit at all) to the next column/page, so the text reads
    continuously across pages like a real paper.
    """

    def __init__(self, gen: _TextGen) -> None:
        self._gen = gen
        self._it = self._generate()
        self._pending: deque[_Block] = deque()

    def _generate(self) -> Iterator[_Block]:
        rng = self._gen.rng
        eq_no = 0
        sections = list(_SECTIONS)
        rng.shuffle(sections)
        # "Conclusion" closes the main body; longer documents then continue
        # with appendices (the stream must never run dry).
        names = [s for s in sections if s != "Conclusion"][:6] + ["Conclusion"]
        sec = 1  # "1 Introduction" is emitted by the title page
        yield _Block("heading", "1 Introduction")
        appendix = 0
        while True:
            sub_no = 0
            for p in range(rng.randint(2, 4)):
                yield _Block("para", self._gen.paragraph())
                if rng.random() < 0.4:
                    eq_no += 1
                    yield _Block("equation", runs=_equation(rng), number=eq_no)
                if p < 2 and rng.random() < 0.3:
                    sub_no += 1
                    yield _Block("subheading", f"{sec}.{sub_no} {rng.choice(_SUBSECTIONS)}")
            sec += 1
            if names:
                yield _Block("heading", f"{sec} {names.pop(0)}")
            else:  # ran out of sections: long documents continue with appendices
                yield _Block("heading", f"Appendix {chr(ord('A') + appendix % 26)}: "
                                        f"Additional {rng.choice(_NOUN).title()} Results")
                appendix += 1

    def next(self) -> _Block:
        """Next block (pushed-back blocks first)."""
        return self._pending.popleft() if self._pending else next(self._it)

    def push_back(self, block: _Block) -> None:
        """Return a block so that the next :meth:`next` yields it again."""
        self._pending.appendleft(block)


def _set_body_font(pdf: FPDF) -> None:
    pdf.set_font("Helvetica", "", _BODY_PT)


def _equation_width(pdf: FPDF, runs: Sequence[_Run], size: float) -> float:
    total = 0.0
    for font, text in runs:
        pdf.set_font("Symbol" if font == "S" else "Helvetica", "", size)
        total += pdf.get_string_width(text)
    return total


def _draw_equation(pdf: FPDF, x: float, y: float, w: float, block: _Block) -> None:
    """Centre the runs in ``[x, x+w]`` and right-align the equation number."""
    number = f"({block.number})"
    _set_body_font(pdf)
    num_w = pdf.get_string_width(number) + 5  # keeps a visible gap to the formula
    avail = w - 2 * num_w
    size = float(_EQ_PT)
    # Narrow columns: shrink the formula rather than overflow into the gutter.
    while size > 6 and _equation_width(pdf, block.runs, size) > avail:
        size -= 0.5
    eq_w = _equation_width(pdf, block.runs, size)
    cx = x + (w - eq_w) / 2
    baseline_y = y + (_EQ_H - _LINE_H) / 2
    # Runs are butted together; the default 1 mm cell padding would open gaps
    # between them (e.g. between the sum sign and its subscript).
    saved_margin, pdf.c_margin = pdf.c_margin, 0.0
    for font, text in block.runs:
        pdf.set_font("Symbol" if font == "S" else "Helvetica", "", size)
        tw = pdf.get_string_width(text)
        pdf.set_xy(cx, baseline_y)
        pdf.cell(tw, _LINE_H, text)
        cx += tw
    pdf.c_margin = saved_margin
    _set_body_font(pdf)
    pdf.set_xy(x + w - num_w, baseline_y)
    pdf.cell(num_w, _LINE_H, number, align="R")


def _flow(pdf: FPDF, stream: _BlockStream, x: float, y: float, w: float, bottom: float) -> float:
    """Fill the region ``[x, x+w] x [y, bottom]`` with blocks; return the final y.

    Never draws below ``bottom`` (auto page breaks are disabled), which is what
    makes the page count of every document exact.
    """
    while True:
        avail = bottom - y
        if avail < _LINE_H:
            return y
        block = stream.next()
        if block.kind in ("heading", "subheading"):
            size = _HEAD_PT if block.kind == "heading" else _SUBHEAD_PT
            pdf.set_font("Helvetica", "B", size)
            head_lines = pdf.multi_cell(w, 5.5, block.text, align="L", dry_run=True, output="LINES")
            need = 2.0 + 5.5 * len(head_lines) + 1.5 + 2 * _LINE_H  # keep with 2 body lines
            if avail < need:
                stream.push_back(block)
                return y
            pdf.set_xy(x, y + 2.0)
            pdf.multi_cell(w, 5.5, block.text, align="L")
            y = pdf.get_y() + 1.5
        elif block.kind == "equation":
            if avail < _EQ_H:
                stream.push_back(block)
                return y
            _draw_equation(pdf, x, y, w, block)
            y += _EQ_H
        else:
            _set_body_font(pdf)
            fit = int(avail // _LINE_H)
            if fit <= 0:
                stream.push_back(block)
                return y
            # fpdf2's line breaker is slow (it re-measures the growing line for
            # every character), so only ask it for the exact lines when our
            # cheap estimate says the paragraph might not fit.  One line of
            # slack absorbs any difference between the two greedy wrappers.
            remainder = ""
            if _estimate_lines(pdf, block.text, w) + 1 <= fit:
                text = block.text
            else:
                lines = [ln.strip() for ln in
                         pdf.multi_cell(w, _LINE_H, block.text, dry_run=True, output="LINES")]
                text = block.text
                if len(lines) > fit:
                    # Print what fits, continue the sentence in the next region.
                    text = " ".join(lines[:fit])
                    remainder = " ".join(lines[fit:])
            pdf.set_xy(x, y)
            pdf.multi_cell(w, _LINE_H, text, align="J")
            y = pdf.get_y() + _PARA_GAP
            if remainder:
                stream.push_back(_Block("para", remainder))
                return y


def _estimate_lines(pdf: FPDF, text: str, w: float) -> int:
    """Greedy word-wrap line count with the current font (a close estimate)."""
    avail = w - 2 * pdf.c_margin  # multi_cell keeps c_margin free on both sides
    space = pdf.get_string_width(" ")
    lines, line_w = 1, 0.0
    for word in text.split():
        ww = pdf.get_string_width(word)
        if line_w and line_w + space + ww > avail:
            lines += 1
            line_w = ww
        else:
            line_w = line_w + space + ww if line_w else ww
    return lines


def _draw_table(pdf: FPDF, rng: random.Random, x: float, y: float, w: float, number: int) -> float:
    """A bordered results table with caption; returns the y below it."""
    datasets = rng.sample(_DATASET, 2)
    methods = ["Baseline", rng.choice(_METHOD), "Ours (small)", "Ours (base)", "Ours (large)"]
    n_rows = rng.randint(3, len(methods))
    header = ["Method", f"{datasets[0]} Acc.", f"{datasets[1]} Acc.", "F1", "Time (s)"]
    widths = [w * f for f in (0.34, 0.19, 0.19, 0.13, 0.15)]
    row_h = 6.0

    pdf.set_font("Helvetica", "B", 9)
    pdf.set_xy(x, y)
    caption = (f"Table {number}: Comparison on {datasets[0]} and {datasets[1]}. "
               f"Accuracy in %, time per page on one GPU.")
    pdf.multi_cell(w, 4.4, caption, align="C")
    y = pdf.get_y() + 1.5

    pdf.set_xy(x, y)
    for text, cw in zip(header, widths):
        pdf.cell(cw, row_h, text, border=1, align="C")
    y += row_h
    pdf.set_font("Helvetica", "", 9)
    acc = rng.uniform(60, 75)
    for r in range(n_rows):
        acc += rng.uniform(0.5, 6.0)  # later rows are better, as in real tables
        cells = [
            methods[r],
            f"{min(acc, 99.4):.1f}",
            f"{min(acc - rng.uniform(1, 8), 99.0):.1f}",
            f"{rng.uniform(0.55, 0.95):.3f}",
            f"{rng.uniform(0.05, 2.5):.2f}",
        ]
        pdf.set_xy(x, y)
        for i, (text, cw) in enumerate(zip(cells, widths)):
            pdf.cell(cw, row_h, text, border=1, align="L" if i == 0 else "R")
        y += row_h
    _set_body_font(pdf)
    return y + 4.0


def _new_fpdf(title: str = "", author: str = "", header: str = "") -> "FPDF":
    """An FPDF with pinned metadata, no auto page break and a page-number footer."""
    try:
        from fpdf import FPDF
    except ImportError as exc:  # fpdf2 is a dev/test dependency only
        raise ImportError(
            "testing.samples needs fpdf2 (pip install -r requirements-dev.txt)"
        ) from exc

    class _PaperPDF(FPDF):
        """Draws running header (pages > 1) and centred page number."""

        def header(self) -> None:
            if header and self.page_no() > 1:
                self.set_font("Helvetica", "I", 8)
                self.set_xy(_MARGIN, 10)
                self.cell(_TEXT_W * 0.75, 4, header[:90])
                self.cell(_TEXT_W * 0.25, 4, "Preprint", align="R")
                self.line(_MARGIN, 15, _PAGE_W - _MARGIN, 15)

        def footer(self) -> None:
            self.set_font("Helvetica", "", 9)
            self.set_xy(_MARGIN, _PAGE_H - 13)
            self.cell(_TEXT_W, 5, str(self.page_no()), align="C")

    pdf = _PaperPDF(orientation="P", unit="mm", format="A4")
    # Deterministic bytes: fixed date (also feeds the trailer /ID hash) and a
    # producer string that does not embed the fpdf2 version.
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_producer(PRODUCER)
    pdf.set_creator(CREATOR)
    if title:
        pdf.set_title(title)
    if author:
        pdf.set_author(author)
    # We place every block ourselves and guarantee it fits; an automatic page
    # break would silently change the page count.
    pdf.set_auto_page_break(False)
    pdf.set_margins(_MARGIN, _TOP, _MARGIN)
    return pdf


def _title_block(pdf: FPDF, gen: _TextGen, title: str, authors: list[str]) -> float:
    """Title, authors, affiliations and abstract; returns the y below them."""
    rng = gen.rng

    def centred(text: str, size: float, style: str = "", h: float = 4.5) -> None:
        pdf.set_font("Helvetica", style, size)
        # new_x/new_y: fpdf2's multi_cell leaves x at the right edge by default.
        pdf.multi_cell(_TEXT_W, h, text, align="C", new_x="LMARGIN", new_y="NEXT")

    pdf.set_xy(_MARGIN, 24)
    centred(title, 16, "B", 7.5)
    pdf.ln(3)
    # Latin-1 superscript digits exist in the core fonts, so affiliation marks
    # look like the real thing and still extract as text.
    marks = [rng.choice("¹²") for _ in authors]
    centred(",  ".join(f"{a}{m}" for a, m in zip(authors, marks)), 11, h=5.5)
    pdf.ln(1)
    for mark, aff in zip("¹²", rng.sample(_AFFIL, 2)):
        centred(f"{mark} {aff}", 9, "I")
    first, last = authors[0].split()
    centred(f"{first.lower()}.{last.lower()}@example.org", 9, "I")
    pdf.ln(5)
    centred("Abstract", 10.5, "B", 5)
    pdf.ln(1)
    # The abstract is indented on both sides, as in the LaTeX article class.
    for text, style in ((gen.paragraph(5, 7), ""),
                        ("Keywords: " + ", ".join(rng.sample(_TASK, 3)), "B")):
        pdf.set_font("Helvetica", style, 9.5 if not style else 9)
        pdf.set_x(_MARGIN + 12)
        pdf.multi_cell(_TEXT_W - 24, 4.4, text, align="J" if not style else "L",
                       new_x="LMARGIN", new_y="NEXT")
        pdf.ln(2)
    return pdf.get_y() + 2


def _write_paper(path: Path, plan: SamplePlan, seed: int, doc_index: int) -> None:
    gen = _TextGen(_doc_rng(seed, doc_index, "text"))
    rng = gen.rng
    title = gen.title()
    authors = gen.authors()
    pdf = _new_fpdf(title=title, author=", ".join(authors), header=title)
    stream = _BlockStream(gen)
    table_no = 0
    col2_x = _MARGIN + _COL_W + _GUTTER

    for kind in plan.page_kinds:
        pdf.add_page()
        y = _TOP + 2
        if kind.startswith("title"):
            y = _title_block(pdf, gen, title, authors)
        if kind in ("two_column", "title_two_column"):
            _flow(pdf, stream, _MARGIN, y, _COL_W, _BOTTOM)
            _flow(pdf, stream, col2_x, y, _COL_W, _BOTTOM)
            # A thin rule in the gutter makes the two-column structure obvious.
            pdf.set_draw_color(170)
            pdf.line(_MARGIN + _COL_W + _GUTTER / 2, y, _MARGIN + _COL_W + _GUTTER / 2, _BOTTOM - 2)
            pdf.set_draw_color(0)
        elif kind == "table":
            # Some text, the table roughly in the upper half, text below it.
            split = y + rng.uniform(0.15, 0.4) * (_BOTTOM - y)
            y = _flow(pdf, stream, _MARGIN, y, _TEXT_W, split)
            table_no += 1
            y = _draw_table(pdf, rng, _MARGIN + 10, y + 2, _TEXT_W - 20, table_no)
            _flow(pdf, stream, _MARGIN, y, _TEXT_W, _BOTTOM)
        else:  # "title" and "single"
            _flow(pdf, stream, _MARGIN, y, _TEXT_W, _BOTTOM)
    pdf.output(str(path))


def write_sample_pdfs(out_dir: str | Path, *, n_docs: int = 3, seed: int = 0) -> list[Path]:
    """Write ``n_docs`` realistic academic-paper-like PDFs into ``out_dir``.

    Each document has a title block with abstract, numbered section headings,
    justified body paragraphs, numbered display equations (plain ASCII such as
    ``E = m c^2`` and real Unicode math such as ``∑``, ``∫``, ``√`` via the
    core Symbol font), at least one two-column page (documents with >= 2 pages)
    and a bordered table (documents with >= 3 pages), a running header and page
    numbers.  Page counts (2..6) and text differ between documents; see
    :func:`plan_samples` for the exact plan.

    Deterministic: the same arguments always produce byte-identical files
    (for a given fpdf2 version -- its serialisation may change on upgrade).

    Args:
        out_dir: directory to write into (created if needed).
        n_docs: number of documents (0 is allowed and writes nothing).
        seed: changes the text and the page-count assignment.

    Returns:
        The written paths, sorted.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, plan in enumerate(plan_samples(n_docs, seed=seed)):
        path = out / plan.filename
        _write_paper(path, plan, seed, i)
        paths.append(path)
    return sorted(paths)


# ---------------------------------------------------------------------------
# Long document
# ---------------------------------------------------------------------------


def write_long_pdf(path: str | Path, n_pages: int, *, seed: int = 0) -> Path:
    """Write one PDF with ``n_pages`` distinct pages of text.

    Every page carries a heading with its number ("Page k of N"), a handful of
    seeded sentences and the page number in the footer, so that a page can be
    identified from OCR output.  Only single-line ``cell`` calls and a core font
    are used: 500 pages take about 0.5 s (fpdf2 2.8.9; the justified paragraph
    layout of the sample papers costs ~70 ms per page, far too slow here).
    Deterministic like :func:`write_sample_pdfs`.

    Args:
        path: output file (parent directories are created).
        n_pages: number of pages, >= 1.
        seed: changes the sentences.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if n_pages < 1:
        raise ValueError(f"n_pages must be >= 1, got {n_pages}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"nougat-dist/long/{seed}")
    pdf = _new_fpdf(title=f"Long test document ({n_pages} pages)")
    for k in range(1, n_pages + 1):
        pdf.add_page()
        pdf.set_xy(_MARGIN, 30)
        pdf.set_font("Helvetica", "B", 16)
        pdf.cell(_TEXT_W, 9, f"Page {k} of {n_pages}", new_x="LMARGIN", new_y="NEXT")
        pdf.set_font("Helvetica", "", 11)
        pdf.ln(4)
        for _ in range(rng.randint(3, 6)):
            # Short, unwrapped lines: building sentences from word banks is much
            # cheaper than multi_cell line breaking, and 500 pages stay fast.
            line = (f"{rng.choice(_ADJ).capitalize()} {rng.choice(_NOUN)} for "
                    f"{rng.choice(_TASK)} ({rng.randrange(10_000)}).")
            pdf.cell(_TEXT_W, 6.5, line, new_x="LMARGIN", new_y="NEXT")
    pdf.output(str(path))
    return path


# ---------------------------------------------------------------------------
# Hostile inputs
# ---------------------------------------------------------------------------


def _tiny_png() -> bytes:
    """A valid 8x8 grey PNG, built by hand so Pillow is not needed."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    width = height = 8
    raw = b"".join(b"\x00" + bytes([(x * 32) & 0xFF for x in range(width)]) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def _source_for_truncation() -> bytes:
    """The valid multi-page PDF that the ``truncated`` input is cut from."""
    buf = io.BytesIO()
    pdf = _new_fpdf(title="Truncation source")
    for k in range(1, 7):
        pdf.add_page()
        pdf.set_font("Helvetica", "", 12)
        pdf.set_xy(_MARGIN, 30)
        pdf.multi_cell(_TEXT_W, 6, f"Truncation test page {k}. " * 40)
    pdf.output(buf)
    return buf.getvalue()


def describe_truncation(
    fractions: Sequence[float] = (0.1, 0.25, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 0.995, 1.0),
) -> list[tuple[float, int, str]]:
    """What pypdfium2 does with the truncation source cut at various fractions.

    Diagnostic helper (used by the tests and handy when upgrading pypdfium2).

    Returns:
        ``(fraction, n_bytes, outcome)`` triples where outcome is either
        ``"pages=N rendered=M"`` or ``"error: <message>"``.
    """
    import pypdfium2

    data = _source_for_truncation()
    rows: list[tuple[float, int, str]] = []
    for frac in fractions:
        cut = data[: int(len(data) * frac)]
        try:
            doc = pypdfium2.PdfDocument(cut)
        except pypdfium2.PdfiumError as exc:
            rows.append((frac, len(cut), f"error: {exc}"))
            continue
        rendered = 0
        for i in range(len(doc)):
            try:
                doc[i].render(scale=0.25)
                rendered += 1
            except Exception:  # noqa: BLE001 - diagnostic, count failures only
                pass
        rows.append((frac, len(cut), f"pages={len(doc)} rendered={rendered}"))
        doc.close()
    return rows


def _encrypted_pdf() -> bytes:
    """A 2-page PDF protected with a *user* password (RC4-128).

    fpdf2's RC4 mode is used on purpose: its key derivation only depends on the
    file /ID, which is derived from the fixed creation date, so the output is
    deterministic (fpdf2's AES modes draw random IVs/salts from os.urandom, and
    pypdf would additionally need the ``cryptography`` package for AES, which is
    not installed).
    """
    buf = io.BytesIO()
    pdf = _new_fpdf(title="Encrypted")
    pdf.set_encryption(owner_password=ENCRYPTED_OWNER_PASSWORD,
                       user_password=ENCRYPTED_USER_PASSWORD)
    for k in (1, 2):
        pdf.add_page()
        pdf.set_font("Helvetica", "", 12)
        pdf.set_xy(_MARGIN, 30)
        pdf.cell(_TEXT_W, 8, f"Secret page {k}")
    pdf.output(buf)
    return buf.getvalue()


def _zero_page_pdf() -> bytes:
    """A syntactically valid PDF whose page tree is empty (/Count 0).

    fpdf2 cannot write such a file, pypdf can; pypdf's writer output contains no
    timestamp or random /ID, so it is deterministic.
    """
    import pypdf

    buf = io.BytesIO()
    pypdf.PdfWriter().write(buf)
    return buf.getvalue()


def write_bad_inputs(out_dir: str | Path) -> dict[str, Path]:
    """Write one hostile input per kind into ``out_dir``; return ``{kind: path}``.

    Kinds (file name ``<kind>.pdf``):

    * ``zero_byte``  -- empty file.
    * ``not_a_pdf``  -- a valid 8x8 PNG image with a ``.pdf`` name.
    * ``truncated``  -- a valid 6-page PDF cut to :data:`TRUNCATE_FRACTION`
      (40 %) of its bytes; the trailer is gone, so PDFium cannot open it at
      all.  See the module docstring for other cut points.
    * ``encrypted``  -- 2 pages, RC4-128, user password
      :data:`ENCRYPTED_USER_PASSWORD`; pypdfium2 raises "Incorrect password
      error" without it.
    * ``zero_pages`` -- valid PDF with an empty page tree.  pypdf reports 0
      pages, but pypdfium2 4.30 *raises* PdfiumError (with a stale error text).

    The module docstring has the verified behaviour of pypdfium2, pypdf and
    ``nougat.dataset.rasterize.rasterize_paper`` for each kind.  Deterministic.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = _source_for_truncation()
    contents: dict[str, bytes] = {
        "zero_byte": b"",
        "not_a_pdf": _tiny_png(),
        "truncated": source[: int(len(source) * TRUNCATE_FRACTION)],
        "encrypted": _encrypted_pdf(),
        "zero_pages": _zero_page_pdf(),
    }
    paths: dict[str, Path] = {}
    for kind in BAD_INPUT_KINDS:
        path = out / f"{kind}.pdf"
        path.write_bytes(contents[kind])
        paths[kind] = path
    return paths


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m testing.samples",
        description=(
            "Write deterministic sample PDFs for the nougat-dist demo and tests.\n\n"
            "By default writes --n-docs academic-paper-like PDFs as OUT_DIR/sample_NNN.pdf:\n"
            "2-6 pages each (no two of the first five alike), with title, abstract, numbered\n"
            "sections, equations, a two-column page, a table, header and page numbers.\n"
            "--bad and --long write into subdirectories, so a non-recursive scan of\n"
            "OUT_DIR only sees the good samples. The same arguments always give\n"
            "byte-identical files. The written paths are printed, one per line."
        ),
        epilog=(
            "examples:\n"
            "  python -m testing.samples demo_pdfs\n"
            "  python -m testing.samples demo_pdfs --n-docs 5 --seed 1 --bad --long 500\n"
            "  python -m testing.samples demo_pdfs --n-docs 0 --bad   # hostile inputs only"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                        help="output directory (created if missing)")
    parser.add_argument("--n-docs", type=int, default=3, metavar="N",
                        help="number of sample papers to write (default: 3; 0 = none)")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed for text, page counts and the long PDF (default: 0)")
    parser.add_argument("--bad", action="store_true",
                        help="also write hostile inputs into OUT_DIR/bad/: zero_byte.pdf, "
                             "not_a_pdf.pdf (a PNG), truncated.pdf, encrypted.pdf "
                             f"(user password {ENCRYPTED_USER_PASSWORD!r}), zero_pages.pdf")
    parser.add_argument("--long", type=int, default=None, metavar="N",
                        help="also write one N-page PDF as OUT_DIR/long/long_N.pdf "
                             "(for batching/throughput tests)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.n_docs < 0:
        parser.error("--n-docs must be >= 0")
    if args.long is not None and args.long < 1:
        parser.error("--long must be >= 1")

    written: list[Path] = list(write_sample_pdfs(args.out_dir, n_docs=args.n_docs, seed=args.seed))
    if args.bad:
        written += list(write_bad_inputs(args.out_dir / "bad").values())
    if args.long is not None:
        written.append(write_long_pdf(args.out_dir / "long" / f"long_{args.long}.pdf",
                                      args.long, seed=args.seed))
    for p in written:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
