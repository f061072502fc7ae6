"""Remote inputs against a real HTTP server on 127.0.0.1: resume, retries, checksums, the cache.

The server runs in a thread of the test process. Each path has a behaviour (serve with Range
support, drop the connection after N bytes, 503 once, 404, slow, redirect), and the server logs
every request, so tests assert what the downloader asked for, not only what it returned.
Retry sleeps go to a list instead of the clock, so no test waits for a backoff.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pypdfium2
import pytest

from conftest import ROOT, run_launch
from testing import fake_model
from nougat_dist.inputs import remote as download
from nougat_dist.inputs import sources
from nougat_dist.inputs.remote import Downloader, DownloadError
from nougat_dist.store.manifest import inspect
from nougat_dist.inputs.sources import InputError, Source, discover, read_bytes

DROP_AFTER = 1000


@dataclass
class Request:
    path: str
    range: str | None
    auth: str | None


@dataclass
class ServerState:
    """What the server serves, how, and what it was asked."""

    files: dict[str, bytes]
    modes: dict[str, str] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def seen(self, path: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


class Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.0: the connection closes after each response, so returning mid-body drops it."""

    server: "Server"

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        st = self.server.state
        with st.lock:
            st.requests.append(Request(self.path, self.headers.get("Range"), self.headers.get("Authorization")))
            st.counts[self.path] += 1
            n = st.counts[self.path]
        mode = st.modes.get(self.path, "ok")
        data = st.files.get(self.path.split("?")[0])
        if mode == "404" or data is None and not mode.startswith("redirect:"):
            return self._status(404, "Not Found")
        if mode == "403":
            return self._status(403, "Forbidden")
        if mode == "503-once" and n == 1:
            return self._status(503, "Service Unavailable", {"Retry-After": "3"})
        if mode == "500-once" and n == 1:
            return self._status(500, "Internal Server Error")
        if mode == "always-503":
            return self._status(503, "Service Unavailable")
        if mode.startswith("redirect:"):
            return self._status(302, "Found", {"Location": mode[len("redirect:"):]})
        if mode.startswith("drop") and n == 1:
            self._headers(200, {"Content-Length": str(len(data))})
            self.wfile.write(data[:DROP_AFTER])
            return  # the server closes the socket: the client sees a short body
        ignore_range = mode == "drop-norange"
        self._serve(data, slow=mode == "slow", ignore_range=ignore_range)

    def _headers(self, code: int, headers: dict[str, str]) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _status(self, code: int, reason: str, headers: dict[str, str] | None = None) -> None:
        body = reason.encode()
        self._headers(code, {"Content-Length": str(len(body)), **(headers or {})})
        self.wfile.write(body)

    def _serve(self, data: bytes, *, slow: bool, ignore_range: bool) -> None:
        start = 0
        rng = self.headers.get("Range")
        if rng and not ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                return self._status(416, "Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}"})
            self._headers(206, {"Content-Length": str(len(data) - start),
                                "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        else:
            self._headers(200, {"Content-Length": str(len(data))})
        body = data[start:]
        if not slow:
            self.wfile.write(body)
            return
        # Long enough for two concurrent clients to overlap on a slow machine.
        step = max(1, len(body) // 10)
        for i in range(0, len(body), step):
            self.wfile.write(body[i:i + step])
            self.wfile.flush()
            time.sleep(0.1)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: ServerState) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = state

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server_address[1]}{path}"


@pytest.fixture
def pdf(sample_pdfs: list[Path]) -> bytes:
    return sample_pdfs[0].read_bytes()


@pytest.fixture
def server(pdf: bytes):
    names = ["/a.pdf", "/drop.pdf", "/norange.pdf", "/flaky.pdf", "/busy.pdf", "/slow.pdf",
             "/bad-sha.pdf", "/down.pdf", "/stale.pdf", "/cdn/a.pdf"]
    state = ServerState(files={n: pdf for n in names})
    srv = Server(state)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def dl(tmp_path: Path, sleeps: list[float]) -> Downloader:
    return Downloader(tmp_path / "cache", retries=3, backoff=0.5, timeout=10, sleep=sleeps.append)


@pytest.fixture
def env_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Points the default downloader (used by sources.read_bytes) at a fresh cache."""
    cache = tmp_path / "env-cache"
    monkeypatch.setenv(download.CACHE_ENV, str(cache))
    return cache


def cache_files(dl_or_dir: Downloader | Path) -> list[Path]:
    root = dl_or_dir.cache_dir if isinstance(dl_or_dir, Downloader) else dl_or_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the downloader ------------------------------------------------------------------------------

def test_download_is_cached_and_reused(server, dl, pdf):
    path = dl.fetch(server.url("/a.pdf"))
    assert path.read_bytes() == pdf
    assert path.name.endswith("-a.pdf")  # the name keeps its suffix: archives are told by it
    assert dl.fetch(server.url("/a.pdf")) == path
    # A new downloader (another process: a render worker, a resumed run) hits the cache too.
    assert Downloader(dl.cache_dir).fetch(server.url("/a.pdf")) == path
    assert len(server.state.seen("/a.pdf")) == 1
    assert cache_files(dl) == [path]


def test_resume_after_dropped_connection(server, dl, pdf, sleeps):
    server.state.modes["/drop.pdf"] = "drop"
    path = dl.fetch(server.url("/drop.pdf"))
    assert path.read_bytes() == pdf
    reqs = server.state.seen("/drop.pdf")
    assert [r.range for r in reqs] == [None, f"bytes={DROP_AFTER}-"]
    assert len(sleeps) == 1
    assert cache_files(dl) == [path]


def test_server_ignoring_range_restarts_cleanly(server, dl, pdf):
    # The resume request gets a plain 200 with the whole file: appending it would corrupt the file.
    server.state.modes["/norange.pdf"] = "drop-norange"
    assert dl.fetch(server.url("/norange.pdf")).read_bytes() == pdf
    assert [r.range for r in server.state.seen("/norange.pdf")] == [None, f"bytes={DROP_AFTER}-"]


@pytest.mark.parametrize("mode, delay", [("503-once", 3.0), ("500-once", 0.5)])
def test_transient_status_is_retried(server, dl, pdf, sleeps, mode, delay):
    server.state.modes["/flaky.pdf"] = mode
    assert dl.fetch(server.url("/flaky.pdf")).read_bytes() == pdf
    assert len(server.state.seen("/flaky.pdf")) == 2
    assert sleeps == [delay]  # Retry-After when the server sent one, else the first backoff step


def test_retries_run_out_with_backoff(server, dl, sleeps):
    server.state.modes["/busy.pdf"] = "always-503"
    with pytest.raises(DownloadError, match="gave up after 3 retries: HTTP 503"):
        dl.fetch(server.url("/busy.pdf"))
    assert len(server.state.seen("/busy.pdf")) == 4
    assert sleeps == [0.5, 1.0, 2.0]
    assert cache_files(dl) == []


@pytest.mark.parametrize("mode, code", [("404", "404 Not Found"), ("403", "403 Forbidden")])
def test_permanent_status_is_not_retried(server, dl, sleeps, mode, code):
    server.state.modes["/down.pdf"] = mode
    url = server.url("/down.pdf")
    with pytest.raises(DownloadError, match=f"HTTP {code}: {url}"):
        dl.fetch(url)
    # Asked again (the manifest reads what prefetch could not): same error, no second request.
    with pytest.raises(DownloadError, match=code):
        dl.fetch(url)
    assert len(server.state.seen("/down.pdf")) == 1
    assert sleeps == []
    assert cache_files(dl) == []


def test_checksum_mismatch_leaves_nothing(server, dl, pdf, sleeps):
    url = server.url("/bad-sha.pdf")
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        dl.fetch(download.with_checksum(url, "0" * 64))
    assert len(server.state.seen("/bad-sha.pdf")) == 1 and sleeps == []
    assert cache_files(dl) == []  # no cached file and no .part left over
    assert dl.fetch(download.with_checksum(url, sha(pdf))).read_bytes() == pdf


def test_cached_file_is_checked_against_a_later_checksum(server, dl, pdf):
    url = server.url("/a.pdf")
    dl.fetch(url)
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        dl.fetch(download.with_checksum(url, "f" * 64))
    assert dl.fetch(download.with_checksum(url, sha(pdf))).read_bytes() == pdf


def test_two_threads_same_url_download_once(server, dl, pdf):
    server.state.modes["/slow.pdf"] = "slow"
    url = server.url("/slow.pdf")
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(dl.fetch(url))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == pdf
    assert len(server.state.seen("/slow.pdf")) == 1
    assert cache_files(dl) == [results[0]]


def test_two_processes_same_url_leave_one_valid_file(server, tmp_path, pdf):
    # Processes cannot see each other's locks: both download, each into its own .part, and the
    # renames replace identical bytes. The slow server makes the downloads overlap.
    server.state.modes["/slow.pdf"] = "slow"
    cache = tmp_path / "shared-cache"
    code = ("import sys; from pathlib import Path; from nougat_dist.inputs.remote import Downloader; "
            "print(Downloader(Path(sys.argv[1])).fetch(sys.argv[2]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache), server.url("/slow.pdf")],
                              stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    assert len(server.state.seen("/slow.pdf")) == 2  # they really raced
    assert cache_files(cache) == [Path(outs[0])]
    assert Path(outs[0]).read_bytes() == pdf


def test_part_left_by_a_dead_process_is_resumed(server, dl, pdf):
    url = server.url("/stale.pdf")
    final = dl.cached_path(url)
    final.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host = dl._part_path(final).name.rsplit(".", 2)[1].rsplit("-", 1)[0]
    stale = final.with_name(f"{final.name}.{host}-{int(dead.stdout)}.part")
    stale.write_bytes(pdf[:777])
    assert dl.fetch(url).read_bytes() == pdf
    assert [r.range for r in server.state.seen("/stale.pdf")] == ["bytes=777-"]
    assert cache_files(dl) == [final]


def test_fetch_many_is_bounded_and_reports_failures(server, dl, pdf, monkeypatch):
    monkeypatch.setenv(download.WORKERS_ENV, "2")
    server.state.modes["/down.pdf"] = "404"
    specs = [server.url(p) for p in ("/a.pdf", "/flaky.pdf", "/down.pdf", "/a.pdf")]
    out = dl.fetch_many(specs)
    assert list(out) == specs[:3]  # de-duplicated, in order
    assert isinstance(out[specs[2]], DownloadError)
    assert out[specs[0]].read_bytes() == pdf
    monkeypatch.setenv(download.WORKERS_ENV, "0")
    with pytest.raises(ValueError, match=download.WORKERS_ENV):
        dl.fetch_many(specs)


def test_spec_parsing():
    assert download.split_checksum("https://x/a.pdf#sha256=" + "AB" * 32) == ("https://x/a.pdf", "ab" * 32)
    with pytest.raises(ValueError, match="sha256"):
        download.split_checksum("https://x/a.pdf#sha256=123")
    assert download.remote_name("https://x/dir/My%20Book.rar?sig=1") == "My Book.rar"
    assert download.parse_hf("hf://datasets/me/books@v2/raw/*.rar") == \
        download.HfRef("dataset", "me/books", "v2", "raw/*.rar")
    assert download.parse_hf("hf://me/model/*.pdf") == download.HfRef("model", "me/model", None, "*.pdf")
    with pytest.raises(ValueError, match="expected hf://"):
        download.parse_hf("hf://datasets/only-owner")


# --- sources: discovery and reading --------------------------------------------------------------

def test_url_list_file_and_error_rows(server, env_cache, tmp_path, pdf, sample_pdfs):
    server.state.modes["/down.pdf"] = "404"
    listing = tmp_path / "inputs.urls"
    good, gone = server.url("/a.pdf"), server.url("/down.pdf")
    listing.write_text(f"# papers\n{good} {sha(pdf)}\n{gone}\n{sample_pdfs[1]}\n")
    found = discover([str(listing)])
    assert found == [Source(download.with_checksum(good, sha(pdf))), Source(gone), Source(str(sample_pdfs[1]))]
    assert server.state.requests == []  # PDFs are downloaded when read, by the rank that reads them
    assert sources.prefetch(found, workers=2) == 1
    ok, err, local = (inspect(s) for s in found)
    assert ok.error is None and ok.sha256 == sha(pdf) and ok.n_pages == len(pypdfium2.PdfDocument(pdf))
    assert err.error == f"cannot read file: HTTP 404 Not Found: {gone}"
    assert local.error is None
    # Rendering reads the cached path (pdfium reads it lazily), never the network again.
    assert sources.pdf_input(found[0]) == str(download.fetch(found[0].source))
    assert len(server.state.seen("/a.pdf")) == 1 and len(server.state.seen("/down.pdf")) == 1


def test_bad_list_lines_are_input_errors(tmp_path):
    listing = tmp_path / "inputs.urls"
    listing.write_text("https://example.invalid/a.pdf not-a-checksum\n")
    with pytest.raises(InputError, match=r"inputs.urls:1: not a sha256"):
        discover([str(listing)])
    listing.write_text("https://example.invalid/a.pdf " + "0" * 64 + " extra\n")
    with pytest.raises(InputError, match="expected 'URL' or 'URL SHA256'"):
        discover([str(listing)])


def test_remote_archive_is_listed_and_read(server, env_cache, pdf):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("papers/p1.pdf", pdf)
        zf.writestr("notes.txt", "not a document")
    server.state.files["/books.zip"] = buf.getvalue()
    server.state.modes["/gone.zip"] = "404"
    found = discover([server.url("/books.zip"), server.url("/gone.zip")])
    assert found == [Source(server.url("/books.zip"), "papers/p1.pdf"), Source(server.url("/gone.zip"), "")]
    assert read_bytes(found[0]) == pdf
    assert "HTTP 404" in inspect(found[1]).error
    assert len(server.state.seen("/books.zip")) == 1 and len(server.state.seen("/gone.zip")) == 1


def test_hf_glob_expands_pinned_and_downloads_without_leaking_the_token(server, env_cache, pdf, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    commit = "c0ffee" * 6 + "abcd"
    calls: list[tuple] = []

    def repo_info(repo_id, *, repo_type=None, revision=None):
        calls.append(("info", repo_id, repo_type, revision))
        return SimpleNamespace(sha=commit)

    def list_repo_files(repo_id, *, repo_type=None, revision=None):
        calls.append(("files", repo_id, repo_type, revision))
        return ["README.md", "papers/b.PDF", "papers/a.pdf", "papers/notes.txt", "other/c.pdf"]

    monkeypatch.setattr(huggingface_hub, "repo_info", repo_info)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_secret")
    monkeypatch.setattr(constants, "ENDPOINT", server.url(""))

    found = discover(["hf://datasets/me/papers/papers/*"])
    assert found == [Source(f"hf://datasets/me/papers@{commit}/papers/{n}") for n in ("a.pdf", "b.PDF")]
    assert calls == [("info", "me/papers", "dataset", None), ("files", "me/papers", "dataset", commit)]

    # The Hub answers with a redirect to another host (its CDN): the token must not follow.
    resolve = f"/datasets/me/papers/resolve/{commit}/papers/a.pdf"
    server.state.modes[resolve] = "redirect:" + server.url("/cdn/a.pdf", host="localhost")
    assert read_bytes(found[0]) == pdf
    assert [r.auth for r in server.state.seen(resolve)] == ["Bearer hf_secret"]
    assert [r.auth for r in server.state.seen("/cdn/a.pdf")] == [None]

    with pytest.raises(InputError, match="no PDF or archive"):
        discover(["hf://datasets/me/papers/*.md"])

    def missing(*a, **k):
        raise OSError("404 Client Error: Repository Not Found")

    monkeypatch.setattr(huggingface_hub, "repo_info", missing)
    with pytest.raises(InputError, match="cannot list hf://me/nope/.*Repository Not Found"):
        discover(["hf://me/nope/*.pdf"])


# --- end to end ----------------------------------------------------------------------------------

def test_e2e_url_list(server, tmp_path, pdf, sample_pdfs):
    server.state.modes["/down.pdf"] = "404"
    listing = tmp_path / "papers.urls"
    good, gone = server.url("/a.pdf"), server.url("/down.pdf")
    listing.write_text(f"{good}\n{gone}\n")
    out = tmp_path / "out"
    run_launch(["--input", str(listing), "--output", str(out), "--device", "cpu"],
               env={**fake_model.env("delay=0"), download.CACHE_ENV: str(tmp_path / "cache")}, timeout=120)
    df = pd.read_parquet(out / "pages")
    good_rows = df[df.source == "a.pdf"]  # source: the URL's path from its prefix
    assert sorted(good_rows.page) == list(range(1, len(pypdfium2.PdfDocument(pdf)) + 1))
    assert set(good_rows.status) <= {"ok", "empty"}, good_rows[["page", "status", "error"]]
    bad = df[df.source == "down.pdf"]
    assert list(bad.status) == ["error"] and list(bad.page) == [0]
    assert bad.error.iloc[0] == f"cannot read file: HTTP 404 Not Found: {gone}"
    # Manifest and render workers read the good PDF once from the network, then from the cache.
    assert len(server.state.seen("/a.pdf")) == 1
    assert len(server.state.seen("/down.pdf")) == 1
