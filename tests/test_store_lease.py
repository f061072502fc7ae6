"""One writer per output directory: the lease, its takeover rules, and two real jobs on one output."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, run_launch
from nougat_dist.store.layout import OutputDir
from nougat_dist.store.lease import Lease, LeaseHeld, job_id_from_env
from testing import fake_model
from testing.samples import write_long_pdf


def _foreign(out: OutputDir, *, host: str = "other-node", pid: int = 12345, job: str = "slurm:1",
             heartbeat: float | None = None) -> None:
    now = time.time()
    out.lease.write_text(json.dumps({"host": host, "pid": pid, "job_id": job, "token": "t",
                                     "heartbeat": now if heartbeat is None else heartbeat,
                                     "started": now}))


def test_second_job_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    first = Lease(out, "slurm:7")
    first.acquire()
    with pytest.raises(LeaseHeld, match=rf"host {platform.node()}, pid {os.getpid()}, slurm:7"):
        Lease(out, "slurm:8").acquire()
    first.release()
    assert not out.lease.exists()
    Lease(out, "slurm:8").acquire()  # free again once released


def test_same_job_takes_its_lease_back(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    _foreign(out, job="torchrun:abc")
    Lease(out, "torchrun:abc").acquire()  # an elastic restart or a requeue of the holder
    assert json.loads(out.lease.read_text())["pid"] == os.getpid()


def test_live_foreign_lease_blocks_and_stale_one_is_taken_over(tmp_path: Path, caplog) -> None:
    out = OutputDir(tmp_path)
    _foreign(out)
    with pytest.raises(LeaseHeld, match="other-node, pid 12345, slurm:1"):
        Lease(out, "slurm:2").acquire(stale_after_s=300)
    _foreign(out, heartbeat=time.time() - 301)
    with caplog.at_level(logging.WARNING):
        Lease(out, "slurm:2").acquire(stale_after_s=300)
    assert "took over the lease" in caplog.text and "heartbeat is older" in caplog.text
    assert json.loads(out.lease.read_text())["job_id"] == "slurm:2"


def test_dead_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    _foreign(out, host=platform.node(), pid=int(dead.stdout), job="")
    Lease(out, "").acquire()
    assert json.loads(out.lease.read_text())["pid"] == os.getpid()


def test_renew_notices_a_lost_lease(tmp_path: Path) -> None:
    out = OutputDir(tmp_path)
    lease = Lease(out, "slurm:3")
    lease.acquire()
    before = json.loads(out.lease.read_text())["heartbeat"]
    assert lease.renew() and json.loads(out.lease.read_text())["heartbeat"] >= before
    _foreign(out)
    assert not lease.renew()
    lease.release()
    assert out.lease.exists(), "released a lease that was not ours"


def test_job_id_from_launchers() -> None:
    assert job_id_from_env({"SLURM_JOB_ID": "42", "TORCHELASTIC_RUN_ID": "x"}) == "slurm:42"
    assert job_id_from_env({"TORCHELASTIC_RUN_ID": "x"}) == "torchrun:x"
    assert job_id_from_env({}) == ""


def test_two_jobs_on_one_output(tmp_path: Path) -> None:
    """The second job exits 2 naming the first; the first completes with every page once."""
    # A slow first job (sleeping, not computing) so the second starts while it runs.
    write_long_pdf(tmp_path / "in" / "book.pdf", 4)
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--output", str(out), "--device", "cpu",
            "--unit-pages", "1", "--commit-pages", "1", "--batch-size", "1", "--num-workers", "0"]
    first = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT,
                             env={**os.environ, **fake_model.env("delay=6")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lease = OutputDir(out).lease
        while not lease.exists():
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.1)
        second = run_launch(args, check=False, env={"SLURM_JOB_ID": "999"})
        still_running = first.poll() is None
        # The refused job left no attempt record: every record is the first job's.
        records = [json.loads(p.read_text()) for p in (out / "attempts").glob("*.json")]
    finally:
        _, err = first.communicate(timeout=300)
    assert still_running, "the first job ended before the second started: nothing was tested"
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"pid {first.pid}" in second.stderr and "another job" in second.stderr
    assert records and {r["pid"] for r in records} == {first.pid}
    assert first.returncode == 0, err[-3000:]
    df = pd.read_parquet(out / "pages")
    assert sorted(df.page) == list(range(1, 5))
    assert not lease.exists()
