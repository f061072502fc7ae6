"""Counts over the committed pages (status, decode efficiency, text size), a chunk at a time."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nougat_dist.store.chunks import PAGES_SCHEMA
from nougat_dist.store.index import chunk_paths


def read_pages(out_dir: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """All committed page rows as one table (small outputs and tests; the stages stream)."""
    paths = chunk_paths(out_dir)
    empty = PAGES_SCHEMA.empty_table()
    if not paths:
        return empty if columns is None else empty.select(columns)
    return pa.concat_tables(pq.read_table(p, schema=PAGES_SCHEMA, columns=columns) for p in paths)


def status_counts(out_dir: Path) -> dict[str, int]:
    """Committed page rows by status (one chunk's status column in memory at a time)."""
    counts: dict[str, int] = defaultdict(int)
    for p in chunk_paths(out_dir):
        for item in pq.read_table(p, columns=["status"])["status"].value_counts().to_pylist():
            counts[item["values"]] += item["counts"]
    return dict(counts)


def decode_efficiency(out_dir: Path) -> dict[str, float | int | None]:
    """Σ page tokens / Σ (batch size x batch steps) over the committed pages that carry both.

    A model batch decodes until its longest page stops, so each of its pages holds a decode slot
    for every step: summed over pages, `batch_steps` is Σ (batch size x steps). 1.0 means no
    slot decoded padding; None when no page has the counts (a fake model, chunks from before).
    """
    table = read_pages(out_dir, ["n_tokens", "batch_steps"])
    both = pc.and_(pc.is_valid(table["n_tokens"]), pc.is_valid(table["batch_steps"]))
    table = table.filter(both)
    tokens = int(pc.sum(table["n_tokens"]).as_py() or 0)
    slots = int(pc.sum(table["batch_steps"]).as_py() or 0)
    return {"efficiency": round(tokens / slots, 4) if slots else None,
            "page_tokens": tokens, "batch_slots": slots}


def text_bytes(out_dir: Path) -> int:
    """Uncompressed bytes of the committed pages' text column, from the chunk footers."""
    total = 0
    for p in chunk_paths(out_dir):
        meta = pq.read_metadata(p)
        i = meta.schema.names.index("text")
        total += sum(meta.row_group(g).column(i).total_uncompressed_size
                     for g in range(meta.num_row_groups))
    return total
