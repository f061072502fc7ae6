"""The manifest: one row per input document; it is the job's resume checkpoint.

It is written when a job starts and rewritten only when the inputs change. A later run with the
same `--output` compares its inputs with it (`diff_inputs`): a document whose file has the same
size and mtime is not read again; a new or changed file is hashed and counted (a changed one
whose bytes differ is a new document, doc_id being the content hash); an input no longer given,
or no longer found, keeps its row with `removed` set, so its committed pages stay in the output.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pypdfium2

from nougat_dist import faults
from nougat_dist.inputs import remote
from nougat_dist.inputs.sources import Source, is_utf8, printable_name, read_bytes
from nougat_dist.store.chunks import atomic_write_table
from nougat_dist.store.layout import MANIFEST_FILE, OutputDir  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("member", pa.string()),
    pa.field("n_pages", pa.int32(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    # Size and mtime (ns) of the file holding the document (the archive, for a member) when it
    # was hashed: a later run re-hashes only files whose size or mtime differ. Null: remote, or
    # not stat-able.
    pa.field("file_bytes", pa.int64()),
    pa.field("file_mtime_ns", pa.int64()),
    # The input is no longer given (or its file is gone): its committed pages are kept, its
    # missing pages are not scheduled.
    pa.field("removed", pa.bool_()),
])


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
    file_bytes: int | None = None
    file_mtime_ns: int | None = None
    removed: bool | None = False


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


def file_stamp(src: Source) -> tuple[int, int] | None:
    """(size, mtime_ns) of the local file holding the document (the archive, for a member), or
    None (remote, missing, unreadable)."""
    if remote.is_remote(src.source):
        return None
    try:
        st = os.stat(src.source)
    except (OSError, ValueError):
        return None
    return st.st_size, st.st_mtime_ns


def inspect(src: Source) -> DocEntry:
    """Hash the document and count its pages. Never raises for bad input: the reason goes in `error`."""
    # Stamped before reading: a file rewritten while it is read has a newer mtime than the one
    # recorded, so the next run hashes it again.
    stamp = file_stamp(src) or (None, None)
    if not (is_utf8(src.source) and is_utf8(src.member)):
        # The dataset stores names as text: the row keeps the name with its odd bytes escaped,
        # and says what to do, instead of failing the whole job when the manifest is written.
        shown = _shown_name(src)
        digest = hashlib.sha256(f"badname:{shown[0]}:{shown[1]}".encode()).hexdigest()
        return DocEntry(digest, *shown, 0, 0, digest,
                        "file name is not valid UTF-8 (its other bytes are shown as \\xNN): "
                        "rename the file to UTF-8 (e.g. with convmv) to include it", *stamp)
    try:
        data = read_bytes(src)
    except FileNotFoundError:
        digest = hashlib.sha256(f"missing:{src.source}:{src.member}".encode()).hexdigest()
        return DocEntry(digest, src.source, src.member, 0, 0, digest, "file not found", *stamp)
    except OSError as e:
        digest = hashlib.sha256(f"unreadable:{src.source}:{src.member}".encode()).hexdigest()
        return DocEntry(digest, src.source, src.member, 0, 0, digest, f"cannot read file: {e}",
                        *stamp)
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
    return DocEntry(digest, src.source, src.member, n_pages, len(data), digest, error, *stamp)


def _shown_name(src: Source) -> tuple[str, str | None]:
    """(source, member) as the manifest stores them (see `sources.printable_name`)."""
    return (printable_name(src.source),
            None if src.member is None else printable_name(src.member))


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


def write(out_dir: Path, entries: "Sequence[DocEntry] | DocTable") -> "DocTable":
    """Write the manifest; returns it as a DocTable (the job keeps no per-row objects)."""
    table = entries.table if isinstance(entries, DocTable) else to_table(entries)
    atomic_write_table(table, OutputDir(out_dir).manifest)
    return DocTable(table)


def load(out_dir: Path) -> "DocTable | None":
    """The manifest of a previous run in out_dir, or None when there is none.

    A manifest of an earlier release lacks the stamp and `removed` columns: they read as null,
    so every file is hashed once more and the manifest is rewritten with them."""
    path = OutputDir(out_dir).manifest
    if not path.exists():
        return None
    table = pq.read_table(path)
    for f in MANIFEST_SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return DocTable(table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA))


@dataclass
class InputChanges:
    """How this run's inputs compare with the manifest (see `diff_inputs`)."""

    #: per source, in order: the index of its manifest row still valid for it, or -1 (to inspect)
    keep: np.ndarray
    #: per source: its file is gone (its row is kept, marked removed)
    vanished: np.ndarray
    #: manifest rows whose input is not given any more (kept, marked removed)
    gone: np.ndarray
    new: int = 0  # sources without a manifest row
    changed: int = 0  # sources whose file's size or mtime differ (or forced): hashed again
    rewrite: bool = True  # whether the manifest changes at all

    @property
    def to_inspect(self) -> list[int]:
        return np.flatnonzero(self.keep < 0).tolist()

    def summary(self) -> str:
        return (f"{self.new} new, {self.changed} hashed again (size or mtime changed, or asked "
                f"for), {int(self.vanished.sum())} no longer found, {len(self.gone)} no longer given "
                "(those two kept with their committed pages, not scheduled)")


def diff_inputs(old: "DocTable | None", sources: Sequence[Source], recheck: bool = False,
                recheck_errors: bool = False) -> InputChanges:
    """Which sources need hashing again, and which manifest rows are no longer among the inputs.

    A source keeps its manifest row when its file's size and mtime are those recorded (remote
    sources: always, their spec names them). recheck: inspect every source again
    (--rebuild-manifest); recheck_errors: inspect again the documents recorded as unreadable
    (--retry-failed: a password set, a download back). Works on columns: one stat per file, no
    per-row objects for the documents that did not change.
    """
    n = len(sources)
    vanished = np.zeros(n, dtype=bool)
    if old is None:
        return InputChanges(np.full(n, -1, dtype=np.int64), vanished, np.zeros(0, np.int64), new=n)
    t = old.table
    names = {k: i for i, k in enumerate(zip(t["source"].to_pylist(), t["member"].to_pylist()))}
    fbytes, fmtime = t["file_bytes"].to_pylist(), t["file_mtime_ns"].to_pylist()
    errors = t["error"].is_valid().to_numpy(zero_copy_only=False)
    was_removed = t["removed"].fill_null(False).to_numpy(zero_copy_only=False)
    keep = np.full(n, -1, dtype=np.int64)
    stamps: dict[str, tuple[int, int] | None] = {}  # an archive's members share one stat
    new = changed = 0
    for k, src in enumerate(sources):
        i = names.pop(_shown_name(src), None)
        if i is None:
            new += 1
            continue
        if recheck or (recheck_errors and errors[i]):
            changed += 1
            continue
        if remote.is_remote(src.source):
            keep[k] = i
            continue
        if src.source not in stamps:
            stamps[src.source] = file_stamp(src)
        stamp = stamps[src.source]
        if stamp is None:
            # Gone (or unreadable) now: a document that read before keeps its row and pages; one
            # that did not keeps its error row (--retry-failed looks again).
            keep[k] = i
            vanished[k] = not errors[i]
        elif stamp == (fbytes[i], fmtime[i]):
            keep[k] = i
        else:
            changed += 1
    gone = np.array(sorted(names.values()), dtype=np.int64)
    kept = keep >= 0
    rewrite = bool((~kept).any() or len(gone) or (was_removed[keep[kept]] != vanished[kept]).any()
                   or not was_removed[gone].all())
    return InputChanges(keep, vanished, gone, new, changed, rewrite)


def merge_inputs(old: "DocTable | None", ch: InputChanges,
                 inspected: dict[int, DocEntry]) -> "DocTable":
    """The new manifest: this run's sources in order (rows reused or just inspected), then the
    rows of inputs no longer given, so a document's first occurrence is a current input when
    there is one."""
    kept = np.flatnonzero(ch.keep >= 0)
    fresh = np.flatnonzero(ch.keep < 0)
    parts = [to_table(inspected[i] for i in fresh.tolist())]
    if old is not None:
        parts = [old.table.take(pa.array(ch.keep[kept])).cast(MANIFEST_SCHEMA), parts[0],
                 old.table.take(pa.array(ch.gone)).cast(MANIFEST_SCHEMA)]
    table = pa.concat_tables(parts)
    # Rows are [kept..., fresh..., gone...]: put the first two back in source order.
    pos = np.empty(len(ch.keep), dtype=np.int64)
    pos[kept] = np.arange(len(kept))
    pos[fresh] = len(kept) + np.arange(len(fresh))
    order = np.concatenate([pos, np.arange(len(ch.keep), table.num_rows)])
    table = table.take(pa.array(order))
    removed = np.concatenate([ch.vanished, np.ones(table.num_rows - len(ch.keep), dtype=bool)])
    table = table.set_column(table.schema.get_field_index("removed"),
                             MANIFEST_SCHEMA.field("removed"), pa.array(removed))
    return DocTable(table)


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
        return unit_key(doc_id, self.first, self.last)


def unit_key(doc_id: str, first: int, last: int) -> str:
    """How a unit is named in a chunk's footer: `doc_id:first-last`."""
    return f"{doc_id}:{first}-{last}"


def parse_unit_key(key: str) -> tuple[str, int, int]:
    doc_id, span = key.rsplit(":", 1)
    first, last = span.split("-")
    return doc_id, int(first), int(last)


def unique_docs(entries: Sequence[DocEntry]) -> Sequence[DocEntry]:
    """Documents to OCR: the first occurrence of each doc_id (same bytes are OCR'd once).
    A DocTable gives a DocTable, a list a list."""
    if isinstance(entries, DocTable):
        first: dict[str, int] = {}
        for i, doc_id in enumerate(entries.column("doc_id")):
            first.setdefault(doc_id, i)
        if len(first) == len(entries):
            return entries
        return DocTable(entries.table.take(pa.array(list(first.values()), pa.int64())))
    seen: set[str] = set()
    out = []
    for e in entries:
        if e.doc_id not in seen:
            seen.add(e.doc_id)
            out.append(e)
    return out


def doc_ids(docs: Sequence[DocEntry]) -> list[str]:
    return docs.column("doc_id") if isinstance(docs, DocTable) else [d.doc_id for d in docs]


class Units(Sequence[Unit]):
    """Every unit of a job as three integer arrays (a million documents make ~2 M units: as
    Unit objects they cost seconds to build and to send; as arrays, milliseconds).

    A document's units are contiguous and in page order, which makes a unit findable from its key.
    """

    def __init__(self, doc: np.ndarray, first: np.ndarray, last: np.ndarray, start: np.ndarray,
                 unit_pages: int) -> None:
        self.doc, self.first, self.last = doc, first, last
        self.start = start  # index of each document's first unit
        self.unit_pages = unit_pages

    def __len__(self) -> int:
        return len(self.doc)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Unit(int(self.doc[i]), int(self.first[i]), int(self.last[i]))

    def __iter__(self) -> Iterator[Unit]:
        for d, f, last in zip(self.doc.tolist(), self.first.tolist(), self.last.tolist()):
            yield Unit(d, f, last)

    @property
    def n_pages(self) -> np.ndarray:
        """Pages per unit (1 for a document's error unit), as int64."""
        return np.where(self.first > 0, self.last - self.first + 1, 1)

    def find(self, doc: int, first: int, last: int) -> int | None:
        """Index of the unit of document `doc` spanning first..last, or None (a unit of an
        earlier run with another --unit-pages, which is then done again)."""
        j = int(self.start[doc]) + ((first - 1) // self.unit_pages if first > 0 else 0)
        end = self.start[doc + 1] if doc + 1 < len(self.start) else len(self)
        if j < end and self.first[j] == first and self.last[j] == last:
            return j
        return None


def make_units(docs: Sequence[DocEntry], unit_pages: int) -> Units:
    """Split every document into units of at most unit_pages pages."""
    if unit_pages < 1:
        raise ValueError(f"unit_pages must be >= 1, got {unit_pages}")
    if isinstance(docs, DocTable):
        n_pages, ok = docs.n_pages_array(), docs.readable_array()
    else:
        n_pages = np.fromiter((d.n_pages for d in docs), dtype=np.int64, count=len(docs))
        ok = np.fromiter((d.error is None for d in docs), dtype=bool, count=len(docs))
    ok &= n_pages > 0
    count = np.where(ok, (n_pages + unit_pages - 1) // unit_pages, 1)
    start = np.cumsum(count) - count
    doc = np.repeat(np.arange(len(count), dtype=np.int64), count)
    k = np.arange(len(doc), dtype=np.int64) - start[doc]
    readable = ok[doc]
    first = np.where(readable, k * unit_pages + 1, 0)
    last = np.where(readable, np.minimum(first + unit_pages - 1, n_pages[doc]), 0)
    return Units(doc, first, last, start, unit_pages)


class DocTable(Sequence[DocEntry]):
    """Manifest rows as Arrow columns: how the job holds its documents.

    A list of a million DocEntry objects cost seconds to build, gigabytes of memory, seconds to
    pickle and more to unpickle on every rank; this is read from (and written as) Parquet, travels
    to the other ranks as one compressed Arrow IPC buffer, and makes a DocEntry per item access,
    which the work loop does a few times per page. Row i is DocEntry i of its source.
    """

    COLUMNS = tuple(MANIFEST_SCHEMA.names)

    def __init__(self, table: pa.Table) -> None:
        self.table = table.combine_chunks()
        self._cols = [self.table.column(c).chunk(0) if self.table.column(c).num_chunks
                      else pa.array([], self.table.schema.field(c).type) for c in self.COLUMNS]

    @classmethod
    def from_entries(cls, docs: Sequence[DocEntry]) -> "DocTable":
        schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in cls.COLUMNS])
        return cls(pa.Table.from_pydict({c: [getattr(d, c) for d in docs] for c in cls.COLUMNS},
                                        schema=schema))

    def to_bytes(self) -> bytes:
        sink = pa.BufferOutputStream()
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        with pa.ipc.new_stream(sink, self.table.schema, options=options) as w:
            w.write_table(self.table)
        return sink.getvalue().to_pybytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> "DocTable":
        return cls(pa.ipc.open_stream(pa.py_buffer(data)).read_all())

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return DocEntry(*(col[i].as_py() for col in self._cols))

    def __iter__(self) -> Iterator[DocEntry]:
        for batch in self.table.to_batches(max_chunksize=65536):
            cols = [batch.column(c).to_pylist() for c in self.COLUMNS]
            for row in zip(*cols):
                yield DocEntry(*row)

    def column(self, name: str) -> list:
        return self.table.column(name).to_pylist()

    def n_pages_array(self) -> np.ndarray:
        return self.table.column("n_pages").to_numpy().astype(np.int64)

    def readable_array(self) -> np.ndarray:
        return self.table.column("error").is_null().to_numpy(zero_copy_only=False).copy()

    def removed_array(self) -> np.ndarray:
        """Rows whose input is no longer given (null, in an older manifest, = False)."""
        return self.table.column("removed").fill_null(False).to_numpy(zero_copy_only=False).copy()
