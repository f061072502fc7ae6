"""A page whose rendering hangs or crashes the renderer costs that page, not the rank or the job."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_launch
from testing import fake_model, faults
from testing.samples import write_sample_pdfs


@pytest.mark.parametrize("kind,reason", [("render-hang", "did not finish within"),
                                         ("render-crash", "renderer crashed")])
def test_hostile_page_becomes_an_error_row(tmp_path, kind, reason):
    pdfs = write_sample_pdfs(tmp_path / "in", n_docs=2, seed=0)
    out = tmp_path / "out"
    proc = run_launch(["--input", str(tmp_path / "in"), "--output", str(out), "--device", "cpu",
                       "--num-workers", "1", "--batch-size", "2", "--render-timeout", "3"],
                      env={**fake_model.env("delay=0"), **faults.env(f"{kind}:{pdfs[0].name}:2")},
                      timeout=240)
    df = pd.read_parquet(out / "pages")
    bad = df[(df.source == pdfs[0].name) & (df.page == 2)]  # source: relative to the input dir
    assert list(bad.status) == ["render_error"] and reason in bad.error.iloc[0]
    others = df.drop(bad.index)
    assert (others.status == "ok").all()
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(df) == manifest.n_pages.sum()  # every other page is there, exactly once
    assert len(set(zip(df.doc_id, df.page))) == len(df)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["failed_pages"] == 1 and stats["per_rank"][0]["render_recoveries"] == 1
    # the summary names the document and where every failure is listed
    assert f"1 document(s) need a look (1 failed page(s), 0 unreadable): {pdfs[0]}" in proc.stderr
    assert "--retry-failed` on the same command would OCR the 1 failed page(s) again" in proc.stderr
    listed = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(d["document"], [p["page"] for p in d["pages"]]) for d in listed] == [(str(pdfs[0]), [2])]
    live = json.loads((out / "status.json").read_text())
    assert live["state"] == "finished" and live["failures_by_status"] == {"render_error": 1}
    docs = pd.read_parquet(out / "documents")
    assert "[MISSING_PAGE_FAIL:2]" in docs[docs.source == pdfs[0].name].text.iloc[0]


# --- configuration values that do not fit their flag ---------------------------------------------

@pytest.mark.parametrize("yaml_text,expected", [
    ('full-precision: "false"', "expected true or false"),
    ("batch-size: 2.5", "expected an integer"),
    ("batch-size: true", "expected int"),
    ('render-timeout: "10"', "expected a number"),
    ("no-steal: 1", "expected true or false"),
    ("device: 3", "expected a string"),
    ("input: [1, 2]", "expected a path or a list of paths"),
])
def test_yaml_values_are_type_checked_like_flags(tmp_path, capsys, yaml_text, expected):
    from nougat_dist.config import parse_args

    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: in\noutput: out\n{yaml_text}\n" if not yaml_text.startswith("input")
                   else f"{yaml_text}\noutput: out\n")
    with pytest.raises(SystemExit) as e:
        parse_args(["--config", str(cfg)])
    assert e.value.code == 2 and expected in capsys.readouterr().err


def test_yaml_values_of_the_right_type_are_taken(tmp_path):
    from nougat_dist.config import parse_args

    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: in\noutput: out\nfull-precision: true\nbatch-size: 3\n"
                   "render-timeout: 10\nno-steal: true\ncheckpoint: null\n")
    c, _ = parse_args(["--config", str(cfg)])
    assert (c.full_precision, c.batch_size, c.render_timeout, c.steal) == (True, 3, 10, False)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_plan_pages_per_s_must_be_positive(capsys, value):
    from nougat_dist.config import parse_args

    with pytest.raises(SystemExit) as e:
        parse_args(["--input", "in", "--output", "out", "--plan-pages-per-s", value])
    assert e.value.code == 2 and "--plan-pages-per-s must be > 0" in capsys.readouterr().err


# --- archive members that are not documents, and resource caps -----------------------------------

def test_odd_archive_members_are_listed_and_refused_with_a_reason(tmp_path, sample_pdfs):
    from nougat_dist.inputs import archives
    from testing.hostile_inputs import write_odd_member_archives

    paths = write_odd_member_archives(tmp_path, sample_pdfs[0].read_bytes())
    assert archives.list_members(paths["tar"]) == ["ok.pdf", "link.pdf", "fifo.pdf", "dev.pdf"]
    assert archives.list_members(paths["zip"]) == ["ok.pdf", "link.pdf", "inner.zip"]
    for path, member, reason in [(paths["tar"], "link.pdf", "is a link"),
                                 (paths["tar"], "fifo.pdf", "is a FIFO"),
                                 (paths["tar"], "dev.pdf", "is a device"),
                                 (paths["zip"], "link.pdf", "is a symlink"),
                                 (paths["zip"], "inner.zip", "nested archive")]:
        with pytest.raises(archives.ArchiveError, match=reason):
            archives.read_member(path, member)
        assert archives.read_member(path, "ok.pdf") == sample_pdfs[0].read_bytes()


def test_member_above_the_cap_is_refused_by_its_header(tmp_path, monkeypatch):
    from nougat_dist.inputs import archives, members
    from testing.hostile_inputs import write_big_member_zip

    z = write_big_member_zip(tmp_path / "big.zip", 3 * 2**20)
    monkeypatch.setenv(members.MAX_MEMBER_ENV, str(2**20))
    with pytest.raises(archives.ArchiveError, match="3145728 bytes uncompressed, above "
                                                    "--max-member-bytes 1048576"):
        archives.read_member(z, "big.pdf")
    monkeypatch.setenv(members.MAX_MEMBER_ENV, str(4 * 2**20))
    assert len(archives.read_member(z, "big.pdf")) == 3 * 2**20


def test_caps_and_odd_members_become_error_rows_in_a_run(tmp_path, sample_pdfs):
    from testing.hostile_inputs import huge_page_pdf, write_big_member_zip, write_odd_member_archives

    inp = tmp_path / "in"
    write_odd_member_archives(inp, sample_pdfs[0].read_bytes())
    write_big_member_zip(inp / "big.zip", 3 * 2**20)
    (inp / "huge.pdf").write_bytes(huge_page_pdf())
    out = tmp_path / "out"
    run_launch(["--input", str(inp), "--output", str(out), "--device", "cpu",
                "--num-workers", "1", "--max-member-bytes", str(2**20)], timeout=240,
               env=fake_model.env("delay=0"))
    df = pd.read_parquet(out / "pages")
    reasons = {(Path(r.source).name, r.member if isinstance(r.member, str) else None):
               (r.status, r.error if isinstance(r.error, str) else "") for r in df.itertuples()}
    assert reasons[("big.zip", "big.pdf")][1].endswith("above --max-member-bytes 1048576: not read")
    status, error = reasons[("huge.pdf", None)]
    assert status == "render_error" and "26667 x 26667 px raster at 96 dpi, above " \
        "--max-page-pixels 40000000" in error
    for archive, member, why in [("odd.tar", "link.pdf", "is a link"),
                                 ("odd.tar", "fifo.pdf", "is a FIFO"),
                                 ("odd.tar", "dev.pdf", "is a device"),
                                 ("odd.zip", "link.pdf", "is a symlink"),
                                 ("odd.zip", "inner.zip", "nested archive")]:
        status, error = reasons[(archive, member)]
        assert status == "error" and why in error, (archive, member, error)
    ok = df[df.member == "ok.pdf"]
    # the two ok.pdf members hold the same bytes: one document, OCR'd once
    assert len(ok) == pypdfium_pages(sample_pdfs[0]) and (ok.status == "ok").all()


def pypdfium_pages(path: Path) -> int:
    import pypdfium2

    doc = pypdfium2.PdfDocument(str(path))
    try:
        return len(doc)
    finally:
        doc.close()


# --- input files that are not regular files, and symlinked directories ---------------------------

@pytest.mark.timeout(60)  # a FIFO opened for reading without O_NONBLOCK waits for a writer forever
def test_fifo_and_device_inputs_become_error_rows_without_hanging(tmp_path, sample_pdfs):
    import os

    from nougat_dist.inputs.sources import Source, discover
    from nougat_dist.store.manifest import inspect

    d = tmp_path / "in"
    d.mkdir()
    os.mkfifo(d / "pipe.pdf")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{d / 'pipe.pdf'}\n/dev/null\n{sample_pdfs[0]}\n")
    found = discover([str(listing), str(d), "/dev/zero"])
    assert found == [Source(str(d / "pipe.pdf")), Source("/dev/null"), Source(str(sample_pdfs[0])),
                     Source("/dev/zero")]
    rows = [inspect(s) for s in found]
    assert "not a regular file (FIFO)" in rows[0].error
    assert "not a regular file (device)" in rows[1].error and "(device)" in rows[3].error
    assert rows[2].error is None and rows[2].n_pages > 0


def test_symlinked_directories_are_followed_once_through_a_loop(tmp_path, sample_pdfs):
    import shutil

    from nougat_dist.inputs.sources import discover

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    shutil.copy(sample_pdfs[0], real / "sub" / "a.pdf")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(real, target_is_directory=True)
    (real / "sub" / "loop").symlink_to(real, target_is_directory=True)  # real/sub/loop -> real
    found = discover([str(root)])
    assert [s.source for s in found] == [str(root / "linked" / "sub" / "a.pdf")]
