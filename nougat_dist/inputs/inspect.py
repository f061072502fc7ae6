"""Inspect one input document for the manifest: hash it, count its pages, read its metadata.

Never raises for bad input: a document that cannot be read gets its reason in `error`, and
metadata that is odd (a date that does not parse, text that is not valid Unicode, a page tree
pypdf cannot walk) is stored as null or with its odd characters replaced; it never fails the
document. Measured on the sample PDFs: the Info dictionary and page sizes (pdfium, without
loading a page) add ~0.1 ms a document and ~0.005 ms a page; rotations come from pypdf, which
reads the page dictionaries only (~2 ms a document, ~0.05-0.2 ms a page), and only for files
that can hold a /Rotate key (pdfium would parse every page's content, ~0.5-1 ms a page).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import hashlib
import io
import logging
import re
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import pypdfium2
import pypdfium2.raw as pdfium_c

from nougat_dist import faults
from nougat_dist.inputs.sources import Source, file_stamp, is_utf8, read_bytes, shown_name

if TYPE_CHECKING:
    from nougat_dist.store.manifest import DocEntry

log = logging.getLogger(__name__)

#: Metadata keys of the PDF's Info dictionary, as the manifest's `pdf` struct names them.
INFO_KEYS = {"title": "Title", "author": "Author", "subject": "Subject", "keywords": "Keywords",
             "creator": "Creator", "producer": "Producer"}
DATE_KEYS = {"created": "CreationDate", "modified": "ModDate"}
#: A hostile PDF can carry megabytes of "title": what is stored is cut here.
MAX_TEXT = 2000
_PDF_DATE = re.compile(r"^(?:D:)?(\d{4})(\d\d)?(\d\d)?(\d\d)?(\d\d)?(\d\d)?"
                       r"(?:(Z)|([+-])(\d\d)'?(\d\d)?'?)?")


def pdf_date(raw: str) -> str | None:
    """A PDF date (`D:YYYYMMDDHHmmSSOHH'mm'`, most parts optional) as ISO 8601, with its offset
    when it has one; None when it does not parse as a real date."""
    m = _PDF_DATE.match(raw.strip())
    if not m:
        return None
    y, mo, d, h, mi, s, z, sign, oh, om = m.groups()
    try:
        tz = None
        if z:
            tz = dt.timezone.utc
        elif sign:
            delta = dt.timedelta(hours=int(oh), minutes=int(om or 0))
            tz = dt.timezone(delta if sign == "+" else -delta)
        when = dt.datetime(int(y), int(mo or 1), int(d or 1), int(h or 0), int(mi or 0),
                           int(s or 0), tzinfo=tz)
    except ValueError:  # month 13, hour 25, an offset of a day or more
        return None
    return when.isoformat().replace("+00:00", "Z")


def _text(value: str) -> str | None:
    """Metadata text as stored: None when empty, odd code points replaced, cut to MAX_TEXT."""
    value = value.replace("\x00", "")[:MAX_TEXT]
    if not is_utf8(value):
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value or None


def _meta_text(doc: pypdfium2.PdfDocument, key: str) -> str:
    """One Info entry as pdfium decodes it (UTF-16), a broken surrogate replaced instead of
    failing the whole value (pypdfium2's get_metadata_value decodes strictly)."""
    name = (key + "\x00").encode("ascii")
    n = pdfium_c.FPDF_GetMetaText(doc, name, None, 0)
    buf = ctypes.create_string_buffer(n)
    pdfium_c.FPDF_GetMetaText(doc, name, buf, n)
    return buf.raw[:max(n - 2, 0)].decode("utf-16-le", "replace")


def _info(doc: pypdfium2.PdfDocument) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, key in {**INFO_KEYS, **DATE_KEYS}.items():
        raw = _meta_text(doc, key)
        out[name] = (pdf_date(raw) if raw else None) if name in DATE_KEYS else _text(raw)
    return out


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """pypdf's warnings about a damaged file would repeat, without the file's name, what the
    document's own row says; rotations are best effort."""
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _rotations(data: bytes, n_pages: int) -> list[int] | None:
    """Each page's /Rotate (0, 90, 180, 270), or None when pypdf cannot walk the page tree."""
    import pypdf
    from pypdf.errors import PyPdfError

    if b"/Rotate" not in data and b"/ObjStm" not in data:
        # Every dictionary of a file without object streams is plain text in it: no /Rotate key
        # anywhere is no page rotated, and pypdf's walk (~2 ms a document) is not needed.
        return [0] * n_pages
    try:
        with _quiet("pypdf"):
            reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
            rots = [int(page.rotation) % 360 for page in reader.pages]
    # pypdf raises many kinds of error on malformed trees; none of them may fail the document.
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            RecursionError, OSError, ZeroDivisionError):
        return None
    return rots if len(rots) == n_pages else None


def pdf_metadata(doc: pypdfium2.PdfDocument, data: bytes) -> dict[str, Any]:
    """The manifest's `pdf` struct and page geometry of an opened document: Info dictionary
    (title, author, subject, keywords, creator, producer, created, modified) and per-page width
    and height in points (as displayed, rotation applied) and rotation in degrees."""
    n = len(doc)
    widths, heights = [], []
    for i in range(n):
        try:
            w, h = doc.get_page_size(i)
        except pypdfium2.PdfiumError:
            w = h = float("nan")
        widths.append(w)
        heights.append(h)
    return {"pdf": _info(doc), "page_width": widths, "page_height": heights,
            "page_rotation": _rotations(data, n)}


def describe_pdf_error(data: bytes, exc: Exception) -> str:
    """A reader-friendly reason for a PDF that pdfium cannot open.

    pdfium's message is not reliable on its own: pypdfium2 refuses a 0-page document with
    whatever error pdfium recorded last (even "Incorrect password" left over from another file).
    So the reason is classified with pypdf, which reports these cases distinctly.
    """
    import pypdf
    from pypdf.errors import PdfReadError

    if not data.lstrip()[:5].startswith(b"%PDF"):
        return "not a PDF (no %PDF header)"
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            return "encrypted PDF: a password is required to open it"
        n = len(reader.pages)
    except PdfReadError as e:
        return f"damaged or truncated PDF ({type(e).__name__}: {e})"
    except (ValueError, KeyError, TypeError, OSError, RecursionError) as e:
        return f"damaged PDF ({type(e).__name__}: {e})"
    if n == 0:
        return "PDF has 0 pages"
    return f"pdfium cannot open this PDF ({exc})"


def _unreadable(kind: str, reason: str, names: tuple[str, str | None, str],
                stamp: tuple) -> "DocEntry":
    from nougat_dist.store.manifest import DocEntry

    digest = hashlib.sha256(f"{kind}:{names[2]}:{names[1]}".encode()).hexdigest()
    return DocEntry(digest, names[0], names[1], 0, 0, digest, reason, *stamp, location=names[2])


def inspect(src: Source, absolute_source: bool = False) -> "DocEntry":
    """Hash the document, count its pages, read its metadata. Never raises for bad input: the
    reason goes in `error`. absolute_source: store the absolute path (see Source.stored_source)."""
    from nougat_dist.store.manifest import DocEntry

    # Stamped before reading: a file rewritten while it is read has a newer mtime than the one
    # recorded, so the next run hashes it again.
    stamp = file_stamp(src) or (None, None)
    location, member = shown_name(src)
    names = (src.stored_source(absolute_source), member, location)
    if not (is_utf8(src.source) and is_utf8(src.member)):
        # The dataset stores names as text: the row keeps the name with its odd bytes escaped,
        # and says what to do, instead of failing the whole job when the manifest is written.
        return _unreadable("badname", "file name is not valid UTF-8 (its other bytes are "
                           "shown as \\xNN): rename the file to UTF-8 (e.g. with convmv) to "
                           "include it", names, stamp)
    try:
        data = read_bytes(src)
    except FileNotFoundError:
        return _unreadable("missing", "file not found", names, stamp)
    except OSError as e:
        return _unreadable("unreadable", f"cannot read file: {e}", names, stamp)
    digest = hashlib.sha256(data).hexdigest()
    n_pages, error, meta = 0, None, {}
    if not data:
        error = "empty file (0 bytes)"
    else:
        try:
            doc = pypdfium2.PdfDocument(data)
        except pypdfium2.PdfiumError as e:
            error = describe_pdf_error(data, e)
        else:
            try:
                n_pages = len(doc)
                meta = pdf_metadata(doc, data)
            finally:
                doc.close()
            if n_pages == 0:
                error = "PDF has 0 pages"
    return DocEntry(digest, names[0], member, n_pages, len(data), digest, error, *stamp,
                    location=location, **meta)


def build_entries(sources: Sequence[Source], rank: int, world_size: int,
                  absolute_source: bool = False) -> list[tuple[int, "DocEntry"]]:
    """Inspect this rank's share of the sources (every world_size-th), tagged with their index."""
    out = []
    for i in range(rank, len(sources), world_size):
        out.append((i, inspect(sources[i], absolute_source)))
        faults.hit("manifest")
    return out
