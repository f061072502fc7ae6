"""Page-granular resume: a page committed under one --unit-pages, batch size or world size is
reused by a run with others, and never stored twice."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import run_launch
from nougat_dist.store import finalize, index
from nougat_dist.store import attempts
from nougat_dist.store.chunks import PAGES_SCHEMA, ChunkWriter, chunk_name, chunk_seq
from nougat_dist.store.layout import OutputDir
from testing import fake_model, faults
from testing.samples import write_long_pdf

FAKE = ["--device", "cpu", "--num-workers", "0", "--commit-seconds", "600"]
FAKE_MODEL = fake_model.env("delay=0.01")


def _pages(out: Path) -> dict:
    df = pd.read_parquet(out / "pages")
    keys = list(zip(df.doc_id, df.page))
    assert len(keys) == len(set(keys)), "duplicate (doc_id, page) rows"
    return dict(zip(keys, df.text))



def _drop_duplicate_pages(out_dir: Path) -> int:
    """finalize's page dedup, as the end of a job runs it."""
    con = finalize.connect(out_dir.parent / f"{out_dir.name}-scratch", finalize.DEFAULT_MEMORY_BUDGET)
    try:
        return finalize.drop_duplicate_pages(out_dir, con)
    finally:
        con.close()

def test_unit_pages_batch_size_and_world_size_change_mid_job(tmp_path: Path) -> None:
    write_long_pdf(tmp_path / "in" / "book.pdf", 12)
    base = ["--input", str(tmp_path / "in"), *FAKE]
    ref = tmp_path / "ref"
    run_launch([*base, "--output", str(ref)], env=FAKE_MODEL)
    out = tmp_path / "out"
    # 1 rank, units of 3, killed at its second commit: the first unit (pages 1-3) is committed.
    first = run_launch([*base, "--output", str(out), "--unit-pages", "3", "--commit-pages", "3",
                        "--batch-size", "2"], check=False, env={**FAKE_MODEL, **faults.env("commit:2")})
    assert first.returncode != 0
    committed = index.committed_pages(out)
    n_committed = sum(len(v) for v in committed.values())
    assert 0 < n_committed < 12, f"the kill did not land inside the work: {n_committed} pages"
    # 2 ranks, units of 2, another batch size: unit 3-4 is half done and only page 4 is redone.
    run_launch([*base, "--output", str(out), "--unit-pages", "2", "--batch-size", "3"], nproc=2,
               env=FAKE_MODEL)
    stats = json.loads(OutputDir(out).stats.read_text())
    assert stats["pages_this_run"] == 12 - n_committed
    assert stats["pages_resumed"] == n_committed
    assert _pages(out) == _pages(ref)


def test_finalize_drops_any_duplicate_page(tmp_path: Path) -> None:
    def chunk(name: str, pages: list[int], text: str) -> None:
        rows = [{"doc_id": "d", "source": "a.pdf", "member": None, "page": p, "text": f"{text}{p}",
                 "status": "ok", "error": None, "n_tokens": 1, "elapsed_ms": 1.0, "rank": 0,
                 "model": "m", "dtype": "bf16"} for p in pages]
        out.pages.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=PAGES_SCHEMA), out.pages / name)

    out = OutputDir(tmp_path)
    chunk("part-r00000-000000.parquet", [1, 2, 3], "a")
    chunk("part-r00001-000000.parquet", [3, 4], "b")  # page 3 again, under another unit key
    chunk("part-r00001-000001.parquet", [4], "c")  # only a duplicate: the file goes
    assert _drop_duplicate_pages(tmp_path) == 2
    assert _pages(tmp_path) == {("d", 1): "a1", ("d", 2): "a2", ("d", 3): "a3", ("d", 4): "b4"}
    assert not (out.pages / "part-r00001-000001.parquet").exists()
    assert _drop_duplicate_pages(tmp_path) == 0


def test_chunk_names_carry_the_run_and_old_names_still_count(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    assert chunk_name(3, 7, "slurm12.0-t/x") == "part-r00003-000007-slurm12.0-t_x.parquet"
    assert chunk_seq("part-r00003-000007-slurm12.0-t_x.parquet", 3) == 7
    assert chunk_seq("part-r00003-000007.parquet", 3) == 7  # a chunk of an earlier release
    assert chunk_seq("part-r00003-000007.parquet", 2) is None

    def row(page: int, text: str) -> dict:
        return {"doc_id": "d", "source": "a.pdf", "member": None, "page": page, "text": text,
                "status": "ok", "error": None, "n_tokens": 1, "elapsed_ms": 1.0, "rank": 0,
                "model": "m", "dtype": "bf16"}

    out.pages.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row(1, "old")], schema=PAGES_SCHEMA),
                   out.pages / "part-r00000-000004.parquet")
    # Two writers that picked the same sequence number (a job still writing after its lease
    # was taken over, or a listing that missed a file): neither replaces the other's chunk.
    writers = [ChunkWriter(tmp_path, 0, run_id=run) for run in ("job1.0", "job2.0")]
    assert [w.seq for w in writers] == [5, 5]  # numbering continues after the old name
    for w, text in zip(writers, ("one", "two")):
        w.expect("d:2-2", 1)
        w.add("d:2-2", row(2, text))
        w.commit()
    names = sorted(p.name for p in index.chunk_paths(tmp_path))
    assert names == ["part-r00000-000004.parquet", "part-r00000-000005-job1.0.parquet",
                     "part-r00000-000005-job2.0.parquet"]
    assert index.committed_pages(tmp_path)["d"].tolist() == [1, 2]
    assert _drop_duplicate_pages(tmp_path) == 1 and len(pd.read_parquet(out.pages)) == 2
    # The attempt records attribute both kinds of name by their sequence numbers.
    assert attempts._next_seq(tmp_path, 0) == 6
    assert len(attempts._rank_chunks(tmp_path, 0, 4, 5)) == 1
