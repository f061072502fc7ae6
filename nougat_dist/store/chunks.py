"""Parquet output: one schema per table, chunks committed atomically with the units they complete."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from nougat_dist import faults
from nougat_dist.errors import SetupError
from nougat_dist.store.layout import PAGES_DIR, TMP_PREFIX  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

PAGES_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("member", pa.string()),
    pa.field("page", pa.int32(), nullable=False),  # 1-based; 0 = the document could not be opened
    pa.field("text", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("n_tokens", pa.int32()),
    pa.field("batch_steps", pa.int32()),  # decode steps of the page's model batch
    pa.field("elapsed_ms", pa.float32()),
    pa.field("rank", pa.int16(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("dtype", pa.string(), nullable=False),
    # Provenance: the run (one launch of the job, see provenance.new_run_id) that OCR'd the page,
    # and when. Null in chunks written before they were recorded (readers pass this schema, which
    # reads a missing column as nulls).
    pa.field("run_id", pa.string()),
    pa.field("ocr_at", pa.timestamp("ms", tz="UTC")),
])

#: What a PDF says of itself (its Info dictionary): the manifest's and documents' `pdf` column.
#: Dates are ISO 8601 (with the PDF's UTC offset when it gives one), null when they do not parse.
PDF_INFO_TYPE = pa.struct([
    pa.field("title", pa.string()), pa.field("author", pa.string()),
    pa.field("subject", pa.string()), pa.field("keywords", pa.string()),
    pa.field("creator", pa.string()), pa.field("producer", pa.string()),
    pa.field("created", pa.string()), pa.field("modified", pa.string()),
])

DOCUMENTS_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("member", pa.string()),
    pa.field("n_pages", pa.int32(), nullable=False),
    pa.field("n_failed", pa.int32(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("duplicates", pa.list_(pa.string())),
    pa.field("pdf", PDF_INFO_TYPE),  # null: not read (an unreadable file, an older manifest)
])

#: Parquet key-value metadata key listing the units a chunk completes (JSON list of unit keys).
UNITS_KEY = b"nougat_dist.units"


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (best effort where a directory cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory; the data file is synced
    finally:
        os.close(fd)


#: A write that fails with one of these failed for want of space (EFBIG: a file size limit).
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@contextlib.contextmanager
def _space_errors(path: Path):
    """Turn a write that failed for want of space into one clear line (exit 2) instead of a
    traceback: the temp file is gone and every committed file is intact, so making room and
    running the same command again resumes."""
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE_ERRNOS:
            raise
        raise SetupError(
            f"no space to write {path} ({e.strerror}): what was committed before is intact. "
            "Free space on the output's file system (or raise the quota or file-size limit), "
            "then run the same command again to resume") from e


def atomic_write_table(table: pa.Table, path: Path, metadata: dict[bytes, bytes] | None = None,
                       before_replace: Callable[[], None] | None = None) -> None:
    """Write table to path so that readers see either the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    with _space_errors(path):
        _write_replace(table, tmp, path, before_replace)
    fsync_dir(path.parent)


def _write_replace(table: pa.Table, tmp: Path, path: Path,
                   before_replace: Callable[[], None] | None) -> None:
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with _space_errors(path):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    fsync_dir(path.parent)


def chunk_name(rank: int, seq: int, run_id: str = "") -> str:
    """A chunk's file name: rank, a sequence number that continues across attempts, and the
    attempt (run) that wrote it, so that no write of one run can replace another run's file
    whatever the numbering (a lease taken over from a job that is still writing, an NFS listing
    that missed a file). Chunks of earlier releases have no run part; both are read alike."""
    run = re.sub(r"[^A-Za-z0-9._~+-]", "_", run_id)[:80]
    return f"part-r{rank:05d}-{seq:06d}" + (f"-{run}" if run else "") + ".parquet"


def chunk_seq(name: str, rank: int) -> int | None:
    """The sequence number of rank's chunk named `name` (either form), or None if not one."""
    prefix = f"part-r{rank:05d}-"
    if not name.startswith(prefix) or not name.endswith(".parquet"):
        return None
    seq = name[len(prefix):-len(".parquet")].split("-", 1)[0]
    return int(seq) if seq.isdigit() else None


def chunk_units(path: Path) -> list[str]:
    """The unit keys a committed chunk completes, read from its footer only."""
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(UNITS_KEY, b"[]"))


@dataclass
class ChunkWriter:
    """Buffers page rows per unit and commits complete units as Parquet chunks.

    A unit counts as done only once its rows are in a committed chunk whose footer names it, so
    a crash at any instant leaves each unit either fully committed or not at all.
    """

    out_dir: Path
    rank: int
    commit_pages: int = 256
    commit_seconds: float = 60.0
    seq: int = 0
    #: goes into every chunk name (default: this process's attempt, see store.attempts)
    run_id: str = ""
    _open: dict[str, list[dict]] = field(default_factory=dict)
    _expected: dict[str, int] = field(default_factory=dict)
    _ready_rows: list[dict] = field(default_factory=list)
    _ready_units: list[str] = field(default_factory=list)
    _last_commit: float = field(default_factory=time.monotonic)
    committed_pages: int = 0
    # Names of the chunks this writer committed: rank 0 waits until it sees each (store/attempts).
    committed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pages_dir = self.out_dir / PAGES_DIR
        self.pages_dir.mkdir(parents=True, exist_ok=True)
        # Continue numbering after this rank's existing chunks (the attempt records use the
        # numbers to tell which attempt committed what).
        for p in self.pages_dir.glob(f"part-r{self.rank:05d}-*.parquet"):
            seq = chunk_seq(p.name, self.rank)
            if seq is not None:
                self.seq = max(self.seq, seq + 1)
        if not self.run_id:
            from nougat_dist.store import attempts  # it imports this module

            self.run_id = attempts.current_attempt() or attempts.attempt_id()

    def expect(self, unit_key: str, n_rows: int) -> None:
        """Declare a unit that will receive n_rows rows."""
        self._open.setdefault(unit_key, [])
        self._expected[unit_key] = n_rows

    def add(self, unit_key: str, row: dict) -> None:
        rows = self._open[unit_key]
        rows.append(row)
        if len(rows) == self._expected[unit_key]:
            rows.sort(key=lambda r: r["page"])
            self._ready_rows.extend(rows)
            self._ready_units.append(unit_key)
            del self._open[unit_key], self._expected[unit_key]

    @property
    def pending_units(self) -> int:
        return len(self._open)

    def maybe_commit(self) -> bool:
        due = time.monotonic() - self._last_commit >= self.commit_seconds
        if self._ready_rows and (len(self._ready_rows) >= self.commit_pages or due):
            self.commit()
            return True
        return False

    def commit(self) -> Path | None:
        """Write every complete unit buffered so far as one chunk. Returns its path (None if empty)."""
        self._last_commit = time.monotonic()
        if not self._ready_units:
            return None
        table = pa.Table.from_pylist(self._ready_rows, schema=PAGES_SCHEMA)
        path = self.pages_dir / chunk_name(self.rank, self.seq, self.run_id)
        atomic_write_table(table, path, {UNITS_KEY: json.dumps(self._ready_units).encode()},
                           before_replace=lambda: faults.hit("commit"))
        log.debug("committed %s: %d rows, %d units", path.name, table.num_rows, len(self._ready_units))
        self.seq += 1
        self.committed.append(path.name)
        self.committed_pages += table.num_rows
        self._ready_rows, self._ready_units = [], []
        return path
