"""One model per output, and --retry-failed."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_launch
from nougat_dist.config import Config
from nougat_dist.errors import SetupError
from nougat_dist.ocr.model import checkpoint_name
from nougat_dist.sched.plan import _reconcile_committed
from nougat_dist.store import index
from nougat_dist.store.chunks import PAGES_SCHEMA
from nougat_dist.store.layout import OutputDir
from testing import fake_model
from testing.samples import write_long_pdf

FAKE = ["--device", "cpu", "--num-workers", "0"]
FAKE_MODEL = fake_model.env("delay=0")


def _commit(out: Path, model: str, dtype: str, pages=(1, 2)) -> None:
    rows = [{"doc_id": "d", "source": "a.pdf", "member": None, "page": p, "text": "t",
             "status": "ok", "error": None, "n_tokens": 1, "elapsed_ms": 1.0, "rank": 0,
             "model": model, "dtype": dtype} for p in pages]
    OutputDir(out).pages.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PAGES_SCHEMA),
                   OutputDir(out).pages / "part-r00000-000000.parquet")


def test_other_checkpoint_is_refused_then_redone(tmp_path: Path, tiny_checkpoint: Path) -> None:
    mine = checkpoint_name(tiny_checkpoint)
    _commit(tmp_path, "other@0123456789ab", "bfloat16")
    cfg = Config(checkpoint=str(tiny_checkpoint), output=str(tmp_path))
    with pytest.raises(SetupError, match=rf"other@0123456789ab \(bfloat16\).*{mine} \(bfloat16\)"):
        _reconcile_committed(cfg, tmp_path, str(tiny_checkpoint))
    cfg = Config(checkpoint=str(tiny_checkpoint), output=str(tmp_path), redo_other_model=True)
    _reconcile_committed(cfg, tmp_path, str(tiny_checkpoint))
    assert index.committed_pages(tmp_path) == {}  # to be done again
    assert len(pd.read_parquet(OutputDir(tmp_path).superseded)) == 2  # kept, not deleted


def test_other_dtype_is_refused(tmp_path: Path, tiny_checkpoint: Path) -> None:
    _commit(tmp_path, checkpoint_name(tiny_checkpoint), "bfloat16")
    cfg = Config(checkpoint=str(tiny_checkpoint), output=str(tmp_path), full_precision=True)
    with pytest.raises(SetupError, match=r"\(bfloat16\).*\(float32\)"):
        _reconcile_committed(cfg, tmp_path, str(tiny_checkpoint))
    _reconcile_committed(Config(checkpoint=str(tiny_checkpoint), output=str(tmp_path)), tmp_path,
                         str(tiny_checkpoint))  # the same model and dtype resumes


def test_launcher_exits_2_naming_both_models(tmp_path: Path) -> None:
    write_long_pdf(tmp_path / "in" / "a.pdf", 2)
    out = tmp_path / "out"
    _commit(out, "other@0123456789ab", "bfloat16")
    r = run_launch(["--input", str(tmp_path / "in"), "--output", str(out), *FAKE], check=False, env=FAKE_MODEL)
    assert r.returncode == 2
    assert "other@0123456789ab (bfloat16)" in r.stderr and "fake (none)" in r.stderr


def test_retry_after_password(tmp_path: Path) -> None:
    write_long_pdf(tmp_path / "a.pdf", 3)
    (tmp_path / "in").mkdir()
    subprocess.run(["zip", "-q", "-P", "s3cret", str(tmp_path / "in" / "p.zip"), "a.pdf"],
                   cwd=tmp_path, check=True)
    assert zipfile.ZipFile(tmp_path / "in" / "p.zip").infolist()[0].flag_bits & 1
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--output", str(out), *FAKE]
    run_launch(args, env={**FAKE_MODEL, "NOUGAT_DIST_ARCHIVE_PASSWORD": ""})
    assert set(pd.read_parquet(out / "pages").status) == {"error"}
    again = run_launch(["--plan", *args], env={**FAKE_MODEL, "NOUGAT_DIST_ARCHIVE_PASSWORD": "s3cret"})
    assert "failed rows     1 " in again.stdout
    run_launch([*args, "--retry-failed"], env={**FAKE_MODEL, "NOUGAT_DIST_ARCHIVE_PASSWORD": "s3cret"})
    pages = pd.read_parquet(out / "pages")
    assert sorted(pages.page) == [1, 2, 3] and set(pages.status) == {"ok"}
    docs = pd.read_parquet(OutputDir(out).documents)
    assert len(docs) == 1 and docs.n_pages[0] == 3
