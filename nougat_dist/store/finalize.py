"""End of a job (rank 0): drop duplicate units from raced steals, write documents.parquet."""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nougat_dist.store.layout import DOCUMENTS_FILE, OutputDir  # noqa: F401 (re-exported)
from nougat_dist.store.index import chunk_paths, committed_units
from nougat_dist.store.manifest import DocEntry, parse_unit_key
from nougat_dist.store.chunks import DOCUMENTS_SCHEMA, PAGES_SCHEMA, UNITS_KEY, atomic_write_table, chunk_units

log = logging.getLogger(__name__)

FAILED_STATUSES = ("fail", "render_error", "error")


def drop_duplicate_units(out_dir: Path) -> int:
    """Keep each unit in the first chunk that commits it; rewrite later chunks without it.

    Each rewrite is atomic and keeps the chunk's unit list in step with its rows, so a crash in
    the middle leaves a state that the next gather finishes. Returns rows removed.
    """
    dupes: dict[Path, list[str]] = defaultdict(list)
    for key, paths in committed_units(out_dir).items():
        for p in paths[1:]:
            dupes[p].append(key)
    removed = 0
    for path, keys in sorted(dupes.items()):
        table = pq.read_table(path, schema=PAGES_SCHEMA)
        drop = pa.array([False] * table.num_rows)
        for key in keys:
            doc_id, first, last = parse_unit_key(key)
            in_unit = pc.and_(pc.equal(table["doc_id"], doc_id),
                              pc.and_(pc.greater_equal(table["page"], first),
                                      pc.less_equal(table["page"], last)))
            drop = pc.or_(drop, in_unit)
        kept = table.filter(pc.invert(drop))
        units = [k for k in chunk_units(path) if k not in set(keys)]
        removed += table.num_rows - kept.num_rows
        if units:
            atomic_write_table(kept, path, {UNITS_KEY: json.dumps(units).encode()})
        else:
            path.unlink()
        log.info("removed %d duplicate row(s) of %d raced unit(s) from %s",
                 table.num_rows - kept.num_rows, len(keys), path.name)
    return removed


def read_pages(out_dir: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """All committed page rows (one table; schema from PAGES_SCHEMA)."""
    paths = chunk_paths(out_dir)
    if not paths:
        return PAGES_SCHEMA.empty_table() if columns is None else PAGES_SCHEMA.empty_table().select(columns)
    return pa.concat_tables(pq.read_table(p, schema=PAGES_SCHEMA, columns=columns) for p in paths)


def join_pages(texts: Sequence[str]) -> str:
    """A document's text from its pages, joined exactly as nougat's CLI writes its .mmd file."""
    out = "".join(texts).strip()
    return re.sub(r"\n{3,}", "\n\n", out).strip()


def page_text_for_document(page: int, text: str, status: str) -> str:
    # A page the stock CLI would drop silently still leaves a visible gap marker in the document.
    if status == "render_error":
        return f"\n\n[MISSING_PAGE_FAIL:{page}]\n\n"
    return text


def write_documents(out_dir: Path, entries: Sequence[DocEntry]) -> pa.Table:
    """One row per unique document with its joined text; returns the table written."""
    pages = read_pages(out_dir, ["doc_id", "page", "text", "status"]).to_pydict()
    by_doc: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for doc_id, page, text, status in zip(pages["doc_id"], pages["page"], pages["text"], pages["status"]):
        by_doc[doc_id].append((page, text, status))
    dup_sources: dict[str, list[str]] = defaultdict(list)
    firsts: list[DocEntry] = []
    for e in entries:  # the first occurrence of a doc_id is its document, the rest duplicates
        if e.doc_id in dup_sources:
            dup_sources[e.doc_id].append(e.source if e.member is None else f"{e.source}::{e.member}")
        else:
            dup_sources[e.doc_id] = []
            firsts.append(e)
    rows = []
    for e in firsts:
        got = sorted(by_doc.get(e.doc_id, []))
        rows.append({
            "doc_id": e.doc_id, "source": e.source, "member": e.member, "n_pages": e.n_pages,
            "n_failed": sum(1 for _, _, s in got if s in FAILED_STATUSES),
            "text": join_pages([page_text_for_document(p, t, s) for p, t, s in got if p > 0]),
            "duplicates": dup_sources[e.doc_id],
        })
    table = pa.Table.from_pylist(rows, schema=DOCUMENTS_SCHEMA)
    atomic_write_table(table, OutputDir(out_dir).documents)
    return table


def status_counts(out_dir: Path) -> dict[str, int]:
    statuses = read_pages(out_dir, ["status"])["status"].to_pylist()
    counts: dict[str, int] = defaultdict(int)
    for s in statuses:
        counts[s] += 1
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
