"""What a previous run already committed: rebuilt from the committed chunks on every start."""

from __future__ import annotations

import logging
from pathlib import Path

from nougat_dist.store.chunks import chunk_units
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
