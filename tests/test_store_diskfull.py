"""Out of space while committing: one line, exit 2, nothing committed lost, the same command resumes.

The space limit is a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so a write fails with
EFBIG instead of killing the process): it needs no privileges, and the store treats EFBIG, ENOSPC
and EDQUOT alike."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd

from conftest import ROOT, rows, run_launch, stats
from nougat_dist.store.layout import OutputDir
from testing import fake_model
from testing.samples import write_long_pdf

FAKE = ["--device", "cpu", "--num-workers", "0"]
# Pages of 2 kB of text that does not compress: the new book's chunk is far larger than the
# manifest (which holds each page's size and the PDF's metadata).
FAKE_MODEL = fake_model.env("delay=0,text_bytes=2000")


def test_no_space_keeps_every_committed_page_and_says_what_to_do(tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
    write_long_pdf(inp / "a.pdf", 3, seed=1)
    args = ["--input", str(inp), "--output", str(out), *FAKE, "--commit-pages", "1000"]
    run_launch(args, env=FAKE_MODEL)
    before = rows(out)
    layout = OutputDir(out)
    chunks = {p.name: p.read_bytes() for p in layout.pages.iterdir()}
    # A book whose single chunk outgrows a limit that the other files this run writes (the
    # manifest, one row longer, is the largest) fit in.
    write_long_pdf(inp / "book.pdf", 40, seed=2)
    limit = int(1.15 * layout.manifest.stat().st_size)
    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT,
                          env={**os.environ, **FAKE_MODEL}, preexec_fn=limited,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 2, full.stderr[-3000:]
    assert "no space to write" in full.stderr and "run the same command again" in full.stderr
    assert "Traceback" not in full.stderr
    # The fault landed where it should: the new pages were not stored, the old ones are intact.
    assert rows(out) == before
    assert {p.name: p.read_bytes() for p in layout.pages.iterdir()} == chunks
    assert not list(out.rglob(".tmp-*"))
    run_launch(args, env=FAKE_MODEL)  # room again: the same command finishes the job
    after = rows(out)
    assert len(after) == 43 and {k: after[k] for k in before} == before
    assert stats(out)["pages_this_run"] == 40
    assert len(pd.read_parquet(layout.documents)) == 2
