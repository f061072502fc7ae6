"""What a previous run already committed: rebuilt from the committed chunks on every start."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nougat_dist.errors import UsageError
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


def discard_committed(out_dir: Path) -> int:
    """--discard-committed: move every committed chunk into superseded/discarded-<time>/ (kept,
    not deleted), so the job starts over. Returns the rows moved."""
    layout = OutputDir(out_dir)
    paths = chunk_paths(out_dir)
    if not paths:
        return 0
    aside = layout.superseded / f"discarded-{int(time.time())}"
    aside.mkdir(parents=True, exist_ok=True)
    rows = 0
    for p in paths:
        rows += pq.read_metadata(p).num_rows
        p.rename(aside / p.name)
    log.warning("--discard-committed: %d committed page row(s) moved to %s", rows, aside)
    return rows


def invalidate_derived(out_dir: Path, keep_published: bool = False) -> list[Path]:
    """Delete the outputs computed from the pages (`OutputDir.derived`): called when a run is
    about to change the pages, so nothing stale says "finished" or gets uploaded. They are
    recomputed (the job's end, `clean`, `chunk`). `keep_published`: the run only adds pages, so
    what --overlap-post published of complete documents stays (`OutputDir.published`), and
    the other clean/ files go. Returns what was removed."""
    layout = OutputDir(out_dir)
    targets = layout.derived()
    if keep_published and layout.post.is_dir():
        keep = set(layout.published())
        targets = [p for p in targets if p not in keep and p != layout.clean]
        targets += [p for p in layout.clean.glob("*") if p not in keep]
    removed = []
    for p in targets:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(p)
    if removed:
        log.warning("the pages change in this run: removed the outputs derived from them (%s); "
                    "the end of the job writes documents and stats again, run clean/chunk again "
                    "after it", ", ".join(p.name for p in removed))
    return removed


def unfinished_reason(out_dir: Path) -> str | None:
    """Why out_dir is not a finished job's current output, or None when it is (or when it holds
    no manifest, i.e. was not written by a job). A run that
    changes the pages removes stats.json first (`invalidate_derived`), so its presence with
    "complete" means the derived files match the pages."""
    layout = OutputDir(out_dir)
    if not layout.manifest.exists():
        return None  # not a job's output (no manifest): the stage checks its own inputs
    if not layout.stats.exists():
        return (f"{out_dir} is not finished (no {layout.stats.name}): the job has not ended, or a "
                "later run changed its pages; run the same job command to finish it")
    try:
        complete = json.loads(layout.stats.read_text()).get("complete")
    except (OSError, ValueError) as e:
        return f"cannot read {layout.stats}: {e}"
    if not complete:
        return f"{layout.stats} does not say complete: run the same job command to finish it"
    return None


def add_allow_partial(parser: argparse.ArgumentParser) -> None:
    """The stage commands' --allow-partial flag."""
    parser.add_argument("--allow-partial", action="store_true",
                        help="use an output whose job has not finished (or whose pages changed "
                             "since it finished) as it is now; by default that is refused")


def require_finished(out_dir: Path, allow_partial: bool = False) -> None:
    """Raise UsageError (one line for the stage commands) unless out_dir is finished and
    current; --allow-partial turns that into a warning."""
    reason = unfinished_reason(out_dir)
    if reason is None:
        return
    if allow_partial:
        log.warning("%s; going on with what is committed (--allow-partial)", reason)
        return
    raise UsageError(reason + "; or pass --allow-partial to use what is committed now")
