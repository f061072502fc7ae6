"""upload: the exact plan of a dry run, the card, batching, retries on 429/5xx only, no token leak."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import requests
import yaml
from huggingface_hub.utils import HfHubHTTPError

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
    assert main(["upload", str(out_dir), "org/papers", "--dry-run", "--files-per-commit", "4",
                 "--token-env", "NOUGAT_DIST_TEST_TOKEN"]) == 0
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err
    card = CARD.read_text()

    def add(name: str) -> str:
        return f"  add {name} <- {out_dir / name} ({(out_dir / name).stat().st_size} bytes)"

    plan = [
        "create_repo org/papers (repo_type=dataset, exist_ok=True)",
        "commit 1/3: 4 operation(s)",
        add("chunks/train-00000-of-00002.parquet"), add("chunks/train-00001-of-00002.parquet"),
        add("documents/train-00000-of-00001.parquet"), add("pages/part-r00000-000000.parquet"),
        "commit 2/3: 4 operation(s)",
        add("pages/part-r00001-000000.parquet"), add("clean/documents/train-00000-of-00001.parquet"),
        add("clean/pages/train-00000-of-00001.parquet"), add("stats.json"),
        "commit 3/3: 3 operation(s)",
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


def _http_error(status: int, retry_after: str | None = None) -> HfHubHTTPError:
    response = requests.Response()
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after
    return HfHubHTTPError(f"HTTP {status}", response=response)


class FakeApi:
    """Records calls; create_commit fails with the queued errors first."""

    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.calls: list[tuple] = []

    def create_repo(self, repo_id: str, **kw) -> None:
        self.calls.append(("create_repo", repo_id, kw))

    def create_commit(self, repo_id: str, operations: list, **kw) -> str:
        if self.errors:
            raise self.errors.pop(0)
        self.calls.append(("create_commit", repo_id, [op.path_in_repo for op in operations], kw))
        if operations[-1].path_in_repo == "README.md":
            self.card = operations[-1].path_or_fileobj
        return f"commit-{len(self.calls)}"


def test_upload_batches_and_retries_transient_errors(out_dir: Path) -> None:
    api = FakeApi([_http_error(503), _http_error(429, retry_after="7")])
    slept: list[float] = []
    infos = up.upload(out_dir, "org/papers", api=api, files_per_commit=6, sleep=slept.append, echo=lambda s: None)
    assert slept == [2.0, 7.0]  # backoff 2·2^0, then the server's Retry-After
    assert infos == ["commit-2", "commit-3"]
    assert api.calls == [
        ("create_repo", "org/papers", {"repo_type": "dataset", "private": False, "exist_ok": True}),
        ("create_commit", "org/papers", ["chunks/train-00000-of-00002.parquet",
                                         "chunks/train-00001-of-00002.parquet",
                                         "documents/train-00000-of-00001.parquet",
                                         "pages/part-r00000-000000.parquet",
                                         "pages/part-r00001-000000.parquet",
                                         "clean/documents/train-00000-of-00001.parquet"],
         {"commit_message": "nougat-dist upload 1/2", "repo_type": "dataset"}),
        ("create_commit", "org/papers", ["clean/pages/train-00000-of-00001.parquet", "stats.json",
                                         "clean/report.json", "clean/dropped/train-00000-of-00001.parquet",
                                         "README.md"],
         {"commit_message": "nougat-dist upload 2/2", "repo_type": "dataset"}),
    ]
    assert api.card == CARD.read_bytes()


def test_upload_does_not_retry_client_errors(out_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    slept: list[float] = []
    with pytest.raises(HfHubHTTPError, match="HTTP 404"):
        up.upload(out_dir, "org/papers", api=FakeApi([_http_error(404)]), sleep=slept.append, echo=lambda s: None)
    assert slept == []
    caplog.set_level(logging.WARNING)
    with pytest.raises(HfHubHTTPError, match="HTTP 500"):
        up.upload(out_dir, "org/papers", api=FakeApi([_http_error(500)] * 4), retries=2,
                  sleep=slept.append, echo=lambda s: None)
    assert slept == [2.0, 4.0]  # two retries, then the error
    assert "retry 2/2" in caplog.text


def test_upload_needs_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["upload", str(tmp_path), "org/x", "--dry-run"]) == 2
    assert "no Parquet output to upload" in capsys.readouterr().err
