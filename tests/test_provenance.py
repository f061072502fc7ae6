"""Where an output came from: nougat-dist's version and commit, the runs that made its pages and
when (stats.json and page rows), the PDFs' metadata, and sources named relative to their input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conftest import ROOT, run_launch
from nougat_dist.inputs.inspect import _text, inspect, pdf_date
from nougat_dist.inputs.sources import Source, discover
from nougat_dist.provenance import git_commit
from nougat_dist.store import finalize
from nougat_dist.store.finalize import read_documents, read_pages
from nougat_dist.store.manifest import to_table
from testing import fake_model

FAKE = fake_model.env("delay=0")


def test_stats_name_version_and_commit(sample_pdfs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_launch(["--input", str(sample_pdfs[0]), "--output", str(out)],
               env=fake_model.env("delay=0"))
    versions = json.loads((out / "stats.json").read_text())["versions"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert versions["nougat-dist-commit"].split("+")[0] == head
    assert "nougat-dist" in versions


def test_no_commit_outside_a_checkout(tmp_path: Path) -> None:
    assert git_commit(tmp_path / "nougat_dist") is None


def _strip_provenance(out: Path) -> int:
    """Rewrite every committed chunk as a release before run ids wrote it: without the
    run_id/ocr_at columns, footer (unit list) kept. Returns the rows so rewritten."""
    rows = 0
    for p in sorted((out / "pages").glob("part-*.parquet")):
        table = pq.read_table(p)
        old = table.drop_columns(["run_id", "ocr_at"])
        pq.write_table(old.replace_schema_metadata(table.schema.metadata), p)
        rows += old.num_rows
    return rows


def test_run_ids_in_rows_and_stats_across_a_resume(sample_pdfs: list[Path], tmp_path: Path) -> None:
    """Each launch is a run: its pages carry its id and OCR time, stats.json names it with its
    start and end and lists every run whose pages the output holds. Chunks of a release without
    these columns (simulated by dropping them) are still read: their pages count under run null."""
    out = tmp_path / "out"
    first, second = sample_pdfs[0], sample_pdfs[1]
    # Two ranks, one page per unit: both commit pages, under the one run id rank 0 made.
    run_launch(["--input", str(first), "--output", str(out), "--unit-pages", "1", "--device", "cpu"],
               nproc=2, env=FAKE)
    s1 = json.loads((out / "stats.json").read_text())
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", s1["run_id"])
    for key in ("started_at", "finished_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", s1[key])
    assert s1["started_at"] <= s1["finished_at"]
    pages1 = read_pages(out)
    assert pages1.num_rows > 0 and set(pages1["run_id"].to_pylist()) == {s1["run_id"]}
    assert set(pages1["rank"].to_pylist()) == {0, 1}
    assert pages1["ocr_at"].null_count == 0
    assert [r["run_id"] for r in s1["runs"]] == [s1["run_id"]]
    assert s1["runs"][0]["pages"] == pages1.num_rows
    assert s1["attempts"][-1]["run_id"] == s1["run_id"]

    old_rows = _strip_provenance(out)
    assert old_rows == pages1.num_rows
    run_launch(["--input", str(first), str(second), "--output", str(out)], env=FAKE)
    s2 = json.loads((out / "stats.json").read_text())
    assert s2["run_id"] != s1["run_id"] and s2["complete"]
    pages2 = read_pages(out)
    new = pages2.filter(pc.is_valid(pages2["run_id"]))
    assert new.num_rows == pages2.num_rows - old_rows > 0  # only the second input was OCR'd
    assert set(new["run_id"].to_pylist()) == {s2["run_id"]}
    assert new["ocr_at"].null_count == 0
    runs = {r["run_id"]: r for r in s2["runs"]}
    assert set(runs) == {None, s2["run_id"]}
    assert runs[None]["pages"] == old_rows and runs[s2["run_id"]]["pages"] == new.num_rows
    assert runs[s2["run_id"]]["exit"] == "complete"
    # documents/ still has every document of both runs
    assert read_documents(out).num_rows == 2


def _as_earlier_release(out: Path) -> None:
    """Rewrite an output as a release before relative sources wrote it: the manifest's `source`
    is the path as found and it has no location/metadata columns; the page rows carry that path
    and no run columns."""
    m = pq.read_table(out / "manifest.parquet")
    old = m.set_column(m.schema.get_field_index("source"), "source", m["location"])
    old = old.drop_columns(["location", "pdf", "page_width", "page_height", "page_rotation"])
    pq.write_table(old, out / "manifest.parquet")
    where = dict(zip(m["doc_id"].to_pylist(), m["location"].to_pylist()))
    for p in sorted((out / "pages").glob("part-*.parquet")):
        t = pq.read_table(p)
        paths = pa.array([where[d] for d in t["doc_id"].to_pylist()])
        t = t.set_column(t.schema.get_field_index("source"), "source", paths)
        t = t.drop_columns(["run_id", "ocr_at"]).replace_schema_metadata(t.schema.metadata)
        pq.write_table(t, p)


def test_an_earlier_releases_output_resumes_without_redoing_anything(
        sample_pdfs: list[Path], tmp_path: Path) -> None:
    """An output written before sources were relative (absolute `source`, no `location`, no
    metadata) is finalized as it is, and resumed without redoing or duplicating a page; the
    manifest is then renamed to relative sources and documents/ follows. The pages keep the
    text they were committed with; runs are compared without the provenance columns."""
    inp = tmp_path / "in"
    inp.mkdir()
    for p in sample_pdfs[:2]:
        shutil.copy(p, inp / p.name)
    out = tmp_path / "out"
    args = ["--input", str(inp), "--output", str(out)]
    run_launch(args, env=FAKE)
    _as_earlier_release(out)
    before = read_pages(out, ["doc_id", "page", "text", "status"]).sort_by([("doc_id", "ascending"),
                                                                            ("page", "ascending")])
    assert before.num_rows > 0
    # `nougat-dist finalize` reads the older manifest as it is (its missing columns as nulls).
    finalize.finalize(out)
    docs = read_documents(out)
    assert docs.num_rows == 2 and docs["pdf"].null_count == 2
    assert all(s.startswith(str(inp)) for s in docs["source"].to_pylist())

    log = run_launch(args, env=FAKE).stderr
    # Matched by location: nothing new, nothing hashed again (the manifest is only renamed).
    assert "inputs since the manifest was written: 0 new, 0 hashed again" in log
    s = json.loads((out / "stats.json").read_text())
    assert s["pages_this_run"] == 0 and s["duplicate_rows_removed"] == 0
    after = read_pages(out, ["doc_id", "page", "text", "status"]).sort_by([("doc_id", "ascending"),
                                                                           ("page", "ascending")])
    assert after.equals(before)
    m = pq.read_table(out / "manifest.parquet")
    assert sorted(m["source"].to_pylist()) == sorted(p.name for p in sample_pdfs[:2])
    assert sorted(m["location"].to_pylist()) == sorted(str(inp / p.name) for p in sample_pdfs[:2])
    assert sorted(read_documents(out)["source"].to_pylist()) == sorted(m["source"].to_pylist())
    assert [r["run_id"] for r in s["runs"]] == [None]  # every page is the earlier release's

    # --absolute-source renames them back to the absolute paths, still without redoing a page.
    run_launch([*args, "--absolute-source"], env=FAKE)
    assert json.loads((out / "stats.json").read_text())["pages_this_run"] == 0
    m = pq.read_table(out / "manifest.parquet")
    assert m["source"].to_pylist() == m["location"].to_pylist()
    assert sorted(read_documents(out)["source"].to_pylist()) == sorted(m["location"].to_pylist())


def test_pdf_metadata_and_page_geometry_in_the_manifest(sample_pdfs: list[Path],
                                                        tmp_path: Path) -> None:
    """Title, author, dates, producer and page sizes/rotations as the PDF says them, from a file
    fpdf2 writes with known values (a rotated page included); odd values never fail a document."""
    from fpdf import FPDF

    pdf = FPDF(unit="pt", format=(300, 400))
    pdf.set_title("Über Titel")
    pdf.set_author("A. Author")
    pdf.set_producer("maker 1.0")
    pdf.set_creation_date(datetime(2023, 5, 6, 7, 8, 9, tzinfo=timezone.utc))
    pdf.add_page()
    pdf.add_page(orientation="L")
    path = tmp_path / "meta.pdf"
    pdf.output(str(path))
    assert b"/Rotate" not in path.read_bytes()  # read without pypdf: no page is rotated
    assert inspect(Source(str(path))).page_rotation == [0, 0]
    # A rotated third page, written by pypdf.
    import pypdf

    w = pypdf.PdfWriter(clone_from=pypdf.PdfReader(path))
    w.add_blank_page(200, 100).rotate(90)
    w.write(str(path))
    e = inspect(Source(str(path), root=str(tmp_path)))
    assert e.error is None and e.n_pages == 3 and e.source == "meta.pdf"
    assert e.pdf["title"] == "Über Titel" and e.pdf["author"] == "A. Author"
    assert e.pdf["created"] == "2023-05-06T07:08:09Z" and e.pdf["subject"] is None
    assert [round(x) for x in e.page_width] == [300, 400, 100]  # displayed: rotation applied
    assert [round(x) for x in e.page_height] == [400, 300, 200]
    assert e.page_rotation == [0, 0, 90]
    # Manifest round trip keeps it.
    table = to_table([e])
    assert table["pdf"].to_pylist()[0]["producer"] in ("maker 1.0", "pypdf")


def test_odd_pdf_dates_and_text_become_null_or_replaced(sample_pdfs: list[Path],
                                                        tmp_path: Path) -> None:
    import pypdf
    from pypdf.generic import ByteStringObject, NameObject, TextStringObject

    w = pypdf.PdfWriter(clone_from=pypdf.PdfReader(sample_pdfs[0]))
    # A UTF-16 title with a lone surrogate, and a date that is not one.
    w.add_metadata({"/Title": ByteStringObject(b"\xfe\xff\xd8\x00\x00A"),
                    "/CreationDate": TextStringObject("D:20241399"),
                    NameObject("/ModDate"): TextStringObject("last tuesday")})
    odd = tmp_path / "odd.pdf"
    w.write(str(odd))
    e = inspect(Source(str(odd)))
    assert e.error is None and e.n_pages > 0
    assert e.pdf["title"].endswith("A") and e.pdf["created"] is None and e.pdf["modified"] is None
    to_table([e])  # stored as valid text
    assert pdf_date("D:20240102030405+05'30'") == "2024-01-02T03:04:05+05:30"
    assert pdf_date("D:2024") == "2024-01-01T00:00:00"
    assert pdf_date("D:20241399999999") is None and pdf_date("yesterday") is None
    assert _text("caf\udce9") == "caf?" and _text("") is None and _text("x" * 5000) == "x" * 2000


def test_source_relative_to_its_input(tmp_path: Path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for rel in ("a.pdf", "sub/b.pdf"):
        (tmp_path / "in" / rel).write_bytes(b"%PDF-1.4")
    lst = tmp_path / "in" / "list.txt"
    lst.write_text("sub/b.pdf\n/elsewhere/c.pdf\nhttps://host.org/x/y/d.pdf?token=secret\n")
    found = discover([str(tmp_path / "in"), str(tmp_path / "in" / "*.pdf"), str(lst)])
    named = {s.source: s.stored_source() for s in found}
    assert named[str(tmp_path / "in" / "a.pdf")] == "a.pdf"
    assert named[str(tmp_path / "in" / "sub" / "b.pdf")] == "sub/b.pdf"
    assert named["/elsewhere/c.pdf"] == "c.pdf"  # outside the list's folder: its name
    assert named["https://host.org/x/y/d.pdf?token=secret"] == "d.pdf"  # no query
    url = next(s for s in found if s.source.startswith("https"))
    assert url.stored_source(absolute=True) == "https://host.org/x/y/d.pdf?token=secret"
    assert Source(str(tmp_path / "in" / "a.pdf"), root="in").stored_source(absolute=True) == \
        str(tmp_path / "in" / "a.pdf")
    hf = Source("hf://datasets/me/r@abc/papers/2024/p.pdf", root="papers/")
    assert hf.stored_source() == "2024/p.pdf"
