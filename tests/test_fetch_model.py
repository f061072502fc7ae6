"""fetch-model: nougat's URLs and files, resume by file, SHA256SUMS, a clean offline error."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from nougat_dist import fetch_model
from nougat_dist.cli import entry

CONTENT = {name: (name * 40).encode() for name in fetch_model.FILES}


class _Server(http.server.ThreadingHTTPServer):
    requested: list[str]
    missing: set[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        tag, name = self.path.strip("/").split("/")[-2:]
        self.server.requested.append(name)  # type: ignore[attr-defined]
        body = CONTENT.get(name) if tag == "t1" and name not in self.server.missing else None  # type: ignore[attr-defined]
        self.send_response(200 if body else 404)
        body = body or b"Not Found"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch):
    from nougat.utils import checkpoint as nck

    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.requested, srv.missing = [], set()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setattr(nck, "BASE_URL", f"http://127.0.0.1:{srv.server_address[1]}/releases")
    yield srv
    srv.shutdown()


def test_fetch_resumes_by_file_and_writes_sums(server: _Server, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    to = tmp_path / "ckpt"
    server.missing = {"tokenizer.json"}  # the download breaks off at the fourth file
    assert entry(["fetch-model", "t1", "--to", str(to)]) == 2
    assert "returned no file" in capsys.readouterr().err
    kept = sorted(p.name for p in to.iterdir())
    assert kept == ["config.json", "pytorch_model.bin", "special_tokens_map.json"]
    server.missing, server.requested = set(), []
    assert entry(["fetch-model", "t1", "--to", str(to)]) == 0
    assert server.requested == ["tokenizer.json", "tokenizer_config.json"]  # the rest only
    out = capsys.readouterr().out
    sums = (to / fetch_model.SUMS).read_text().splitlines()
    for name, data in CONTENT.items():
        assert (to / name).read_bytes() == data
        digest = hashlib.sha256(data).hexdigest()
        assert f"{digest}  {name}" in sums and digest in out


def test_offline_is_one_error_and_no_empty_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from nougat.utils import checkpoint as nck

    with socket.socket() as s:  # a port nobody listens on: connection refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(nck, "BASE_URL", f"http://127.0.0.1:{port}/releases")
    to = tmp_path / "hub" / "nougat-0.1.0-small"
    assert entry(["fetch-model", "0.1.0-small", "--to", str(to)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download 0.1.0-small") and "offline?" in err
    assert "Traceback" not in err
    assert not to.exists()
