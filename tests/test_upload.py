"""upload: the exact plan of a dry run, the card, upload_large_folder against a loopback Hub
(retries, a kill half-way then a resume that sends nothing twice), no token leak."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from nougat_dist.stages import postprocess as pp
from nougat_dist.stages import upload as up
from nougat_dist.__main__ import main
from test_postprocess import write_job_output

CARD = Path(__file__).parent / "fixtures" / "dataset_card.md"


@pytest.fixture()
def out_dir(tmp_path: Path) -> Path:
    out = write_job_output(tmp_path / "out")
    pp.clean(out)
    pp.chunk(out, pp.ChunkOptions(max_tokens=30, overlap=5, rows_per_file=3))
    (out / "stats.json").write_text("{}")
    (out / "logs").mkdir()
    (out / "logs" / "rank0.log").write_text("not uploaded")
    (out / "pages" / ".tmp-part-r00000-000001.parquet.123").write_bytes(b"partial")  # never uploaded
    return out


def test_dry_run_plan_and_card(out_dir: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hf_SECRET_never_printed"
    monkeypatch.setenv("NOUGAT_DIST_TEST_TOKEN", secret)
    assert main(["upload", str(out_dir), "org/papers", "--dry-run", "--num-workers", "4",
                 "--token-env", "NOUGAT_DIST_TEST_TOKEN"]) == 0
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err
    card = CARD.read_text()
    size = sum(f.size for f in up.planned_files(out_dir)) + len(card.encode())

    def add(name: str) -> str:
        return f"  add {name} <- {out_dir / name} ({(out_dir / name).stat().st_size} bytes)"

    plan = [
        "create_repo org/papers (repo_type=dataset, exist_ok=True)",
        f"upload_large_folder: 11 file(s), {size} bytes, in as many commits as it takes",
        add("chunks/train-00000-of-00002.parquet"), add("chunks/train-00001-of-00002.parquet"),
        add("documents/train-00000-of-00001.parquet"), add("pages/part-r00000-000000.parquet"),
        add("pages/part-r00001-000000.parquet"), add("clean/documents/train-00000-of-00001.parquet"),
        add("clean/pages/train-00000-of-00001.parquet"), add("run_stats.json"),
        add("clean/report.json"), add("clean/dropped/train-00000-of-00001.parquet"),
        f"  add README.md <- generated dataset card ({len(card.encode())} bytes, sha256 "
        f"{hashlib.sha256(card.encode()).hexdigest()[:16]})",
        "--- README.md ---",
    ]
    assert printed.out == "\n".join(plan) + "\n" + card + "\n"


def test_card_yaml_configs_point_at_files(out_dir: Path) -> None:
    card = up.dataset_card(out_dir, "org/papers")
    assert card == CARD.read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert [(c["config_name"], c["data_files"][0]["path"]) for c in meta["configs"]] == [
        ("chunks", "chunks/train-*.parquet"), ("documents", "documents/train-*.parquet"),
        ("pages", "pages/part-*.parquet"), ("clean_documents", "clean/documents/train-*.parquet"),
        ("clean_pages", "clean/pages/train-*.parquet")]
    for c in meta["configs"]:
        assert sorted(out_dir.glob(c["data_files"][0]["path"]))


class Hub:
    """A loopback stand-in for the Hub's upload API (create repo, repo info, preupload, LFS batch
    and PUT, commit): enough for huggingface_hub's upload_large_folder to run against it."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # path in repo -> content, as committed
        self.lfs: dict[str, bytes] = {}  # sha256 -> content, as uploaded
        self.lfs_puts: list[str] = []
        self.commits: list[list[str]] = []
        self.fail_commits_after: int | None = None  # HTTP 503 for every later commit
        self.fail_first_preuploads = 0  # HTTP 429 for that many preupload calls
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: object = None) -> None:
                data = json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self) -> None:
                if "/revision/" in self.path:
                    repo = self.path.split("/api/datasets/")[1].split("/revision/")[0]
                    return self._send(200, {"id": repo, "sha": "0" * 40, "xetEnabled": False,
                                            "siblings": [{"rfilename": f} for f in hub.files]})
                self._send(404, {"error": self.path})

            def do_PUT(self) -> None:
                oid = self.path.rsplit("/", 1)[1]
                data = self._body()
                with hub.lock:
                    hub.lfs[oid] = data
                    hub.lfs_puts.append(oid)
                self._send(200)

            def do_POST(self) -> None:
                body = self._body()
                if self.path.startswith("/api/validate-yaml"):  # the card's metadata, checked at commit
                    return self._send(200, {"errors": [], "warnings": []})
                if self.path.startswith("/api/repos/create"):
                    name = json.loads(body)
                    repo = f"{name['organization']}/{name['name']}" if name.get("organization") else name["name"]
                    return self._send(200, {"url": f"{hub.url}/datasets/{repo}"})
                if "/preupload/" in self.path:
                    with hub.lock:
                        if hub.fail_first_preuploads:
                            hub.fail_first_preuploads -= 1
                            return self._send(429, {"error": "slow down"})
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".parquet") else "regular",
                         "shouldIgnore": False} for f in files]})
                if self.path.endswith("/info/lfs/objects/batch"):
                    objects = []
                    for o in json.loads(body)["objects"]:
                        if o["oid"] in hub.lfs:  # already stored: nothing to send
                            objects.append({"oid": o["oid"], "size": o["size"]})
                        else:
                            objects.append({"oid": o["oid"], "size": o["size"], "actions": {
                                "upload": {"href": f"{hub.url}/lfs-store/{o['oid']}"}}})
                    return self._send(200, {"transfer": "basic", "objects": objects})
                if "/commit/" in self.path:
                    with hub.lock:
                        if hub.fail_commits_after is not None and len(hub.commits) >= hub.fail_commits_after:
                            return self._send(503, {"error": "unavailable"})
                        lines = [json.loads(ln) for ln in body.decode().splitlines() if ln.strip()]
                        paths = []
                        for ln in lines:
                            v = ln["value"]
                            if ln["key"] == "file":
                                hub.files[v["path"]] = base64.b64decode(v["content"])
                            elif ln["key"] == "lfsFile":
                                hub.files[v["path"]] = hub.lfs[v["oid"]]
                            elif ln["key"] == "deletedFile":
                                hub.files.pop(v["path"], None)
                            else:
                                continue
                            paths.append(v["path"])
                        hub.commits.append(paths)
                        n = len(hub.commits)
                    # CommitInfo parses the repo from the URL against the public endpoint's form
                    repo = self.path.split("/api/datasets/")[1].split("/commit/")[0]
                    return self._send(200, {"commitUrl": f"https://huggingface.co/datasets/{repo}/commit/{n:040x}",
                                            "commitOid": f"{n:040x}",
                                            "pullRequestUrl": None})
                self._send(404, {"error": self.path})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub._upload_large_folder as ulf

    monkeypatch.setattr(ulf, "WAITING_TIME_IF_NO_TASKS", 0.1)  # idle workers poll faster
    server = Hub()
    yield server
    server.close()


def _expected_repo(out_dir: Path) -> dict[str, bytes]:
    files = {f.path_in_repo: f.local.read_bytes() for f in up.planned_files(out_dir)}
    files["README.md"] = CARD.read_bytes()
    return files


@pytest.mark.timeout(120)  # upload_large_folder retries failures without end
def test_upload_through_large_folder(out_dir: Path, hub: Hub) -> None:
    from huggingface_hub import HfApi

    hub.fail_first_preuploads = 2  # HTTP 429 twice: retried
    api = HfApi(endpoint=hub.url, token="hf_test")
    up.upload(out_dir, "org/papers", api=api, num_workers=2, echo=lambda s: None)
    assert hub.files == _expected_repo(out_dir)
    assert "logs/rank0.log" not in hub.files and not any(".tmp-" in f for f in hub.files)
    assert "stats.json" not in hub.files and "run_stats.json" in hub.files
    assert sorted(hub.lfs_puts) == sorted(set(hub.lfs_puts))  # each LFS object sent once
    # Again: everything is committed already; nothing is sent.
    puts, commits = len(hub.lfs_puts), len(hub.commits)
    up.upload(out_dir, "org/papers", api=api, num_workers=2, echo=lambda s: None)
    assert (len(hub.lfs_puts), len(hub.commits)) == (puts, commits)


def test_the_repo_gets_stats_without_local_paths_or_hosts(out_dir: Path) -> None:
    """run_stats.json is stats.json less the inputs, the output, the checkpoint's folder and the
    host names; every other figure and setting is kept."""
    stats = {"pages_total": 9, "versions": {"nougat-dist": "0.4.0"}, "run_id": "r1",
             "config": {"input": ["/home/ana/papers"], "output": "/scratch/ana/out",
                        "checkpoint": "/models/nougat-0.1.0-small", "batch_size": 24},
             "per_rank": [{"rank": 0, "host": "gpu-node-17", "pages": 9}],
             "attempts": [{"attempt": "a1", "hosts": ["gpu-node-17"], "pages": 9}]}
    (out_dir / "stats.json").write_text(json.dumps(stats))
    up.write_public_stats(out_dir)
    text = (out_dir / up.PUBLIC_STATS_FILE).read_text()
    for local in ("/home/ana", "/scratch/ana", "/models/", "gpu-node-17"):
        assert local not in text
    public = json.loads(text)
    assert public["config"] == {"checkpoint": "nougat-0.1.0-small", "batch_size": 24}
    assert public["per_rank"] == [{"rank": 0, "pages": 9}]
    assert public["attempts"] == [{"attempt": "a1", "pages": 9}]
    assert {k: public[k] for k in ("pages_total", "versions", "run_id")} == \
        {k: stats[k] for k in ("pages_total", "versions", "run_id")}
    assert [f.path_in_repo for f in up.planned_files(out_dir)].count("run_stats.json") == 1
    assert "stats.json" not in [f.path_in_repo for f in up.planned_files(out_dir)]


_UPLOAD_SCRIPT = """
import sys
import huggingface_hub._upload_large_folder as ulf
from huggingface_hub import HfApi
from nougat_dist.stages import upload as up
ulf.WAITING_TIME_IF_NO_TASKS = 0.1
ulf.COMMIT_SIZE_SCALE[:] = [2] * len(ulf.COMMIT_SIZE_SCALE)  # small commits, so some land early
up.upload(__import__("pathlib").Path(sys.argv[1]), "org/papers",
          api=HfApi(endpoint=sys.argv[2], token="hf_test"), num_workers=1)
"""


@pytest.mark.timeout(180)
def test_upload_killed_half_way_resumes_without_resending(out_dir: Path, hub: Hub) -> None:
    from huggingface_hub import HfApi

    hub.fail_commits_after = 1  # the first commit lands, then the Hub answers 503 to commits
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _UPLOAD_SCRIPT, str(out_dir), hub.url], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        expected = _expected_repo(out_dir)
        n_lfs = sum(1 for f in expected if f.endswith(".parquet"))
        # Wait until one commit landed and every LFS object was sent (the rest is retrying).
        while not (hub.commits and len(hub.lfs) == n_lfs) and time.monotonic() < deadline:
            assert proc.poll() is None, "the upload ended before it was killed"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    expected = _expected_repo(out_dir)  # with run_stats.json, which the upload wrote first
    first = set(hub.files)
    assert 0 < len(first) < len(expected), f"the kill did not land half-way: {len(first)} files committed"
    puts = len(hub.lfs_puts)
    hub.fail_commits_after = None  # the Hub is back
    up.upload(out_dir, "org/papers", api=HfApi(endpoint=hub.url, token="hf_test"), num_workers=2,
              echo=lambda s: None)
    assert hub.files == expected
    assert len(hub.lfs_puts) == puts, "a file already sent was sent again"
    resumed = [p for c in hub.commits[1:] for p in c]
    assert not first & set(resumed), "a file committed before the kill was committed again"


@pytest.mark.timeout(120)
def test_shards_renamed_by_a_later_run_leave_no_stale_copy(out_dir: Path, hub: Hub) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token="hf_test")
    up.upload(out_dir, "org/papers", api=api, num_workers=2, echo=lambda s: None)
    assert "chunks/train-00001-of-00002.parquet" in hub.files
    pp.chunk(out_dir, pp.ChunkOptions(max_tokens=30, overlap=5, rows_per_file=100))  # 1 shard now
    up.upload(out_dir, "org/papers", api=api, num_workers=2, echo=lambda s: None)
    assert sorted(f for f in hub.files if f.startswith("chunks/")) == ["chunks/train-00000-of-00001.parquet"]
    assert set(hub.files) == set(_expected_repo(out_dir))


def test_upload_needs_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["upload", str(tmp_path), "org/x", "--dry-run"]) == 2
    assert "no Parquet output to upload" in capsys.readouterr().err
    assert main(["upload", str(tmp_path), "not a repo", "--dry-run"]) == 2
    assert "not a Hub repo id" in capsys.readouterr().err
