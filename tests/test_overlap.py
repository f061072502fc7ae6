"""--overlap-post: increments of complete documents are cleaned, chunked and published while pages
are still being committed; a crash anywhere resumes each stage; the final dataset equals the one
clean/chunk make after the job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, run_launch
from nougat_dist.stages import chunk as chunk_stage
from nougat_dist.stages import overlap
from nougat_dist.stages import postprocess as pp
from nougat_dist.store import finalize, manifest
from nougat_dist.store.chunks import PAGES_SCHEMA, atomic_write_table
from nougat_dist.store.layout import OutputDir
from test_upload import Hub
from testing import fake_model

WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega rho tau phi "
         "chi psi").split()


def _text(seed: int) -> str:
    words = [WORDS[(seed * 7 + i * (seed % 5 + 1)) % len(WORDS)] + str((seed + i) % 97) for i in range(40)]
    return f"# Section {seed}\n\n" + " ".join(words) + "."


def _row(doc: str, page: int, text: str, status: str = "ok") -> dict:
    return {"doc_id": doc, "source": f"/in/{doc}.pdf", "member": None, "page": page, "text": text,
            "status": status, "error": None if status == "ok" else "x", "elapsed_ms": 1.0,
            "rank": 0, "model": "m", "dtype": "d"}


# A: 3 pages; B: 2 pages, its page 2 = A's page 2 (a duplicate page); C: = B's text (a duplicate
# document); D: unreadable (a page-0 error row); E: 2 pages.
DOCS = {"A": [_text(1), _text(2), _text(3)], "B": [_text(4), _text(2)], "C": [_text(4), _text(2)],
        "D": [], "E": [_text(5), _text(6)]}


def _manifest(out: Path) -> None:
    entries = [manifest.DocEntry(d, f"/in/{d}.pdf", None, len(p), 10, d,
                                 error="unreadable" if not p else None) for d, p in DOCS.items()]
    manifest.write(out, entries)


def _commit(out: Path, name: str, pages: list[tuple[str, int]]) -> None:
    rows = [_row(d, 0, "", "error") if p == 0 else _row(d, p, DOCS[d][p - 1]) for d, p in pages]
    atomic_write_table(pa.Table.from_pylist(rows, schema=PAGES_SCHEMA), OutputDir(out).pages / name)


# Commits in an order where documents complete one or two at a time, never in a single chunk.
COMMITS = [[("A", 1), ("A", 2), ("A", 3), ("B", 1)], [("B", 2), ("E", 1)], [("C", 1), ("D", 0)],
           [("C", 2), ("E", 2)]]


def _table_rows(directory: Path) -> list[str]:
    """Every row of a sharded table (any shard naming), as sorted JSON."""
    paths = sorted(directory.glob("train-*.parquet"))
    return sorted(json.dumps(r, sort_keys=True) for p in paths for r in pq.read_table(p).to_pylist())


def _dataset(out: Path) -> dict:
    layout = OutputDir(out)
    return {"clean_pages": _table_rows(layout.clean_pages),
            "clean_documents": _table_rows(layout.clean_documents),
            "dropped": _table_rows(layout.clean_dropped), "chunks": _table_rows(layout.chunks),
            "report": json.loads(layout.clean_report.read_text())}


def _reference(tmp_path: Path) -> dict:
    """clean and chunk after the job, over the same committed pages."""
    out = tmp_path / "ref"
    _manifest(out)
    for i, pages in enumerate(COMMITS):
        _commit(out, f"part-r00000-{i:06d}-0.parquet", pages)
    finalize.finalize(out)
    pp.clean(out)
    chunk_stage.chunk(out)
    return _dataset(out)


class _Job:
    def __init__(self, post: str, repo: str = "org/live", every: float = 0.2) -> None:
        self.output, self.post, self.post_repo, self.post_every = "", post, repo, every
        self.overlap_post, self.finalize_memory = True, 256 * 2**20


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub._upload_large_folder as ulf
    from huggingface_hub import constants

    monkeypatch.setattr(ulf, "WAITING_TIME_IF_NO_TASKS", 0.1)
    server = Hub()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    yield server
    server.close()


def _hub_rows(hub: Hub, prefix: str) -> list[dict]:
    import io

    rows = []
    for path, data in sorted(hub.files.items()):
        if path.startswith(prefix) and path.endswith(".parquet"):
            rows += pq.read_table(io.BytesIO(data)).to_pylist()
    return rows


def test_increments_resume_after_crashes_and_equal_clean_after_the_job(tmp_path: Path, hub: Hub) -> None:
    out = tmp_path / "out"
    _manifest(out)
    job = _Job("clean,chunk,upload")
    job.output = str(out)
    cfg = overlap.from_job(job)
    ledger = overlap.Ledger(out)
    tok = chunk_stage.default_tokenizer()
    _commit(out, "part-r00000-000000-0.parquet", COMMITS[0])
    overlap.step(cfg, ledger, tok)  # increment 0: A (B is not complete)
    assert ledger.increments() == [0] and ledger.record("upload", 0) is not None
    first = {r["doc_id"] for r in _hub_rows(hub, "clean/pages/")}
    assert first == {"A"}, "increment 0 is on the Hub before the other pages are committed"
    card = hub.files["README.md"].decode()
    assert "clean/pages/train-*.parquet" in card and "pages/part-*.parquet" not in card

    _commit(out, "part-r00000-000001-0.parquet", COMMITS[1])
    # A crash in increment 1's clean after its shards landed, before its record: shards left
    # behind (one stale file under its name) are removed and the increment is done again.
    overlap.form_increment(out, ledger)
    layout = OutputDir(out)
    shutil.copy(layout.clean_pages / "train-i00000-00000.parquet",
                layout.clean_pages / "train-i00001-00003.parquet")
    overlap.step(cfg, ledger, tok)
    assert not (layout.clean_pages / "train-i00001-00003.parquet").exists()
    # A crash after increment 2's Hub commit, before its record: published again, same paths.
    _commit(out, "part-r00000-000002-0.parquet", COMMITS[2])
    overlap.step(cfg, ledger, tok)
    (ledger.dir / "upload-00002.json").unlink()
    commits = len(hub.commits)
    overlap.step(cfg, ledger, tok)
    assert len(hub.commits) == commits + 1 and ledger.record("upload", 2) is not None

    _commit(out, "part-r00000-000003-0.parquet", COMMITS[3])
    finalize.finalize(out)
    overlap.after_job(job)  # the last increment, then the whole output
    assert ledger.increments() == [0, 1, 2, 3]
    assert _dataset(out) == _reference(tmp_path)
    # Exactly once on the Hub: every kept page once, and the Hub holds what the output holds.
    on_hub = [(r["doc_id"], r["page"]) for r in _hub_rows(hub, "clean/pages/")]
    assert len(on_hub) == len(set(on_hub)) == len(_dataset(out)["clean_pages"])
    for path, data in hub.files.items():
        if path != "README.md":
            assert (out / path).read_bytes() == data, path
    # the duplicate page of B and the duplicate document C were dropped in later increments
    dropped = {(r["doc_id"], r["page"], r["reason"]) for r in _hub_rows(hub, "clean/dropped/")}
    assert ("B", 2, "duplicate_page") in dropped and ("C", None, "duplicate_document") in dropped


def test_duplicate_text_keeps_the_first_published_copy(tmp_path: Path, hub: Hub,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The one documented difference: B = C in text, C completes first, so C's copy is kept
    (clean after the job keeps B's, the first in manifest order); the page texts kept are the
    same, once each."""
    out = tmp_path / "out"
    _manifest(out)
    job = _Job("clean,chunk")
    job.output = str(out)
    cfg, ledger = overlap.from_job(job), overlap.Ledger(out)
    _commit(out, "part-r00000-000000-0.parquet", [("C", 1), ("C", 2)])
    overlap.step(cfg, ledger, chunk_stage.default_tokenizer())
    rest = [k for pages in COMMITS for k in pages if k[0] != "C"]
    _commit(out, "part-r00000-000001-0.parquet", rest)
    finalize.finalize(out)
    overlap.after_job(job)
    ref = _reference(tmp_path)
    kept = pq.read_table(OutputDir(out).clean_documents).to_pylist()
    assert "C" in {r["doc_id"] for r in kept} and "B" not in {r["doc_id"] for r in kept}
    ref_kept = pq.read_table(tmp_path / "ref" / "clean" / "documents").to_pylist()
    assert "B" in {r["doc_id"] for r in ref_kept} and "C" not in {r["doc_id"] for r in ref_kept}
    # Page by page the same texts are kept, once each; A's page 2 (= C's) is kept under C here.
    pages = pq.read_table(OutputDir(out).clean_pages).to_pylist()
    ref_pages = pq.read_table(tmp_path / "ref" / "clean" / "pages").to_pylist()
    assert sorted(r["sha256"] for r in pages) == sorted(r["sha256"] for r in ref_pages)
    assert len({r["sha256"] for r in pages}) == len(pages)
    assert ("A", 2) not in {(r["doc_id"], r["page"]) for r in pages}
    assert _dataset(out)["report"] == ref["report"]


def _wait(what, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_background_process_killed_resumes_and_stops_on_request(tmp_path: Path, hub: Hub) -> None:
    out = tmp_path / "out"
    _manifest(out)
    cfg = overlap.PostConfig(out, ("clean", "chunk", "upload"), "org/live", every_s=0.2)
    ledger = overlap.Ledger(out)
    _commit(out, "part-r00000-000000-0.parquet", COMMITS[0])
    bg = overlap.Background(cfg)
    _wait(lambda: ledger.record("upload", 0) is not None)
    bg.proc.kill()  # SIGKILL, wherever it is
    bg.proc.wait()
    first = dict(hub.files)
    assert any(f.startswith("clean/pages/train-i00000-") for f in first)
    _commit(out, "part-r00000-000001-0.parquet", COMMITS[1])
    bg = overlap.Background(cfg)
    _wait(lambda: ledger.record("upload", 1) is not None)
    bg.stop()
    assert bg.proc.returncode == 0, "SIGTERM ends it after its step, not by the signal"
    assert ledger.increments() == [0, 1]
    for path in first:  # increment 0 was not published again under other names
        assert hub.files[path] == first[path] or path == "README.md"
    rows = [(r["doc_id"], r["page"]) for r in _hub_rows(hub, "clean/pages/")]
    # B (complete now) in increment 1, its page 2 dropped as A's page 2; E is not complete yet
    assert sorted(rows) == [("A", 1), ("A", 2), ("A", 3), ("B", 1)]


def test_parse_stages() -> None:
    assert overlap.parse_stages("clean,chunk,upload") == ("clean", "chunk", "upload")
    assert overlap.parse_stages("clean") == ("clean",)
    for bad in ("chunk", "clean,upload", "clean,dedup"):
        with pytest.raises(ValueError):
            overlap.parse_stages(bad)


# --- the job: SIGKILL after an increment was published, resume --------------------------------

# OCR slow enough that the first increment is published long before the last page.
FAKE = ["--unit-pages", "2", "--commit-pages", "2", "--commit-seconds", "0.5", "--num-workers", "1",
        "--batch-size", "2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testing.samples import write_sample_pdfs

    d = tmp_path_factory.mktemp("overlap-corpus")
    write_sample_pdfs(d, n_docs=6, seed=3)
    return d


@pytest.mark.faults  # a SIGKILL trial: `make test-faults` (about a minute here)
@pytest.mark.timeout(300)
def test_job_killed_after_an_increment_resumes_exactly_once(corpus: Path, tmp_path: Path,
                                                            hub: Hub) -> None:
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test", "PYTHONPATH": str(ROOT)}
    # The reference: one uninterrupted job whose post stages run after OCR (the fake model's
    # text depends on the page only, not on its delay).
    ref = tmp_path / "ref"
    run_launch(["--input", str(corpus), "--output", str(ref), *FAKE, "--post", "clean,chunk"],
               env={**env, **fake_model.env("delay=0")})

    out = tmp_path / "out"
    args = ["--input", str(corpus), "--output", str(out), *FAKE, "--post", "clean,chunk,upload",
            "--post-repo", "org/papers", "--overlap-post", "--post-every", "0.3"]
    env = {**env, **fake_model.env("delay=0.5")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT,
                            env={**os.environ, **env}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ledger = overlap.Ledger(out)
    deadline = time.monotonic() + 200
    try:
        while ledger.record("upload", 0) is None and time.monotonic() < deadline:
            assert proc.poll() is None, ("the job ended before an increment was published: "
                                         + proc.stderr.read()[-3000:])
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job and (PR_SET_PDEATHSIG) its post process
        proc.wait(60)
    published = {p for p in hub.files if p.startswith("clean/")}
    assert published and all("-i00000-" in p for p in published), "increment 0 landed, alone"
    assert not (out / "stats.json").exists(), "the kill landed before the end of the job"

    run_launch(args, env=env)
    assert len(ledger.increments()) >= 2
    # The same dataset as the job that ran its post stages after OCR; shard names differ.
    assert _dataset(out) == _dataset(ref)
    for name, directory in (("clean/pages/", "clean/pages"), ("clean/dropped/", "clean/dropped"),
                            ("clean/documents/", "clean/documents"), ("chunks/", "chunks")):
        on_hub = sorted(json.dumps(r, sort_keys=True) for r in _hub_rows(hub, name))
        local = sorted(json.dumps(r, sort_keys=True) for p in sorted((ref / directory).glob("*.parquet"))
                       for r in pq.read_table(p).to_pylist())
        assert on_hub == local, name
    for path, data in hub.files.items():
        if path != "README.md":
            assert (out / path).read_bytes() == data, path
