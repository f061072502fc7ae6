"""The output directory's layout is spelled once: every module reads its paths from OutputDir."""

from __future__ import annotations

import shutil
from pathlib import Path

from nougat_dist.store import finalize, manifest, status
from nougat_dist.store.layout import OutputDir


def test_paths_are_under_the_root(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    paths = [out.pages, out.manifest, out.documents, out.status, out.stats, out.clean, out.chunks,
             out.logs, out.lease, out.rank_log(3), out.scratch, out.legacy_documents,
             out.clean_pages, out.clean_documents, out.clean_dropped, out.clean_report, out.post]
    assert all(p.is_relative_to(tmp_path) for p in paths)
    assert len(set(paths)) == len(paths)
    assert set(out.derived()) == {out.documents, out.legacy_documents, out.stats, out.status,
                                  out.failures, out.clean, out.chunks, out.post}


def test_invalidation_keeps_published_increments_when_pages_are_only_added(tmp_path: Path) -> None:
    from nougat_dist.store.index import invalidate_derived

    out = OutputDir(tmp_path)

    def make() -> None:
        for d in (out.post, out.clean_pages, out.clean_dropped, out.chunks, out.documents):
            d.mkdir(parents=True, exist_ok=True)
            (d / "train-i00000-00000.parquet").write_bytes(b"x")
        for f in (out.stats, out.clean_report, out.status):
            f.write_text("{}")

    make()
    removed = invalidate_derived(tmp_path, keep_published=True)
    assert set(removed) == {out.documents, out.stats, out.status, out.clean_report}
    assert all((d / "train-i00000-00000.parquet").is_file()
               for d in (out.post, out.clean_pages, out.clean_dropped, out.chunks))
    make()
    invalidate_derived(tmp_path)  # the pages change: every derived output goes
    assert not any(p.exists() for p in out.derived())
    make()
    shutil.rmtree(out.post)  # no ledger: clean/ and chunks/ were made after the job, they go
    invalidate_derived(tmp_path, keep_published=True)
    assert not any(p.exists() for p in out.derived())


def test_modules_write_where_the_layout_says(tmp_path: Path) -> None:
    entries = [manifest.DocEntry("d", "a.pdf", None, 1, 10, "d")]
    manifest.write(tmp_path, entries)
    finalize.write_documents(tmp_path, entries)
    out = OutputDir(tmp_path)
    assert out.manifest.is_file() and out.documents.is_dir()
    assert manifest.load(tmp_path) is not None
    assert status.STATUS_FILE == out.status.name
