"""Tests for :mod:`testing.samples`.

Besides checking the generator itself, these tests pin the *observed*
behaviour of pypdfium2 4.30 / pypdf 7.1 / nougat's ``rasterize_paper`` on the
hostile inputs, as documented in the module docstring.  If a dependency upgrade
changes that behaviour, these tests fail and the documentation (and any
pipeline code relying on it) must be revisited.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pypdf
import pypdf.errors
import pypdfium2
import pytest

from testing import samples


def _digests(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _page_text(page: pypdfium2.PdfPage) -> str:
    # force_this=True: without arguments pypdfium2 4.30 warns and silently
    # redirects get_text_range() to get_text_bounded().
    return page.get_textpage().get_text_range(force_this=True)


def _rects(page: pypdfium2.PdfPage) -> list[tuple[float, float, float, float]]:
    """Text-line rectangles (left, bottom, right, top) in PDF points."""
    tp = page.get_textpage()
    return [tp.get_rect(i) for i in range(tp.count_rects())]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("samples")


@pytest.fixture(scope="module")
def sample_paths(sample_dir: Path) -> list[Path]:
    # Default arguments; written once per module because fpdf2's justified
    # line breaking costs ~0.1 s per page.
    return samples.write_sample_pdfs(sample_dir)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return samples.write_bad_inputs(tmp_path_factory.mktemp("bad"))


# ---------------------------------------------------------------------------
# Good samples
# ---------------------------------------------------------------------------


def test_returns_sorted_paths_matching_plan(sample_dir: Path, sample_paths: list[Path]) -> None:
    paths = sample_paths
    assert paths == sorted(paths)
    assert sorted(sample_dir.iterdir()) == paths  # nothing else written
    assert [p.name for p in paths] == [pl.filename for pl in samples.plan_samples()]
    assert all(p.parent == sample_dir for p in paths)


def test_deterministic_byte_identical(tmp_path: Path, sample_paths: list[Path]) -> None:
    again = samples.write_sample_pdfs(tmp_path / "again")
    assert _digests(again) == _digests(sample_paths)

    long_a = samples.write_long_pdf(tmp_path / "a.pdf", 7, seed=3)
    long_b = samples.write_long_pdf(tmp_path / "b.pdf", 7, seed=3)
    assert long_a.read_bytes() == long_b.read_bytes()

    bad_a = samples.write_bad_inputs(tmp_path / "bad_a")
    bad_b = samples.write_bad_inputs(tmp_path / "bad_b")
    assert _digests(list(bad_a.values())) == _digests(list(bad_b.values()))


def test_metadata_is_pinned(sample_paths: list[Path]) -> None:
    # The creation date is what would otherwise make runs differ.
    meta = pypdf.PdfReader(sample_paths[0]).metadata
    assert meta is not None
    assert meta.creation_date is not None and meta.creation_date.year == 2024
    assert meta.producer == samples.PRODUCER
    assert meta.title  # the paper title is also stored as document metadata


def test_seed_changes_content(tmp_path: Path, sample_paths: list[Path]) -> None:
    other = samples.write_sample_pdfs(tmp_path, n_docs=1, seed=1)
    assert set(_digests(other).values()).isdisjoint(_digests(sample_paths).values())
    text_0 = _page_text(pypdfium2.PdfDocument(sample_paths[0])[0])
    text_1 = _page_text(pypdfium2.PdfDocument(other[0])[0])
    assert text_0 != text_1


def test_page_counts_as_planned(sample_paths: list[Path]) -> None:
    plans = samples.plan_samples()
    counts = [len(pypdfium2.PdfDocument(p)) for p in sample_paths]
    assert counts == [pl.n_pages for pl in plans]
    assert len(set(counts)) == len(counts), "documents should differ in page count"
    assert all(2 <= c <= 6 for c in counts)


def test_plan_invariants() -> None:
    for seed in range(5):
        for pl in samples.plan_samples(12, seed=seed):
            assert len(pl.page_kinds) == pl.n_pages
            assert pl.page_kinds[0] in ("title", "title_two_column")
            assert set(pl.page_kinds) <= set(samples.PAGE_KINDS)
            assert "two_column" in pl.page_kinds[1:]
            if pl.n_pages >= 3:
                assert "table" in pl.page_kinds
    assert samples.plan_samples(0) == []
    with pytest.raises(ValueError):
        samples.plan_samples(-1)


def test_every_page_has_extractable_text(sample_paths: list[Path]) -> None:
    corpus = []
    for path in sample_paths:
        doc = pypdfium2.PdfDocument(path)
        for i in range(len(doc)):
            text = _page_text(doc[i])
            assert len(text.strip()) > 200, (path.name, i)
            corpus.append(text)
        # The title page has the abstract; the footer carries the page number.
        assert "Abstract" in _page_text(doc[0])
    joined = "\n".join(corpus)
    assert "Introduction" in joined
    assert "Table 1:" in joined
    # Symbol-font math must come out as real Unicode, not as Latin letters.
    assert any(ch in joined for ch in "∑∫√∂∇θ")


def test_two_column_layout(sample_paths: list[Path]) -> None:
    """Two-column pages have (almost) no text line crossing the page centre.

    Single-column pages have dozens of full-width lines crossing it.  The few
    crossers allowed on two-column pages are the running header and the
    centred page number.
    """
    seen_two_column = 0
    for plan, path in zip(samples.plan_samples(), sample_paths):
        doc = pypdfium2.PdfDocument(path)
        for i, kind in enumerate(plan.page_kinds):
            page = doc[i]
            mid = page.get_width() / 2
            rects = _rects(page)
            crossing = sum(1 for (l, _b, r, _t) in rects if l < mid < r)
            left = sum(1 for (_l, _b, r, _t) in rects if r < mid)
            right = sum(1 for (l, _b, _r, _t) in rects if l > mid)
            if kind == "two_column":
                seen_two_column += 1
                assert crossing <= 3, (path.name, i, crossing)
                assert left >= 20 and right >= 20, (path.name, i, left, right)
            elif kind in ("single", "table", "title"):
                assert crossing >= 20, (path.name, i, kind, crossing)
    assert seen_two_column >= 1


def test_text_stays_inside_margins_and_pages_are_numbered(sample_paths: list[Path]) -> None:
    """Nothing overflows the 20 mm margins (auto page break is off, so an
    overflow would be silent) and each page prints its number in the footer."""
    margin = 20 * 72 / 25.4  # points
    for path in sample_paths:
        doc = pypdfium2.PdfDocument(path)
        for i in range(len(doc)):
            page = doc[i]
            tp = page.get_textpage()
            footer = []
            for left, bottom, right, top in _rects(page):
                text = tp.get_text_bounded(left, bottom, right, top).strip()
                assert left >= margin - 1 and right <= page.get_width() - margin + 1, text
                if bottom < margin - 1:
                    footer.append(text)
            assert footer == [str(i + 1)], (path.name, i, footer)


def test_n_docs_zero_writes_nothing(tmp_path: Path) -> None:
    assert samples.write_sample_pdfs(tmp_path, n_docs=0) == []
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# Long document
# ---------------------------------------------------------------------------


def test_long_pdf_pages(tmp_path: Path) -> None:
    path = samples.write_long_pdf(tmp_path / "sub" / "long.pdf", 50)
    assert path == tmp_path / "sub" / "long.pdf"
    doc = pypdfium2.PdfDocument(path)
    assert len(doc) == 50
    texts = [_page_text(doc[i]) for i in (0, 24, 49)]
    for k, text in zip((1, 25, 50), texts):
        assert f"Page {k} of 50" in text
    assert len(set(texts)) == 3


def test_long_pdf_rejects_zero_pages(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        samples.write_long_pdf(tmp_path / "x.pdf", 0)


# ---------------------------------------------------------------------------
# Hostile inputs: pypdfium2
# ---------------------------------------------------------------------------


def test_bad_inputs_written(bad: dict[str, Path]) -> None:
    assert tuple(bad) == samples.BAD_INPUT_KINDS
    assert all(p.name == f"{k}.pdf" and p.is_file() for k, p in bad.items())
    assert bad["zero_byte"].stat().st_size == 0
    assert bad["not_a_pdf"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert bad["truncated"].read_bytes().startswith(b"%PDF-")
    assert b"/Encrypt" in bad["encrypted"].read_bytes()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("zero_byte", "Data format error"),
        ("not_a_pdf", "Data format error"),
        ("truncated", "Data format error"),
        ("encrypted", "Incorrect password error"),
    ],
)
def test_pdfium_rejects_bad_input(bad: dict[str, Path], kind: str, reason: str) -> None:
    with pytest.raises(pypdfium2.PdfiumError) as info:
        pypdfium2.PdfDocument(bad[kind])
    assert str(info.value) == f"Failed to load document (PDFium: {reason})."
    assert isinstance(info.value, RuntimeError)


def test_pdfium_encrypted_opens_with_password(bad: dict[str, Path]) -> None:
    for pw in (samples.ENCRYPTED_USER_PASSWORD, samples.ENCRYPTED_OWNER_PASSWORD):
        doc = pypdfium2.PdfDocument(bad["encrypted"], password=pw)
        assert len(doc) == 2
        assert "Secret page 1" in _page_text(doc[0])


def test_pdfium_zero_pages_raises_with_stale_message(
    bad: dict[str, Path], sample_paths: list[Path]
) -> None:
    """pypdfium2 rejects 0-page PDFs itself and reports a leftover error code.

    Run in a fresh interpreter: the message depends on which loads failed
    earlier in the process, and other tests have already failed some here.
    """
    script = textwrap.dedent(
        """
        import sys, pypdfium2
        def attempt(path):
            try:
                return "ok len=%d" % len(pypdfium2.PdfDocument(path))
            except pypdfium2.PdfiumError as exc:
                return str(exc)
        for path in sys.argv[1:]:
            print(attempt(path))
        """
    )
    zero, enc, good = str(bad["zero_pages"]), str(bad["encrypted"]), str(sample_paths[0])
    run = subprocess.run(
        [sys.executable, "-c", script, zero, enc, good, zero],
        capture_output=True, text=True, check=True, timeout=60,
    )
    fail = "Failed to load document (PDFium: {}).".format
    assert run.stdout.splitlines() == [
        fail("Success"),  # nothing failed yet in this process
        fail("Incorrect password error"),
        f"ok len={len(samples.plan_samples()[0].page_kinds)}",
        # A successful load in between does not reset the leftover code, so the
        # unencrypted zero-page file claims a password error.
        fail("Incorrect password error"),
    ]


def test_truncation_is_all_or_nothing() -> None:
    rows = samples.describe_truncation((0.1, samples.TRUNCATE_FRACTION, 0.9, 0.99, 0.995, 1.0))
    outcome = {frac: text for frac, _n, text in rows}
    for frac in (0.1, samples.TRUNCATE_FRACTION, 0.9, 0.99):
        assert outcome[frac] == "error: Failed to load document (PDFium: Data format error)."
    # Only "startxref ... %%EOF" missing: PDFium recovers every page.
    assert outcome[0.995] == "pages=6 rendered=6"
    assert outcome[1.0] == "pages=6 rendered=6"


# ---------------------------------------------------------------------------
# Hostile inputs: pypdf
# ---------------------------------------------------------------------------


def test_pypdf_on_bad_inputs(bad: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(pypdf.errors.EmptyFileError, match="Cannot read an empty file"):
        pypdf.PdfReader(bad["zero_byte"])
    for kind in ("not_a_pdf", "truncated"):
        with caplog.at_level(logging.WARNING, logger="pypdf"):
            with pytest.raises(pypdf.errors.PdfStreamError, match="Stream has ended unexpectedly"):
                pypdf.PdfReader(bad[kind])

    reader = pypdf.PdfReader(bad["encrypted"])
    assert reader.is_encrypted
    with pytest.raises(pypdf.errors.FileNotDecryptedError):
        len(reader.pages)
    assert reader.decrypt(samples.ENCRYPTED_USER_PASSWORD)
    assert len(reader.pages) == 2

    assert len(pypdf.PdfReader(bad["zero_pages"]).pages) == 0


# ---------------------------------------------------------------------------
# nougat's rasterizer
# ---------------------------------------------------------------------------


def _nougat_rasterize() -> ModuleType:
    """nougat's ``dataset/rasterize.py``, without importing the ``nougat`` package.

    ``import nougat.dataset.rasterize`` runs ``nougat/__init__.py``, which
    imports torch and transformers (~5 s).  The rasterizer itself only needs
    pypdfium2, so load that one file directly -- it is the exact code the
    pipeline runs.
    """
    loaded = sys.modules.get("nougat.dataset.rasterize")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("nougat")  # does not execute the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("nougat-ocr is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "dataset" / "rasterize.py"
    file_spec = importlib.util.spec_from_file_location("_nougat_rasterize_for_tests", path)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    file_spec.loader.exec_module(module)
    return module


# rasterize_paper uses PdfDocument.render(), deprecated in pypdfium2 4.19+.
@pytest.mark.filterwarnings("ignore:The document-level pdf.render:DeprecationWarning")
def test_rasterize_paper_matches_pdfium_and_swallows_errors(
    bad: dict[str, Path], sample_paths: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """rasterize_paper == per-page pypdfium2 rendering; [] for every bad input."""
    np = pytest.importorskip("numpy")
    Image = pytest.importorskip("PIL.Image")
    rasterize = _nougat_rasterize()

    path = min(sample_paths, key=lambda p: p.stat().st_size)  # fastest one
    pages = rasterize.rasterize_paper(path, return_pil=True)
    doc = pypdfium2.PdfDocument(path)
    assert len(pages) == len(doc)
    for i, bmp in enumerate(pages):
        assert isinstance(bmp, io.BytesIO)
        theirs = np.asarray(Image.open(bmp).convert("RGB"))
        ours = np.asarray(doc[i].render(scale=96 / 72).to_pil().convert("RGB"))
        assert theirs.shape == ours.shape == (1123, 794, 3)  # A4 at 96 dpi
        assert (theirs == ours).all()

    with caplog.at_level(logging.ERROR):
        for kind, bad_path in bad.items():
            assert rasterize.rasterize_paper(bad_path, return_pil=True) == [], kind
    assert sum("Failed to load document" in r.getMessage() for r in caplog.records) == 5


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def test_cli_writes_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = samples.main([str(tmp_path), "--n-docs", "2", "--seed", "4", "--bad", "--long", "3"])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    expected = [str(p) for p in sorted(tmp_path.glob("sample_*.pdf"))]
    expected += [str(tmp_path / "bad" / f"{k}.pdf") for k in samples.BAD_INPUT_KINDS]
    expected.append(str(tmp_path / "long" / "long_3.pdf"))
    assert printed == expected
    assert len(pypdfium2.PdfDocument(tmp_path / "long" / "long_3.pdf")) == 3


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        samples.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("OUT_DIR", "--n-docs", "--seed", "--bad", "--long"):
        assert flag in out
