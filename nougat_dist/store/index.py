"""What a previous run already committed: rebuilt from the committed chunks on every start."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nougat_dist.store.chunks import atomic_write_table, chunk_units
from nougat_dist.store.layout import TMP_PREFIX, OutputDir

log = logging.getLogger(__name__)


def chunk_paths(out_dir: Path) -> list[Path]:
    """Committed page chunks, in a stable order (temp files of interrupted commits excluded)."""
    d = OutputDir(out_dir).pages
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("part-*.parquet") if not p.name.startswith(TMP_PREFIX))


def remove_temp_files(out_dir: Path) -> int:
    """Delete leftovers of commits interrupted by a crash. Call before any rank starts writing."""
    n = 0
    for d in (out_dir, OutputDir(out_dir).pages):
        if d.is_dir():
            for p in d.glob(TMP_PREFIX + "*"):
                p.unlink(missing_ok=True)
                n += 1
    if n:
        log.info("removed %d temporary file(s) left by an interrupted commit", n)
    return n


def committed_units(out_dir: Path) -> dict[str, list[Path]]:
    """Unit key → the chunks that commit it (more than one only after a raced steal)."""
    index: dict[str, list[Path]] = {}
    for p in chunk_paths(out_dir):
        for key in chunk_units(p):
            index.setdefault(key, []).append(p)
    return index


def committed_pages(out_dir: Path) -> dict[str, np.ndarray]:
    """doc_id → sorted unique page numbers with a committed row (0 = the document's error row).

    This, not the unit keys in the chunk footers, is what counts as done: a page committed under
    any --unit-pages, batch size or world size is never scheduled again.
    """
    pages: dict[str, list[np.ndarray]] = {}
    for p in chunk_paths(out_dir):
        t = pq.read_table(p, columns=["doc_id", "page"])
        if not t.num_rows:
            continue
        ids = t["doc_id"].combine_chunks().dictionary_encode()
        codes = ids.indices.to_numpy(zero_copy_only=False)
        page = t["page"].to_numpy()
        for code, doc_id in enumerate(ids.dictionary.to_pylist()):
            pages.setdefault(doc_id, []).append(page[codes == code])
    return {d: np.unique(np.concatenate(parts)) for d, parts in pages.items()}


def drop_duplicate_pages(out_dir: Path) -> int:
    """Keep each (doc_id, page) in the first chunk that holds it; rewrite later chunks without it.

    Whatever produced a duplicate (a raced steal, a unit size changed between runs, an older
    release), a page is stored once. Each rewrite is atomic, so a crash midway leaves a state
    the next finalize completes. Returns rows removed.
    """
    seen: set[tuple[str, int]] = set()
    removed = 0
    for path in chunk_paths(out_dir):
        table = pq.read_table(path)
        keys = list(zip(table["doc_id"].to_pylist(), table["page"].to_pylist()))
        keep = []
        for k in keys:
            keep.append(k not in seen)
            seen.add(k)
        n_drop = len(keep) - sum(keep)
        if not n_drop:
            continue
        removed += n_drop
        if n_drop == len(keep):
            path.unlink()
        else:
            atomic_write_table(table.filter(pa.array(keep)), path, table.schema.metadata)
        log.info("removed %d duplicate page row(s) from %s", n_drop, path.name)
    return removed


def committed_models(out_dir: Path) -> set[tuple[str, str]]:
    """The (model, dtype) pairs of the committed rows."""
    found: set[tuple[str, str]] = set()
    for p in chunk_paths(out_dir):
        t = pq.read_table(p, columns=["model", "dtype"]).group_by(["model", "dtype"]).aggregate([])
        found.update(zip(t["model"].to_pylist(), t["dtype"].to_pylist()))
    return found


def set_aside(out_dir: Path, drop: Callable[[pa.Table], pa.Array], reason: str) -> int:
    """Move the committed rows for which `drop` is true out of pages/ into superseded/.

    They stop counting as done (so they are done again) but are kept, not deleted: a retry or
    a model change is then reversible by hand. Returns rows moved.
    """
    layout = OutputDir(out_dir)
    moved = 0
    for path in chunk_paths(out_dir):
        table = pq.read_table(path)
        mask = drop(table)
        n = pc.sum(mask).as_py() or 0
        if not n:
            continue
        aside = layout.superseded / f"{reason}-{int(time.time())}-{path.name}"
        atomic_write_table(table.filter(mask), aside, table.schema.metadata)
        if n == table.num_rows:
            path.unlink()
        else:
            atomic_write_table(table.filter(pc.invert(mask)), path, table.schema.metadata)
        moved += n
    if moved:
        log.warning("%s: %d committed row(s) moved to %s and scheduled again", reason, moved,
                    layout.superseded)
    return moved
