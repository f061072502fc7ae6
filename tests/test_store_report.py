"""The end-of-job report: documents with failed pages by name, unreadable and duplicate inputs,
and the full list in failures.jsonl (removed again once a retry fixed everything)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from nougat_dist.store import report


def _output(tmp_path, statuses: dict[str, list[str]]):
    out = tmp_path / "out"
    (out / "pages").mkdir(parents=True)
    pq.write_table(pa.table({
        "doc_id": ["a", "b", "a", "c", "z"],
        "source": ["/in/a.pdf", "/in/b.pdf", "/in/copy-of-a.pdf", "/in/books.rar", "/in/x.pdf"],
        "member": [None, None, None, "ch1.pdf", None],
        "error": [None, None, None, None, "not a PDF (starts with b'GIF8')"],
    }), out / "manifest.parquet")
    rows = [(d, i + 1, s) for d, ss in statuses.items() for i, s in enumerate(ss)]
    rows.append(("z", 0, "error"))  # an unreadable input's one row
    pq.write_table(pa.table({
        "doc_id": [r[0] for r in rows], "page": [r[1] for r in rows],
        "status": [r[2] for r in rows],
        "error": [None if r[2] in ("ok", "empty") else f"{r[2]} on page {r[1]}" for r in rows],
    }), out / "pages" / "part-r00000-000000-t.parquet")
    return out


def test_report_names_failed_unreadable_and_duplicate_inputs(tmp_path):
    out = _output(tmp_path, {"a": ["ok", "fail", "ok"], "b": ["ok", "ok"],
                             "c": ["render_error", "empty", "error"]})
    rep = report.build(out)
    assert rep.failed_docs == {"/in/a.pdf": {"fail": 1},
                               "/in/books.rar!ch1.pdf": {"render_error": 1, "error": 1}}
    assert rep.unreadable == {"/in/x.pdf": "not a PDF (starts with b'GIF8')"}
    assert rep.duplicates == {"/in/a.pdf": ["/in/copy-of-a.pdf"]} and rep.failed_pages == 3
    text = "\n".join(rep.lines(out, shown=2))
    assert "3 document(s) need a look (3 failed page(s), 1 unreadable): /in/x.pdf, /in/a.pdf and 1 more" in text
    assert str(out / "failures.jsonl") in text
    assert "1 input(s) are byte-identical to another input and were OCR'd once: /in/copy-of-a.pdf = /in/a.pdf" in text
    listed = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert listed[0] == {"document": "/in/x.pdf", "unreadable": "not a PDF (starts with b'GIF8')"}
    pages = {d["document"]: [(p["page"], p["status"]) for p in d["pages"]] for d in listed[1:]}
    assert pages == {"/in/a.pdf": [(2, "fail")], "/in/books.rar!ch1.pdf": [(1, "render_error"), (3, "error")]}


def test_a_clean_output_says_nothing_and_drops_an_old_failures_file(tmp_path):
    out = _output(tmp_path, {"a": ["ok"], "b": ["ok", "empty"], "c": ["ok"]})
    (out / "failures.jsonl").write_text('{"document": "/in/a.pdf"}\n')
    pq.write_table(pa.table({"doc_id": ["a", "b", "c"], "source": ["/in/a.pdf", "/in/b.pdf", "/in/c.pdf"],
                             "member": pa.nulls(3, pa.string()), "error": pa.nulls(3, pa.string())}),
                   out / "manifest.parquet")
    rep = report.build(out)
    assert rep.lines(out) == [] and not (out / "failures.jsonl").exists()
