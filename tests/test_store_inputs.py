"""Incremental inputs on one output: added, removed, replaced in place, touched; --discard-committed;
a plan that writes nothing; stale derived outputs removed and refused."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import rows, run_launch, stats
from nougat_dist.__main__ import main as stage_main
from nougat_dist.inputs.sources import Source, discover
from nougat_dist.sched.plan import decide_plan, format_plan
from nougat_dist.store import manifest
from nougat_dist.store.chunks import PAGES_SCHEMA, atomic_write_table
from nougat_dist.store.layout import OutputDir
from nougat_dist.store.status import collect
from testing import fake_model, faults
from testing.samples import write_long_pdf

FAKE = ["--device", "cpu", "--num-workers", "0", "--unit-pages", "2"]


@pytest.fixture(autouse=True)
def _fake_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every job this module launches runs the fake model."""
    monkeypatch.setenv(fake_model.MODEL_ENV, fake_model.value("delay=0"))


def _job(tmp_path: Path, docs: dict[str, tuple[int, int]]) -> tuple[Path, Path, list[str]]:
    """Input dir with name -> (pages, seed) PDFs, the output dir and the job's arguments."""
    inp, out = tmp_path / "in", tmp_path / "out"
    for name, (n, seed) in docs.items():
        write_long_pdf(inp / name, n, seed=seed)
    return inp, out, ["--input", str(inp), "--output", str(out), *FAKE]


def _tree(root: Path) -> dict[str, str]:
    """Every file and directory under root with a hash of its bytes (directories: "dir")."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): "dir" if p.is_dir() else
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


def _manifest(out: Path) -> pd.DataFrame:
    return pd.read_parquet(OutputDir(out).manifest)


def test_inputs_added_replaced_removed_touched_then_discarded(tmp_path: Path) -> None:
    """One output through every change of its inputs, each run the same command."""
    inp, out, args = _job(tmp_path, {"a.pdf": (3, 1), "b.pdf": (2, 2)})
    layout = OutputDir(out)
    run_launch(args)

    # Added: only the new document is OCR'd; every committed page and chunk file is reused.
    before = rows(out)
    chunks = {p.name: p.read_bytes() for p in layout.pages.iterdir()}
    write_long_pdf(inp / "c.pdf", 4, seed=3)
    log = run_launch(args).stderr  # no refusal, no --rebuild-manifest
    assert "1 new, 0 hashed again" in log
    s = stats(out)
    assert (s["pages_this_run"], s["pages_resumed"], s["documents"]) == (4, 5, 3)
    after = rows(out)
    assert len(after) == 9 and {k: after[k] for k in before} == before
    assert all((layout.pages / n).read_bytes() == b for n, b in chunks.items())
    # Named relative to the input directory; the manifest keeps where each file was read.
    assert list(_manifest(out).source) == ["a.pdf", "b.pdf", "c.pdf"]
    assert list(_manifest(out).location) == [str(inp / n) for n in ("a.pdf", "b.pdf", "c.pdf")]

    # Replaced in place (same name, new bytes, more pages): a new document; the old rows are
    # set aside, not mixed in.
    old_id = _manifest(out).doc_id[0]
    write_long_pdf(inp / "a.pdf", 5, seed=9)
    run_launch(args)
    m = _manifest(out)
    assert m.n_pages[0] == 5 and m.doc_id[0] != old_id and len(m) == 3
    pages = pd.read_parquet(layout.pages)
    of_a = pages[pages.source == "a.pdf"]
    assert set(of_a.doc_id) == {m.doc_id[0]} and sorted(of_a.page) == [1, 2, 3, 4, 5]
    aside = pd.read_parquet(layout.superseded)
    assert set(aside.doc_id) == {old_id} and len(aside) == 3
    assert stats(out)["pages_this_run"] == 5
    assert pd.read_parquet(layout.documents).set_index("doc_id").n_pages[m.doc_id[0]] == 5

    # Removed from the inputs: kept in the output with its pages, reported, nothing scheduled.
    before = rows(out)
    (inp / "b.pdf").unlink()
    # Touched (new mtime), same bytes: hashed again, same document, nothing redone.
    st = (inp / "c.pdf").stat()
    os.utime(inp / "c.pdf", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    log = run_launch(args).stderr
    assert "0 new, 1 hashed again" in log and "1 no longer given" in log
    assert rows(out) == before and stats(out)["pages_this_run"] == 0
    m = _manifest(out)
    assert [(Path(s).name, r) for s, r in zip(m.source, m.removed)] == [
        ("a.pdf", False), ("c.pdf", False), ("b.pdf", True)]
    assert m.file_mtime_ns[1] == st.st_mtime_ns + 10**9
    assert len(pd.read_parquet(layout.documents)) == 3

    # --discard-committed: every committed chunk set aside, the current inputs done again.
    run_launch([*args, "--discard-committed"])
    assert stats(out)["pages_this_run"] == 9 and len(rows(out)) == 9
    discarded = list(layout.superseded.glob("discarded-*/part-*.parquet"))
    assert len(pd.read_parquet(discarded[0].parent)) == 11  # a 5 + b 2 + c 4
    assert not _manifest(out).removed.any()


def test_diff_inputs(tmp_path: Path) -> None:
    for name, seed in (("a.pdf", 1), ("b.pdf", 2), ("c.pdf", 3)):
        write_long_pdf(tmp_path / name, 2, seed=seed)
    src = {n: Source(str(tmp_path / n)) for n in ("a.pdf", "b.pdf", "c.pdf", "d.pdf")}
    old = manifest.DocTable(manifest.to_table(
        [manifest.inspect(src[n]) for n in ("a.pdf", "b.pdf", "c.pdf")]
        + [manifest.DocEntry("e" * 64, "r.pdf", None, 2, 9, "e" * 64,
                             location="https://x.org/r.pdf")]))
    remote = Source("https://x.org/r.pdf")
    assert manifest.diff_inputs(None, [src["a.pdf"]]).to_inspect == [0]
    same = manifest.diff_inputs(old, [src["a.pdf"], src["b.pdf"], src["c.pdf"], remote])
    assert same.to_inspect == [] and not same.rewrite
    write_long_pdf(tmp_path / "d.pdf", 2, seed=4)
    (tmp_path / "a.pdf").write_bytes((tmp_path / "a.pdf").read_bytes() + b"\n")  # changed
    (tmp_path / "b.pdf").unlink()  # still given, but gone
    ch = manifest.diff_inputs(old, [src["d.pdf"], src["a.pdf"], src["b.pdf"], remote])
    assert ch.to_inspect == [0, 1] and (ch.new, ch.changed) == (1, 1)
    assert ch.vanished.tolist() == [False, False, True, False] and ch.gone.tolist() == [2]
    merged = manifest.merge_inputs(old, ch, {0: manifest.inspect(src["d.pdf"]),
                                             1: manifest.inspect(src["a.pdf"])})
    assert [(Path(e.source).name, bool(e.removed)) for e in merged] == [
        ("d.pdf", False), ("a.pdf", False), ("b.pdf", True), ("r.pdf", False), ("c.pdf", True)]
    assert merged[1].doc_id != old[0].doc_id and merged[2] == dataclasses.replace(old[1], removed=True)
    every = manifest.diff_inputs(old, [src["c.pdf"], remote], recheck=True)
    assert every.to_inspect == [0, 1]


def test_old_manifest_without_stamps_is_read(tmp_path: Path) -> None:
    write_long_pdf(tmp_path / "a.pdf", 2)
    e = manifest.inspect(Source(str(tmp_path / "a.pdf")))
    old_schema = pa.schema([manifest.MANIFEST_SCHEMA.field(c) for c in
                            ("doc_id", "source", "member", "n_pages", "bytes", "sha256", "error")])
    # An earlier release stored the path as found in `source` and had no `location`.
    row = {**{c: getattr(e, c) for c in old_schema.names}, "source": str(tmp_path / "a.pdf")}
    pq.write_table(pa.Table.from_pylist([row], schema=old_schema), OutputDir(tmp_path).manifest)
    loaded = manifest.load(tmp_path)
    assert loaded[0].file_mtime_ns is None and not loaded.removed_array().any()
    ch = manifest.diff_inputs(loaded, [Source(str(tmp_path / "a.pdf"))])
    assert ch.to_inspect == [0]  # hashed once more (same doc_id: its pages are kept)
    assert loaded.upgraded and loaded[0].location == str(tmp_path / "a.pdf")
    assert ch.rewrite and ch.stored == ["a.pdf"]


def test_a_removed_unfinished_document_is_not_scheduled(tmp_path: Path) -> None:
    a = manifest.DocEntry("a" * 64, "a.pdf", None, 4, 10, "a" * 64, removed=True)
    b = manifest.DocEntry("b" * 64, "b.pdf", None, 3, 10, "b" * 64)
    page = {"source": "a.pdf", "member": None, "text": "t", "status": "ok", "error": None,
            "n_tokens": 1, "elapsed_ms": 1.0, "rank": 0, "model": "fake", "dtype": "none"}
    atomic_write_table(pa.Table.from_pylist([{**page, "doc_id": a.doc_id, "page": p} for p in (1, 2)],
                                            schema=PAGES_SCHEMA),
                       OutputDir(tmp_path).pages / "part-r00000-000000.parquet")
    plan = decide_plan(tmp_path, [a, b], 2, 1)
    assert {plan.units[int(j)].doc for j in plan.todo} == {1}  # only b
    assert (plan.total_pages, plan.committed_pages, plan.retired) == (5, 2, 1)
    assert "kept, not given 1 document(s)" in format_plan(plan, 1, 1.0)
    # A copy of a's bytes still given keeps the document going.
    copy = manifest.DocEntry(a.doc_id, "copy.pdf", None, 4, 10, a.doc_id)
    plan = decide_plan(tmp_path, [copy, b, a], 2, 1)
    assert plan.retired == 0 and plan.total_pages == 7


def test_plan_writes_nothing_and_stale_derived_outputs_are_removed(tmp_path: Path) -> None:
    inp, out, args = _job(tmp_path, {"a.pdf": (3, 1), "b.pdf": (2, 2)})
    run_launch(["--plan", *args])
    assert not out.exists(), "a plan created the output dir"
    run_launch(args)
    layout = OutputDir(out)
    assert stage_main(["clean", str(out)]) == 0 and layout.clean.is_dir()
    assert collect(out)["state"] == "finished"

    write_long_pdf(inp / "a.pdf", 4, seed=5)  # replaced in place
    write_long_pdf(inp / "c.pdf", 2, seed=6)  # added
    before = _tree(out)
    assert any(p.startswith("clean/pages/train-") for p in before) and "attempts" in before
    for extra in ([], ["--rebuild-manifest", "--retry-failed", "--redo-other-model",
                       "--discard-committed"]):
        plan = run_launch(["--plan", *args, *extra]).stdout
        assert _tree(out) == before, f"--plan {extra} changed the output dir"
        if not extra:
            assert "3 committed page(s) of files changed in place" in plan
            assert "8 in total, 2 already committed, 6 to do" in plan
    assert "8 in total, 0 already committed, 8 to do" in plan  # --discard-committed

    # Killed at its first commit: the pages change, the job does not finish.
    killed = run_launch(args, check=False, env=faults.env("commit:1"))
    assert killed.returncode != 0
    assert len(pd.read_parquet(layout.pages)) == 2  # b's; a's old rows set aside, none new yet
    left = [p.name for p in layout.derived() if p.exists()]
    assert left in ([], [layout.status.name]), f"stale derived outputs left behind: {left}"
    assert collect(out)["state"] != "finished"
    assert stage_main(["upload", str(out), "org/x", "--dry-run"]) == 2
    assert stage_main(["clean", str(out)]) == 2
    assert stage_main(["upload", str(out), "org/x", "--dry-run", "--allow-partial"]) == 0
    run_launch(args)
    assert collect(out)["state"] == "finished" and stats(out)["pages_total"] == 8
    assert stage_main(["clean", str(out)]) == 0


def test_a_non_utf8_file_name_is_an_error_row_not_a_crash(tmp_path: Path) -> None:
    write_long_pdf(tmp_path / "ok.pdf", 2, seed=1)
    write_long_pdf(tmp_path / "x.pdf", 2, seed=2)
    os.rename(tmp_path / "x.pdf", os.fsencode(tmp_path) + b"/caf\xe9.pdf")
    sources = discover([str(tmp_path)])
    entries = [e for _, e in manifest.build_entries(sources, 0, 1)]
    manifest.write(tmp_path, entries)  # Parquet strings must be UTF-8: this used to raise
    loaded = manifest.load(tmp_path)
    bad = [e for e in loaded if e.error is not None]
    assert [(e.source, e.location) for e in bad] == [("caf\\xe9.pdf", str(tmp_path / "caf\\xe9.pdf"))]
    assert "not valid UTF-8" in bad[0].error and "rename" in bad[0].error
    assert [e.n_pages for e in loaded if e.error is None] == [2]
    # The next run recognises both documents by name: nothing to hash again.
    assert manifest.diff_inputs(loaded, discover([str(tmp_path)])).to_inspect == []
