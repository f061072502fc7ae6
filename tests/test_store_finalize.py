"""Streaming finalize: the same documents rows as the former in-memory join, sharded, idempotent."""

from __future__ import annotations

import json
import random
import shutil
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from nougat_dist.__main__ import main
from nougat_dist.store import finalize, index, manifest, shards
from nougat_dist.store.chunks import (PAGES_SCHEMA, UNITS_KEY, ChunkWriter,
                                      atomic_write_table, chunk_units)
from nougat_dist.store.layout import OutputDir
from nougat_dist.store.manifest import DocEntry, parse_unit_key, unit_key


# --- the in-memory join as it was, kept as the reference ------------------------------------------

def _reference_drop_duplicate_pages(out_dir: Path) -> int:
    """The in-memory page dedup of releases before DuckDB: first chunk, first row wins."""
    seen: set[tuple[str, int]] = set()
    removed = 0
    for path in index.chunk_paths(out_dir):
        table = pq.read_table(path)
        keep = []
        for k in zip(table["doc_id"].to_pylist(), table["page"].to_pylist()):
            keep.append(k not in seen)
            seen.add(k)
        if sum(keep) < len(keep):
            removed += len(keep) - sum(keep)
            if sum(keep):
                pq.write_table(table.filter(pa.array(keep)), path)
            else:
                path.unlink()
    return removed


def _reference_drop_duplicate_units(out_dir: Path) -> int:
    dupes: dict[Path, list[str]] = defaultdict(list)
    for key, paths in index.committed_units(out_dir).items():
        for p in paths[1:]:
            dupes[p].append(key)
    removed = 0
    for path, keys in sorted(dupes.items()):
        table = pq.read_table(path, schema=PAGES_SCHEMA)
        drop = pa.array([False] * table.num_rows)
        for key in keys:
            doc_id, first, last = parse_unit_key(key)
            drop = pc.or_(drop, pc.and_(pc.equal(table["doc_id"], doc_id),
                                        pc.and_(pc.greater_equal(table["page"], first),
                                                pc.less_equal(table["page"], last))))
        kept = table.filter(pc.invert(drop))
        units = [k for k in chunk_units(path) if k not in set(keys)]
        removed += table.num_rows - kept.num_rows
        if units:
            atomic_write_table(kept, path, {UNITS_KEY: json.dumps(units).encode()})
        else:
            path.unlink()
    return removed


#: The manifest's `pdf` of one document: documents/ carries it as it is.
_PDF_INFO = {"title": "Long", "author": "A. Author", "subject": None, "keywords": None,
             "creator": None, "producer": "x", "created": "2024-01-01T00:00:00Z", "modified": None}


def _reference_documents(out_dir: Path, entries: list[DocEntry]) -> list[dict]:
    removed = _reference_drop_duplicate_units(out_dir) + _reference_drop_duplicate_pages(out_dir)
    paths = index.chunk_paths(out_dir)
    pages = pa.concat_tables(pq.read_table(p, schema=PAGES_SCHEMA) for p in paths).to_pydict()
    by_doc: dict[str, list[tuple[int, str, str]]] = defaultdict(list)
    for doc_id, page, text, status in zip(pages["doc_id"], pages["page"], pages["text"], pages["status"]):
        by_doc[doc_id].append((page, text, status))
    dup_sources: dict[str, list[str]] = defaultdict(list)
    firsts: list[DocEntry] = []
    for e in entries:
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
            "n_failed": sum(1 for _, _, s in got if s in finalize.FAILED_STATUSES),
            "text": finalize.join_pages([finalize.page_text_for_document(p, t, s)
                                         for p, t, s in got if p > 0]),
            "duplicates": dup_sources[e.doc_id],
            "pdf": e.pdf,
        })
    return [*rows, {"removed": removed}]


# --- a committed output with every case ------------------------------------------------------------

def _row(doc_id: str, page: int, text: str, status: str = "ok", rank: int = 0) -> dict:
    return {"doc_id": doc_id, "source": f"/in/{doc_id}.pdf", "member": None, "page": page,
            "text": text, "status": status, "error": None if status == "ok" else "x",
            "n_tokens": None, "elapsed_ms": 1.0, "rank": rank, "model": "m", "dtype": "bf16"}


def _commit(out: Path, rank: int, units: dict[str, list[dict]]) -> None:
    w = ChunkWriter(out, rank)
    for key, rows in units.items():
        w.expect(key, len(rows))
        for r in rows:
            w.add(key, r)
    assert w.commit() is not None


def write_committed(out: Path) -> list[DocEntry]:
    """A job's output dir as the writer commits it: duplicates of every kind, failures, markers,
    whitespace the CLI's strip() removes, a document split over units, ranks and chunks."""
    entries = [
        DocEntry("long", "/in/long.pdf", None, 7, 1, "long", pdf=_PDF_INFO),
        DocEntry("dup", "/in/a.zip", "x/dup.pdf", 2, 1, "dup"),
        DocEntry("bad", "/in/bad.pdf", None, 0, 1, "bad", "not a PDF"),
        DocEntry("long", "/in/copy-of-long.pdf", None, 7, 1, "long"),
        DocEntry("none", "/in/none.pdf", None, 3, 1, "none"),  # nothing committed
        DocEntry("dup", "/in/b.rar", "dup.pdf", 2, 1, "dup"),
        DocEntry("ws", "/in/ws.pdf", None, 2, 1, "ws"),
    ]
    manifest.write(out, entries)
    long = {p: _row("long", p, f"\n# Page {p}\n\nBody {p}.\n\n\n\n\nTail {p} ") for p in range(1, 8)}
    long[3] = _row("long", 3, "", "render_error")
    long[4] = _row("long", 4, "\n\n[MISSING_PAGE_EMPTY:4]\n\n", "empty")
    long[5] = _row("long", 5, "", "fail")
    # rank 1 commits units 5-7 then 1-4 (two commits); rank 0 raced on 1-4 and committed it too
    _commit(out, 1, {unit_key("long", 5, 7): [long[7], long[5], long[6]]})
    _commit(out, 1, {unit_key("long", 1, 4): [long[p] for p in (1, 2, 3, 4)]})
    _commit(out, 0, {unit_key("long", 1, 4): [dict(long[p], rank=0, text="raced " + long[p]["text"])
                                             for p in (1, 2, 3, 4)],
                     unit_key("bad", 0, 0): [_row("bad", 0, "", "error")]})
    # a page committed again under another unit size (a changed --unit-pages)
    _commit(out, 0, {unit_key("dup", 1, 2): [_row("dup", 1, "\u3000 one"), _row("dup", 2, "two\xa0 ")]})
    _commit(out, 2, {unit_key("dup", 2, 2): [_row("dup", 2, "two again")],
                     unit_key("ws", 1, 2): [_row("ws", 1, " \t\n\n\n\nA\n\n\n"), _row("ws", 2, "\n\n\nB\u2028")]})
    return entries


def test_streaming_finalize_gives_the_in_memory_join(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    entries = write_committed(ref)
    shutil.copytree(ref, out)
    expected = _reference_documents(ref, entries)
    assert expected[-1] == {"removed": 5}  # the raced unit (4 rows) and the re-committed page
    monkeypatch.setattr(finalize, "BATCH_ROWS", 3)  # documents span sorted batches
    # buckets of 2 pages: several buckets, one document larger than a bucket
    monkeypatch.setattr(finalize, "pages_per_bucket", lambda paths, budget: 2)
    result = finalize.finalize(out, memory_budget=256 * 2**20)
    got = finalize.read_documents(out).to_pylist()
    assert got == expected[:-1]
    assert result.duplicate_rows_removed == 5 and result.documents == 5
    assert result.pages_by_status == {"ok": 8, "render_error": 1, "empty": 1, "fail": 1, "error": 1}
    long = got[0]
    # each page once: the first chunk by name (rank 0's raced copy) wins, as at commit
    assert long["text"].count("Body 1.") == 1 and long["text"].startswith("raced")
    assert "[MISSING_PAGE_FAIL:3]" in long["text"] and "[MISSING_PAGE_EMPTY:4]" in long["text"]
    assert long["n_failed"] == 2 and long["duplicates"] == ["/in/copy-of-long.pdf"]
    assert got[1]["duplicates"] == ["/in/b.rar::dup.pdf"] and got[1]["text"] == "onetwo"
    assert got[4]["text"] == "A\n\nB"
    # Idempotent: a second finalize finds nothing to drop and writes the same rows.
    again = finalize.finalize(out, memory_budget=256 * 2**20)
    assert again.duplicate_rows_removed == 0
    assert finalize.read_documents(out).to_pylist() == got
    assert not OutputDir(out).scratch.exists()


def test_documents_are_hub_style_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [DocEntry(f"d{i:03d}", f"/in/{i}.pdf", None, 2, 1, f"d{i:03d}") for i in range(60)]
    manifest.write(tmp_path, entries)
    rng = random.Random(0)
    _commit(tmp_path, 0, {unit_key(e.doc_id, 1, 2): [_row(e.doc_id, p, rng.randbytes(2000).hex())
                                                     for p in (1, 2)] for e in entries})
    (tmp_path / "documents.parquet").write_bytes(b"an older release's single file")
    monkeypatch.setattr(shards, "ROW_GROUP_BYTES", 20_000)
    monkeypatch.setattr(shards, "MAX_SHARD_BYTES", 30_000)
    finalize.finalize(tmp_path)
    paths = shards.shard_paths(OutputDir(tmp_path).documents)
    n = len(paths)
    assert n > 1
    assert [p.name for p in paths] == [shards.shard_name("train", i, n) for i in range(n)]
    assert not (tmp_path / "documents.parquet").exists()
    table = pq.read_table(OutputDir(tmp_path).documents)
    assert table.column("doc_id").to_pylist() == [e.doc_id for e in entries]


def test_shard_writer_bounds_shards_and_row_groups(tmp_path: Path) -> None:
    schema = pa.schema([pa.field("i", pa.int64()), pa.field("text", pa.string())])
    target = tmp_path / "t"
    rng = random.Random(0)  # incompressible text, so that file sizes grow with the rows
    with shards.ShardWriter(target, schema, tmp_path / ".scratch", max_shard_bytes=40_000,
                            row_group_bytes=10_000) as w:
        for i in range(0, 400, 10):
            w.write(pa.table({"i": list(range(i, i + 10)),
                              "text": [f"{j:05d}" + rng.randbytes(150).hex() for j in range(i, i + 10)]},
                             schema=schema))
    paths = shards.shard_paths(target)
    assert len(paths) > 1 and paths[-1].name == f"train-{len(paths) - 1:05d}-of-{len(paths):05d}.parquet"
    for p in paths:
        meta = pq.read_metadata(p)
        assert meta.num_row_groups >= 1
        assert all(meta.row_group(g).total_byte_size <= 2 * 10_000 + 5_000 for g in range(meta.num_row_groups))
    assert pq.read_table(target).column("i").to_pylist() == list(range(400))
    # A failed rewrite leaves the previous table in place.
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(target, schema, tmp_path / ".scratch") as w:
            w.write(pa.table({"i": [1], "text": ["x"]}, schema=schema))
            raise RuntimeError("killed")
    assert pq.read_table(target).num_rows == 400


def test_shards_load_with_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    entries = write_committed(tmp_path)
    finalize.finalize(tmp_path)
    pattern = str(OutputDir(tmp_path).documents / "train-*.parquet")
    ds = datasets.load_dataset("parquet", data_files={"train": pattern}, split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds["doc_id"] == ["long", "dup", "bad", "none", "ws"]
    streamed = datasets.load_dataset("parquet", data_files={"train": pattern}, split="train",
                                     streaming=True)
    assert [r["doc_id"] for r in streamed] == ds["doc_id"]
    assert len(entries) == 7


def test_finalize_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_committed(tmp_path)
    assert main(["finalize", str(tmp_path), "--memory-budget", "300MiB"]) == 0
    printed = capsys.readouterr().out
    assert "5 documents" in printed
    stats = json.loads(OutputDir(tmp_path).stats.read_text())
    assert stats["documents"] == 5 and stats["duplicate_rows_removed"] == 5
    assert stats["complete"] is False  # "none" has 3 pages that were never committed
    assert stats["pages_by_status"]["ok"] == 8
    # Run again: same documents, nothing more removed; run fields already there are kept.
    stats["wall_s"] = 12.5
    OutputDir(tmp_path).stats.write_text(json.dumps(stats))
    assert main(["finalize", str(tmp_path)]) == 0
    again = json.loads(OutputDir(tmp_path).stats.read_text())
    assert again["duplicate_rows_removed"] == 0 and again["wall_s"] == 12.5
    assert main(["finalize", str(tmp_path / "nothing")]) == 2
    assert "no manifest.parquet" in capsys.readouterr().err


def test_parse_size() -> None:
    assert finalize.parse_size("1GiB") == 2**30
    assert finalize.parse_size("512 MiB") == 512 * 2**20
    assert finalize.parse_size("2GB") == 2 * 10**9
    assert finalize.parse_size("4096") == 4096
    with pytest.raises(ValueError, match="not a size"):
        finalize.parse_size("lots")


def test_finish_text_is_the_clis_expression() -> None:
    import re

    rng = random.Random(1)
    for _ in range(500):
        s = "".join(rng.choice(["\n", "\n", "\n", " ", "a", "\u3000", "\t", "b\n"]) for _ in range(rng.randint(0, 40)))
        assert finalize.finish_text(s) == re.sub(r"\n{3,}", "\n\n", s.strip()).strip()
