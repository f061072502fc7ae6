"""DuckDB under a memory budget, and the bucketed sort that finalize and clean stream through.

DuckDB spills to OUTPUT/.scratch/ beyond its share of the budget. Rows are sorted one bucket of
consecutive documents at a time, each bucket sized to fit memory: DuckDB's single global ORDER BY
ran out of memory at 1M pages under 409 and 614 MiB limits.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import duckdb

#: What finalize, clean and chunk may use, DuckDB's spill buffers and Python's batches together.
DEFAULT_MEMORY_BUDGET = 1024 * 2**20
#: Sorted page rows handed from DuckDB to Python at a time (~3 KB of text each).
BATCH_ROWS = 2048

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from `1GiB`, `512MiB`, `2GB` or a plain number of bytes."""
    m = _SIZE_RE.match(str(text))
    unit = (m.group(2) or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 1GiB, 512MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[unit])


def connect(scratch: Path, memory_budget: int) -> "duckdb.DuckDBPyConnection":
    """An in-memory DuckDB that spills to `scratch` beyond its share of the budget.

    DuckDB gets 40% of the budget; the rest is for the batches and the document Python holds and
    for the Parquet writer's row group.
    """
    import duckdb

    con = duckdb.connect(":memory:")
    limit = max(64 * 2**20, int(memory_budget * 0.4))
    con.execute(f"SET memory_limit = '{limit // 2**20}MiB'")
    con.execute(f"SET temp_directory = '{scratch}'")
    # Order comes from explicit ORDER BY; keeping scan order would cost memory in every operator.
    con.execute("SET preserve_insertion_order = false")
    # Each sorting thread pins its own blocks: at 1M pages (2.7 GB of text) two threads under a
    # 614 MiB limit failed to pin a block, one thread sorted it. So one thread per 512 MiB.
    con.execute(f"SET threads = {max(1, min(os.cpu_count() or 1, 8, limit // (512 * 2**20)))}")
    return con


def pages_per_bucket(paths: Sequence[str], memory_budget: int) -> int:
    """Pages whose rows fit a fifth of the budget, from the chunk footers' text sizes (a bucket
    is read and sorted whole: two copies of it, plus the document being joined)."""
    rows = text = 0
    for p in paths:
        meta = pq.read_metadata(p)
        if not meta.num_rows or "text" not in meta.schema.names:
            continue
        i = meta.schema.names.index("text")
        rows += meta.num_rows
        text += sum(meta.row_group(g).column(i).total_uncompressed_size for g in range(meta.num_row_groups))
    per_row = (text / rows if rows else 3000) + 300  # + the document's columns on every row
    return max(1, int(memory_budget * 0.2 / per_row))


def sorted_by_buckets(con: "duckdb.DuckDBPyConnection", rows_sql: str, params: dict,
                      scratch: Path, n_buckets: int,
                      keys: Sequence[str] = ("ord", "page")) -> Iterator[pa.RecordBatch]:
    """The rows of `rows_sql` in bucket order, then `keys` order, in bounded memory.

    `rows_sql` yields a `bucket` column (buckets are ranges of consecutive documents sized to fit
    memory). Pass 1 streams the unordered rows into one Parquet file per bucket (row groups of at
    most ~64 MiB over all buckets wait in memory); pass 2 reads one bucket at a time and sorts it
    in memory. A global ORDER BY in DuckDB failed at 1M pages under a 409 MiB limit (its merge pinned more blocks than the limit held).
    """
    reader = con.sql(rows_sql, params=params).to_arrow_reader(BATCH_ROWS)
    root = scratch / "buckets"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    writers: dict[int, pq.ParquetWriter] = {}
    buffers: dict[int, list[pa.Table]] = defaultdict(list)
    buffered: dict[int, int] = defaultdict(int)
    # What waits for its bucket's next row group stays under ~64 MiB across all buckets.
    flush_bytes = max(1 << 20, (64 << 20) // max(1, n_buckets))

    def flush(b: int) -> None:
        table = pa.concat_tables(buffers.pop(b))
        if b not in writers:
            writers[b] = pq.ParquetWriter(root / f"bucket={b}", table.schema, compression="lz4")
        writers[b].write_table(table)
        buffered.pop(b, None)

    try:
        for batch in reader:
            buckets = batch.column("bucket").to_numpy(zero_copy_only=False)
            rows = pa.Table.from_batches([batch]).drop_columns(["bucket"])
            for b in np.unique(buckets).tolist():
                part = rows.filter(pa.array(buckets == b))
                buffers[b].append(part)
                buffered[b] += part.nbytes
                if buffered[b] >= flush_bytes:
                    flush(b)
        for b in list(buffers):
            flush(b)
    finally:
        for w in writers.values():
            w.close()
    for b in range(n_buckets):
        part = root / f"bucket={b}"
        if not part.is_file():
            continue  # bucket numbers skipped by a document longer than a bucket
        table = pq.read_table(part).sort_by([(k, "ascending") for k in keys])
        yield from table.to_batches(max_chunksize=BATCH_ROWS)
        del table
        part.unlink()
