"""stats.json's decode efficiency from committed page rows (store/finalize.decode_efficiency)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from nougat_dist.store.chunks import PAGES_SCHEMA, atomic_write_table
from nougat_dist.store.finalize import decode_efficiency


def _row(page: int, n_tokens: int | None, batch_steps: int | None, status: str = "ok") -> dict:
    return {"doc_id": "A", "source": "/in/a.pdf", "member": None, "page": page, "text": "t",
            "status": status, "error": None, "n_tokens": n_tokens, "batch_steps": batch_steps,
            "elapsed_ms": 1.0, "rank": 0, "model": "m", "dtype": "bfloat16"}


def test_sums_tokens_over_batch_slots_of_pages_that_have_both(tmp_path: Path) -> None:
    pages = tmp_path / "pages"
    # batch 1: pages of 10 and 30 tokens -> 2 x 30 slots; batch 2: one page of 20 -> 20 slots
    atomic_write_table(pa.Table.from_pylist([_row(1, 10, 30), _row(2, 30, 30)], schema=PAGES_SCHEMA),
                       pages / "part-r00000-000000.parquet")
    # a page that did not render and a fake-model page carry no counts: left out, not zero
    atomic_write_table(pa.Table.from_pylist([_row(3, 20, 20), _row(4, None, None, "render_error"),
                                             _row(5, None, None)], schema=PAGES_SCHEMA),
                       pages / "part-r00001-000000.parquet")
    assert decode_efficiency(tmp_path) == {"efficiency": 0.75, "page_tokens": 60, "batch_slots": 80}


def test_none_without_counts(tmp_path: Path) -> None:
    assert decode_efficiency(tmp_path) == {"efficiency": None, "page_tokens": 0, "batch_slots": 0}
    atomic_write_table(pa.Table.from_pylist([_row(1, None, None)], schema=PAGES_SCHEMA),
                       tmp_path / "pages" / "part-r00000-000000.parquet")
    assert decode_efficiency(tmp_path)["efficiency"] is None
