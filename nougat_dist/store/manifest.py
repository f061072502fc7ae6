"""The manifest: one row per input document; it is the job's resume checkpoint.

It is written when a job starts and rewritten only when the inputs change. A later run with the
same `--output` compares its inputs with it (`diff_inputs`): a document whose file has the same
size and mtime is not read again; a new or changed file is hashed and counted (a changed one
whose bytes differ is a new document, doc_id being the content hash); an input no longer given,
or no longer found, keeps its row with `removed` set, so its committed pages stay in the output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nougat_dist.inputs import remote
from nougat_dist.inputs.sources import Source, file_stamp, shown_name
from nougat_dist.inputs.inspect import build_entries, inspect  # noqa: F401 (re-exported)
from nougat_dist.sched.units import (Unit, Units, make_units, parse_unit_key,  # noqa: F401
                                     unit_key)  # (re-exported)
from nougat_dist.store.chunks import PDF_INFO_TYPE, atomic_write_table
from nougat_dist.store.layout import MANIFEST_FILE, OutputDir  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    # As the dataset names the document: relative to the input it was found under (see
    # inputs.sources.Source.stored_source); `location` is where it is read.
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
    # The path as found (relative to the working directory, or absolute, as given) or the remote
    # spec: what this machine reads and what a later run's inputs are matched by. A manifest of
    # an earlier release has none: its `source` was this.
    pa.field("location", pa.string()),
    # What the PDF says of itself (null when it could not be opened; see inputs.inspect), and
    # each page's size in points as displayed and its rotation in degrees.
    pa.field("pdf", PDF_INFO_TYPE),
    pa.field("page_width", pa.list_(pa.float32())),
    pa.field("page_height", pa.list_(pa.float32())),
    pa.field("page_rotation", pa.list_(pa.int16())),
])
#: Columns a DocEntry read back from a DocTable holds, and what travels to the other ranks: the
#: metadata stays out of the work loop (a book's page lists would be copied per page).
CORE_COLUMNS = MANIFEST_SCHEMA.names[:MANIFEST_SCHEMA.get_field_index("location") + 1]


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
    location: str | None = None  # None: the same as source
    pdf: dict[str, Any] | None = None
    page_width: list[float] | None = None
    page_height: list[float] | None = None
    page_rotation: list[int] | None = None

    def to_source(self) -> Source:
        """The Source to read the document from."""
        return Source(self.location or self.source, self.member)


def to_table(entries: Iterable[DocEntry],
             columns: Sequence[str] = MANIFEST_SCHEMA.names) -> pa.Table:
    """Manifest rows as a table of `columns` (every column by default)."""
    rows = list(entries)
    data = {name: [getattr(e, name) for e in rows] for name in columns}
    return pa.Table.from_pydict(data, schema=pa.schema([MANIFEST_SCHEMA.field(c) for c in columns]))


def write(out_dir: Path, entries: "Sequence[DocEntry] | DocTable") -> "DocTable":
    """Write the manifest; returns it as a DocTable (the job keeps no per-row objects)."""
    table = entries.table if isinstance(entries, DocTable) else to_table(entries)
    atomic_write_table(table, OutputDir(out_dir).manifest)
    return DocTable(table)


def load(out_dir: Path) -> "DocTable | None":
    """The manifest of a previous run in out_dir, or None when there is none.

    A manifest of an earlier release lacks some columns. Its `source` is the location (what the
    inputs are matched by); the stamps and `removed` read as null, so every file is hashed once
    more; the metadata reads as null (unknown, not read again). `upgraded` is then set: the
    manifest is rewritten with every column."""
    path = OutputDir(out_dir).manifest
    if not path.exists():
        return None
    table = pq.read_table(path)
    missing = [f for f in MANIFEST_SCHEMA if f.name not in table.column_names]
    for f in missing:
        fill = table["source"] if f.name == "location" else pa.nulls(table.num_rows, f.type)
        table = table.append_column(f, fill)
    docs = DocTable(table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA))
    docs.upgraded = bool(missing)
    return docs


def is_current(path: Path) -> bool:
    """Whether the manifest file at path has every column of this release (read from its footer)."""
    return path.exists() and set(MANIFEST_SCHEMA.names) <= set(pq.read_schema(path).names)


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
    #: per source: its `source` as this run stores it (a kept row written by an earlier release,
    #: or with --absolute-source toggled, is renamed)
    stored: list[str] = field(default_factory=list)

    @property
    def to_inspect(self) -> list[int]:
        return np.flatnonzero(self.keep < 0).tolist()

    def summary(self) -> str:
        return (f"{self.new} new, {self.changed} hashed again (size or mtime changed, or asked "
                f"for), {int(self.vanished.sum())} no longer found, {len(self.gone)} no longer given "
                "(those two kept with their committed pages, not scheduled)")


def diff_inputs(old: "DocTable | None", sources: Sequence[Source], recheck: bool = False,
                recheck_errors: bool = False, absolute_source: bool = False) -> InputChanges:
    """Which sources need hashing again, and which manifest rows are no longer among the inputs.

    A source keeps its manifest row when its location (path as found, or spec) is the row's and
    its file's size and mtime are those recorded (remote sources: always, their spec names them).
    recheck: inspect every source again (--rebuild-manifest); recheck_errors: inspect again the
    documents recorded as unreadable (--retry-failed: a password set, a download back). Works on
    columns: one stat per file, no per-row objects for the documents that did not change.
    """
    n = len(sources)
    stored = [src.stored_source(absolute_source) for src in sources]
    if old is None:
        return InputChanges(np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool),
                            np.zeros(0, np.int64), new=n, stored=stored)
    ch = _match(old.table, sources, recheck, recheck_errors)
    ch.stored = stored
    was_removed = old.table["removed"].fill_null(False).to_numpy(zero_copy_only=False)
    old_names = old.table["source"].to_pylist()
    kept = ch.keep >= 0
    renamed = any(old_names[i] != stored[k] for k, i in enumerate(ch.keep.tolist()) if i >= 0)
    ch.rewrite = bool((~kept).any() or len(ch.gone) or renamed or old.upgraded
                      or (was_removed[ch.keep[kept]] != ch.vanished[kept]).any()
                      or not was_removed[ch.gone].all())
    return ch


def _match(t: pa.Table, sources: Sequence[Source], recheck: bool,
           recheck_errors: bool) -> InputChanges:
    """`diff_inputs` without the rewrite decision: each source's row, if still valid."""
    where = pc.coalesce(t["location"], t["source"]).to_pylist()  # null location: = source
    names = {k: i for i, k in enumerate(zip(where, t["member"].to_pylist()))}
    fbytes, fmtime = t["file_bytes"].to_pylist(), t["file_mtime_ns"].to_pylist()
    errors = t["error"].is_valid().to_numpy(zero_copy_only=False)
    keep = np.full(len(sources), -1, dtype=np.int64)
    vanished = np.zeros(len(sources), dtype=bool)
    stamps: dict[str, tuple[int, int] | None] = {}  # an archive's members share one stat
    new = changed = 0
    for k, src in enumerate(sources):
        i = names.pop(shown_name(src), None)
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
    return InputChanges(keep, vanished, gone, new, changed)


def merge_inputs(old: "DocTable | None", ch: InputChanges,
                 inspected: dict[int, DocEntry]) -> "DocTable":
    """The new manifest: this run's sources in order (rows reused, renamed as this run stores
    them, or just inspected), then the rows of inputs no longer given, so a document's first
    occurrence is a current input when there is one."""
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
    if ch.stored:
        names = ch.stored + table["source"].to_pylist()[len(ch.keep):]
        table = table.set_column(table.schema.get_field_index("source"),
                                 MANIFEST_SCHEMA.field("source"), pa.array(names, pa.string()))
    return DocTable(table)


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


class DocTable(Sequence[DocEntry]):
    """Manifest rows as Arrow columns: how the job holds its documents.

    A list of a million DocEntry objects cost seconds to build, gigabytes of memory, seconds to
    pickle and more to unpickle on every rank; this is read from (and written as) Parquet, travels
    to the other ranks as one compressed Arrow IPC buffer, and makes a DocEntry per item access,
    which the work loop does a few times per page. Row i is DocEntry i of its source.
    """

    COLUMNS = tuple(CORE_COLUMNS)

    def __init__(self, table: pa.Table) -> None:
        self.table = table.combine_chunks()
        self.upgraded = False  # read from an earlier release's manifest (see `load`)
        self._cols = [self.table.column(c).chunk(0) if self.table.column(c).num_chunks
                      else pa.array([], self.table.schema.field(c).type) for c in self.COLUMNS]

    @classmethod
    def from_entries(cls, docs: Sequence[DocEntry]) -> "DocTable":
        return cls(to_table(docs, cls.COLUMNS))

    def to_bytes(self) -> bytes:
        """The core columns as a compressed Arrow IPC stream (what the other ranks need)."""
        core = self.table.select(list(self.COLUMNS))
        sink = pa.BufferOutputStream()
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        with pa.ipc.new_stream(sink, core.schema, options=options) as w:
            w.write_table(core)
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
