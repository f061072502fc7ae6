"""Shared fixtures: the tiny random-weight checkpoint, sample PDFs, and a pinned NLTK_DATA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# nougat's markdown postprocessing looks words up in nltk's `words` corpus and its output depends
# on whether the corpus exists, so every test (and every subprocess) uses this fixture.
os.environ["NLTK_DATA"] = str(ROOT / "tests" / "fixtures" / "nltk_data")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testing.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="session")
def sample_pdfs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from testing.samples import write_sample_pdfs

    return write_sample_pdfs(tmp_path_factory.mktemp("samples"), n_docs=3, seed=0)


@pytest.fixture(scope="session")
def bad_pdfs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from testing.samples import write_bad_inputs

    return write_bad_inputs(tmp_path_factory.mktemp("bad"))


def run_launch(args: list[str], *, nproc: int = 0, timeout: float = 300,
               env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run launch.py as a user would: plain python (nproc=0) or under torchrun --standalone."""
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(ROOT / "launch.py"), *args]
    else:
        cmd = [sys.executable, str(ROOT / "launch.py"), *args]
    full_env = {**os.environ, **(env or {})}
    popen = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _stacks_then_kill(popen, args)
        raise AssertionError(f"{cmd} did not finish within {timeout}s; every process's Python "
                             f"stacks (SIGQUIT) are at the end of its stderr:\n{stderr[-20000:]}")
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-6000:]}")
    return proc


def _stacks_then_kill(popen: subprocess.Popen, args: list[str]) -> tuple[str, str]:
    """A hung run: ask every process of it for its stacks (the launcher registers faulthandler on
    SIGQUIT), then kill them all. torchrun puts each rank in a session of its own, so ranks are
    found by their --output argument as well as by the launcher's process group."""
    out = args[args.index("--output") + 1] if "--output" in args else None
    pattern = ["-f", "--", f"--output {out}"] if out else ["-s", str(popen.pid)]
    subprocess.run(["pkill", "-QUIT", *pattern], check=False)
    time.sleep(3)
    subprocess.run(["pkill", "-KILL", *pattern], check=False)
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return popen.communicate(timeout=60)


def rows(out: Path) -> dict[tuple[str, int], str]:
    """Every committed page's text by (doc_id, page); fails if a page was stored twice."""
    import pandas as pd

    df = pd.read_parquet(out / "pages")
    keys = list(zip(df.doc_id, df.page))
    assert len(keys) == len(set(keys)), "a page appears twice"
    return dict(zip(keys, df.text))


def stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text())
