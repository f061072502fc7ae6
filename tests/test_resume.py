"""Kill anything at any instant, run again: every page exactly once, same text as an uninterrupted
run. Also graceful stop (SIGTERM), injected GPU OOM, and stale temp files."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, run_launch
from testing import fake_model, faults
from testing.samples import write_long_pdf, write_sample_pdfs

FAKE = ["--unit-pages", "2", "--commit-pages", "4", "--commit-seconds", "0.5", "--device", "cpu"]
FAKE_MODEL = fake_model.env("delay=0.05")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    write_sample_pdfs(d, n_docs=4, seed=7)
    write_long_pdf(d / "book.pdf", 24)
    return d


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ref") / "out"
    run_launch(["--input", str(corpus), "--output", str(out), *FAKE], nproc=2, env=FAKE_MODEL)
    return page_texts(out)


def page_texts(out: Path) -> dict:
    df = pd.read_parquet(out / "pages")
    keys = list(zip(df.doc_id, df.page))
    assert len(keys) == len(set(keys)), "duplicate (doc_id, page) rows"
    return dict(zip(keys, df.text))


def start(args: list[str], nproc: int, env: dict | None = None) -> subprocess.Popen:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
           if nproc else [sys.executable])
    return subprocess.Popen([*cmd, str(ROOT / "launch.py"), *args], cwd=ROOT,
                            env={**os.environ, **(env or {})}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_group(proc: subprocess.Popen, out: Path) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    # torchrun starts each rank in a session of its own, so a rank whose agent was SIGKILLed
    # outlives the group kill (blocked in a collective until the process-group timeout).
    # Real clusters reap it with the job; here it must not leak into the next trial.
    subprocess.run(["pkill", "-9", "-f", "--", f"--output {out}"], check=False)


def rank_pids(proc: subprocess.Popen, out: Path) -> dict[int, int]:
    """Rank → pid for the ranks of a torchrun. torchrun starts each rank in a session of its own,
    so they are found by their --output argument and torchrun as their parent (render workers
    share the command line but are the ranks' children)."""
    found = subprocess.run(["pgrep", "-f", "--", f"--output {out}"], capture_output=True, text=True)
    ranks = {}
    for pid in map(int, found.stdout.split()):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(next(x for x in status.splitlines() if x.startswith("PPid:")).split()[1])
        rank = next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)
        if ppid == proc.pid and rank is not None:
            ranks[rank] = pid
    return ranks


def committed_rows(out: Path) -> int:
    """Page rows in the committed chunks (footers only; a chunk is committed once renamed)."""
    import pyarrow.parquet as pq

    total = 0
    for chunk in (out / "pages").glob("part-*.parquet"):
        try:
            total += pq.read_metadata(chunk).num_rows
        except OSError:  # taken out by a concurrent dedup rewrite: counted on the next poll
            pass
    return total


@pytest.mark.faults
@pytest.mark.parametrize("trial", range(20))
def test_sigkill_at_a_random_point_of_the_work_then_resume(tmp_path, corpus, reference, trial):
    """The kill lands at a random point *of the work*: once a random number of pages (at least
    one, at most half) is committed, read from the output dir. Even trials kill the whole job,
    odd ones one rank (torchrun then tears the other down). The trial fails if the kill landed
    before any page or after the last one; the resumed output equals an uninterrupted run."""
    seed = 1000 + trial
    rng = random.Random(seed)
    total = len(reference)
    target = rng.randint(1, total // 2)
    whole_job = trial % 2 == 0
    print(f"seed {seed}: kill {'the whole job' if whole_job else 'one rank'} after {target} of "
          f"{total} pages are committed")
    out = tmp_path / "out"
    # Slower pages than the reference's (the fake text does not depend on the delay): the rest
    # of the work outlasts the poll that sees the target reached.
    args = ["--input", str(corpus), "--output", str(out), *FAKE]
    slow = fake_model.env("delay=0.3")
    proc = start(args, nproc=2, env=slow)
    deadline = time.monotonic() + 180
    while committed_rows(out) < target:
        assert proc.poll() is None, f"the job ended before {target} pages were committed"
        assert time.monotonic() < deadline, "no progress within 180 s"
        time.sleep(0.02)
    if whole_job:
        kill_group(proc, out)
    else:
        pids = rank_pids(proc, out)
        assert pids, "the ranks finished before the kill"
        os.kill(pids[rng.choice(sorted(pids))], signal.SIGKILL)
        proc.wait(timeout=120)
        kill_group(proc, out)
    at_kill = committed_rows(out)
    assert 0 < at_kill < total and not (out / "stats.json").exists(), (at_kill, total)
    run_launch(args, nproc=2, env=slow)
    assert page_texts(out) == reference
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pages_resumed"] >= at_kill - stats["duplicate_rows_removed"]
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.faults
@pytest.mark.parametrize("point", ["commit:2", "commit:1@1", "manifest:2"])
def test_killed_during_commit_or_manifest_build(tmp_path, corpus, reference, point):
    out = tmp_path / "out"
    args = ["--input", str(corpus), "--output", str(out), *FAKE]
    proc = start(args, nproc=2, env={**FAKE_MODEL, **faults.env(point)})
    try:
        proc.wait(timeout=120)
    finally:
        kill_group(proc, out)
    assert proc.returncode != 0
    if point.startswith("commit"):
        assert list((out / "pages").glob(".tmp-*")), "the fault should leave a half-done commit"
    else:
        assert not (out / "manifest.parquet").exists()
    run_launch(args, nproc=2, env=FAKE_MODEL)
    assert page_texts(out) == reference
    assert not list(out.rglob(".tmp-*"))


@pytest.mark.faults
def test_a_rank_whose_peer_died_commits_its_pages_on_the_stop(tmp_path, corpus, reference):
    out = tmp_path / "out"
    # No periodic commits: whatever reaches pages/ after the kill was committed by the stop.
    args = ["--input", str(corpus), "--output", str(out), "--unit-pages", "2",
            "--commit-pages", "100000", "--commit-seconds", "100000", "--device", "cpu"]
    slow = fake_model.env("delay=0.2")
    proc = start(args, nproc=2, env=slow)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            live = json.loads((out / "status.json").read_text()) if (out / "status.json").exists() else {}
            if live.get("per_rank") and live["per_rank"][0]["pages"] >= 4:
                break
            time.sleep(0.2)
        assert not list((out / "pages").glob("part-*"))
        os.kill(rank_pids(proc, out)[1], signal.SIGKILL)
        # torchrun sends SIGTERM to rank 0, whose next status round can never complete
        deadline = time.time() + 25
        while not list((out / "pages").glob("part-r00000-*.parquet")) and time.time() < deadline:
            time.sleep(0.2)
        committed = pd.read_parquet(out / "pages")
        assert len(committed) >= 4 and set(committed["rank"]) == {0}
    finally:
        kill_group(proc, out)
    run_launch(args, nproc=2, env=slow)
    assert page_texts(out) == reference


def test_sigterm_stops_within_a_batch_and_resumes(tmp_path, corpus, reference):
    out = tmp_path / "out"
    args = ["--input", str(corpus), "--output", str(out), "--unit-pages", "2",
            "--commit-pages", "4", "--batch-size", "2", "--device", "cpu"]
    slow = fake_model.env("delay=0.3")
    proc = start(args, nproc=0, env=slow)
    deadline = time.time() + 120
    while not list((out / "pages").glob("part-*.parquet")) and time.time() < deadline:
        time.sleep(0.2)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as Slurm and Ctrl-C do
    proc.wait(timeout=60)
    stopped_in = time.time() - t0
    assert proc.returncode == 75, proc.stderr.read()[-3000:]
    assert not list(out.rglob(".tmp-*"))
    assert not (out / "stats.json").exists()  # not complete yet
    done = len(pd.read_parquet(out / "pages"))
    assert 0 < done < len(reference)
    print(f"stopped {stopped_in:.2f}s after SIGTERM")
    run_launch(args, env=slow)
    texts = page_texts(out)
    assert set(texts) == set(reference)
    assert json.loads((out / "stats.json").read_text())["pages_resumed"] == done


def test_injected_oom_halves_the_batch_and_output_is_unchanged(tmp_path, corpus, reference):
    out = tmp_path / "out"
    run_launch(["--input", str(corpus), "--output", str(out), "--unit-pages", "2",
                "--batch-size", "4", "--device", "cpu"], env=fake_model.env("delay=0.01,oom_above=1"))
    assert page_texts(out) == reference
    stats = json.loads((out / "stats.json").read_text())
    assert sum(r["oom_retries"] for r in stats["per_rank"]) > 0
