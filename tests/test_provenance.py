"""Where an output came from: nougat-dist's version and commit, the runs that made its pages and
when (stats.json and page rows), the PDFs' metadata, and sources named relative to their input."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

from conftest import ROOT, run_launch
from nougat_dist.provenance import git_commit
from nougat_dist.store.finalize import read_documents, read_pages


def test_stats_name_version_and_commit(sample_pdfs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_launch(["--input", str(sample_pdfs[0]), "--output", str(out), "--test-fake-model", "delay=0"])
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
    run_launch(["--input", str(first), "--output", str(out), "--test-fake-model", "delay=0"])
    s1 = json.loads((out / "stats.json").read_text())
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", s1["run_id"])
    for key in ("started_at", "finished_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", s1[key])
    assert s1["started_at"] <= s1["finished_at"]
    pages1 = read_pages(out)
    assert pages1.num_rows > 0 and set(pages1["run_id"].to_pylist()) == {s1["run_id"]}
    assert pages1["ocr_at"].null_count == 0
    assert [r["run_id"] for r in s1["runs"]] == [s1["run_id"]]
    assert s1["runs"][0]["pages"] == pages1.num_rows
    assert s1["attempts"][-1]["run_id"] == s1["run_id"]

    old_rows = _strip_provenance(out)
    assert old_rows == pages1.num_rows
    run_launch(["--input", str(first), str(second), "--output", str(out),
                "--test-fake-model", "delay=0"])
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
