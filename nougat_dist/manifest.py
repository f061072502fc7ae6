"""The manifest: one row per input document, written once; it is the job's resume checkpoint."""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import pypdfium2

from . import faults
from .sources import Source, read_bytes
from .writer import atomic_write_table

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("member", pa.string()),
    pa.field("n_pages", pa.int32(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("error", pa.string()),
])
MANIFEST_FILE = "manifest.parquet"


@dataclass(frozen=True)
class DocEntry:
    """One manifest row."""

    doc_id: str
    source: str
    member: str | None
    n_pages: int
    bytes: int
    sha256: str
    error: str | None = None


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


def inspect(src: Source) -> DocEntry:
    """Hash the document and count its pages. Never raises for bad input: the reason goes in `error`."""
    try:
        data = read_bytes(src)
    except FileNotFoundError:
        digest = hashlib.sha256(f"missing:{src.source}:{src.member}".encode()).hexdigest()
        return DocEntry(digest, src.source, src.member, 0, 0, digest, "file not found")
    except OSError as e:
        digest = hashlib.sha256(f"unreadable:{src.source}:{src.member}".encode()).hexdigest()
        return DocEntry(digest, src.source, src.member, 0, 0, digest, f"cannot read file: {e}")
    digest = hashlib.sha256(data).hexdigest()
    n_pages, error = 0, None
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
            finally:
                doc.close()
            if n_pages == 0:
                error = "PDF has 0 pages"
    return DocEntry(digest, src.source, src.member, n_pages, len(data), digest, error)


def build_entries(sources: Sequence[Source], rank: int, world_size: int) -> list[tuple[int, DocEntry]]:
    """Inspect this rank's share of the sources (every world_size-th), tagged with their index."""
    out = []
    for i in range(rank, len(sources), world_size):
        out.append((i, inspect(sources[i])))
        faults.hit("manifest")
    return out


def to_table(entries: Iterable[DocEntry]) -> pa.Table:
    rows = list(entries)
    return pa.Table.from_pydict(
        {name: [getattr(e, name) for e in rows] for name in MANIFEST_SCHEMA.names},
        schema=MANIFEST_SCHEMA,
    )


def write(out_dir: Path, entries: Sequence[DocEntry]) -> Path:
    path = out_dir / MANIFEST_FILE
    atomic_write_table(to_table(entries), path)
    return path


def load(out_dir: Path) -> list[DocEntry] | None:
    """The manifest of a previous run in out_dir, or None when there is none."""
    path = out_dir / MANIFEST_FILE
    if not path.exists():
        return None
    table = pq.read_table(path, schema=MANIFEST_SCHEMA)
    cols = table.to_pydict()
    return [DocEntry(**{k: cols[k][i] for k in MANIFEST_SCHEMA.names}) for i in range(table.num_rows)]


def same_inputs(entries: Sequence[DocEntry], sources: Sequence[Source]) -> bool:
    """Whether a manifest was built from exactly these sources (by name; contents are not re-hashed)."""
    return [(e.source, e.member) for e in entries] == [(s.source, s.member) for s in sources]


@dataclass(frozen=True)
class Unit:
    """A range of pages of one document: the unit of scheduling and of commit.

    Pages are 1-based and inclusive. A document that cannot be read at all has one unit with
    first == last == 0, which produces its single error row.
    """

    doc: int  # index into the job's unique-document list
    first: int
    last: int

    @property
    def n_pages(self) -> int:
        return self.last - self.first + 1 if self.first else 1

    def pages(self) -> range:
        return range(self.first, self.last + 1)

    def key(self, doc_id: str) -> str:
        return f"{doc_id}:{self.first}-{self.last}"


def unique_docs(entries: Sequence[DocEntry]) -> list[DocEntry]:
    """Documents to OCR: the first occurrence of each doc_id (same bytes are OCR'd once)."""
    seen: set[str] = set()
    out = []
    for e in entries:
        if e.doc_id not in seen:
            seen.add(e.doc_id)
            out.append(e)
    return out


def make_units(docs: Sequence[DocEntry], unit_pages: int) -> list[Unit]:
    """Split every document into units of at most unit_pages pages."""
    units = []
    for i, d in enumerate(docs):
        if d.error is not None or d.n_pages == 0:
            units.append(Unit(i, 0, 0))
            continue
        for first in range(1, d.n_pages + 1, unit_pages):
            units.append(Unit(i, first, min(first + unit_pages - 1, d.n_pages)))
    return units
