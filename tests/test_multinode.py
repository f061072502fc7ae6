"""Two nodes on one machine (network + UTS + PID namespaces, tests/netns.py), one torchrun each,
c10d rendezvous on the first node, gloo across the bridge: the multi-node path for real.

Needs root (CI runs as root); without it the tests fail, never skip."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, rows, run_launch, stats
from netns import Cluster, Node
from testing import fake_model
from testing.samples import write_long_pdf, write_sample_pdfs

RDZV_PORT = 29400


@pytest.fixture
def nodes():
    if os.geteuid() != 0:
        pytest.fail("the multi-node tests make network namespaces: run them as root")
    with Cluster(2) as c:
        yield c


def torchrun(node: Node, head: Node, args: list[str], *, run_id: str, log: Path,
             env: dict[str, str] | None = None, nnodes: int = 2,
             rdzv: list[str] | None = None) -> subprocess.Popen:
    """What a user types on each node: the same command, rendezvous on the head's hostname
    (or as `rdzv` says)."""
    rdzv = rdzv or [f"--rdzv-endpoint={head.hostname}:{RDZV_PORT}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           "--nproc-per-node=1", "--rdzv-backend=c10d", *rdzv,
           f"--rdzv-id={run_id}", "--max-restarts=0", str(ROOT / "launch.py"), *args]
    env = {"NLTK_DATA": os.environ["NLTK_DATA"], "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return node.popen(cmd, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


def run_job(nodes: Cluster, args: list[str], tmp: Path, run_id: str, timeout: float = 240,
            env: dict[str, str] | None = None, rdzv=None) -> list[str]:
    """The same command on every node; `rdzv(node)` gives a node's rendezvous flags."""
    head = nodes.nodes[0]
    logs = [tmp / f"{run_id}-{n.hostname}.log" for n in nodes.nodes]
    procs = [torchrun(n, head, args, run_id=run_id, log=lg, env=env, rdzv=rdzv(n) if rdzv else None)
             for n, lg in zip(nodes.nodes, logs)]
    return wait_all(procs, logs, timeout)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> list[str]:
    """Wait for every node's torchrun; all must exit 0 (else the logs' tails are the message).
    Returns the logs' texts."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            break
    texts = [lg.read_text(errors="replace") for lg in logs]
    rcs = [p.poll() for p in procs]
    assert rcs == [0] * len(procs), f"exit codes {rcs}\n" + "\n".join(
        f"--- {lg.name}\n{t[-4000:]}" for lg, t in zip(logs, texts))
    return texts


def test_two_nodes_match_one_rank_with_the_tiny_model(nodes, tmp_path, tiny_checkpoint, sample_pdfs):
    common = ["--input", str(sample_pdfs[0].parent), "--checkpoint", str(tiny_checkpoint),
              "--unit-pages", "2", "--device", "cpu", "--num-workers", "1"]
    run_launch([*common, "--output", str(tmp_path / "one")])
    run_job(nodes, [*common, "--output", str(tmp_path / "two")], tmp_path, "tiny")
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert one == two and len(one) == 11
    s = stats(tmp_path / "two")
    hosts = {n.hostname for n in nodes.nodes}
    assert {r["host"] for r in s["per_rank"] if r["pages"] > 0} == hosts, s["per_rank"]
    (attempt,) = s["attempts"]
    assert attempt["hosts"] == sorted(hosts) and attempt["ranks"] == 2 and attempt["pages"] == 11
    assert attempt["exit"] == "complete" and s["attempts_total"]["restarts"] == 0


def test_stealing_crosses_nodes(nodes, tmp_path):
    """Rank 1 is 10x slower: the fast rank, on the other node, takes units from its queue."""
    pdf = write_long_pdf(tmp_path / "book.pdf", 40)
    out = tmp_path / "out"
    run_job(nodes, ["--input", str(pdf), "--output", str(out), "--device", "cpu",
                    "--unit-pages", "1", "--batch-size", "1", "--num-workers", "1"], tmp_path,
            "steal", env=fake_model.env("delay=0.05,delay_rank1=0.5"))
    assert len(rows(out)) == 40
    per_rank = {r["rank"]: r for r in stats(out)["per_rank"]}
    assert per_rank[0]["host"] != per_rank[1]["host"]
    assert per_rank[0]["units_stolen"] > 0, per_rank
    assert per_rank[0]["pages"] > per_rank[1]["pages"] > 0, per_rank


def test_a_hostname_that_resolves_to_loopback_works_with_the_documented_fix(nodes, tmp_path):
    """The first node's /etc/hosts says `127.0.1.1 <its name>`. Given the address as endpoint,
    torchrun then does not see that it should host the rendezvous (it compares the endpoint with
    its hostname's addresses) and every node times out (measured here: RendezvousConnectionError
    after ~80 s). The fix slurm/ocr.sbatch applies and slurm/README.md documents: the address,
    `--rdzv-conf is_host=1` on the first node only, and the interface named for gloo."""
    head = nodes.nodes[0]
    nodes.write_hosts(head, self_loopback=True)
    assert head.run(["getent", "hosts", head.hostname]).stdout.split()[0] == "127.0.1.1"
    out = tmp_path / "out"
    run_job(nodes, ["--input", str(write_long_pdf(tmp_path / "b.pdf", 8)), "--output", str(out),
                    "--device", "cpu", "--unit-pages", "2"],
            tmp_path, "lo", env={"GLOO_SOCKET_IFNAME": "eth0", **fake_model.env("delay=0.05")},
            rdzv=lambda n: [f"--rdzv-endpoint={head.addr}:{RDZV_PORT}",
                            f"--rdzv-conf=is_host={int(n is head)}"])
    assert len(rows(out)) == 8
    assert {r["host"] for r in stats(out)["per_rank"] if r["pages"]} == {n.hostname for n in nodes.nodes}


def _commit(out: Path, rank: int, doc: str, pages: range) -> None:
    from nougat_dist.store.chunks import ChunkWriter

    w = ChunkWriter(out, rank)
    key = f"{doc}:{pages.start}-{pages.stop - 1}"
    w.expect(key, len(pages))
    for p in pages:
        w.add(key, {"doc_id": doc, "source": "s", "member": None, "page": p, "text": "t",
                    "status": "ok", "error": None, "n_tokens": 1, "elapsed_ms": 1.0, "rank": rank,
                    "model": "m", "dtype": "d"})
    w.commit()


def test_attempts_add_up_across_a_kill_a_stop_and_the_finish(tmp_path, monkeypatch):
    """Three attempts of a 2-rank job: one killed (no end recorded), one stopped, the last one
    finishing; pages are attributed by the chunks each rank committed in each attempt."""
    from nougat_dist.store import attempts

    out = tmp_path / "out"
    plan = [("run.0", "cuda:0", None, [range(1, 3)], [range(3, 4)]),
            ("run.1", "cuda:0", 75, [range(4, 6)], []),
            ("run.2", "cuda:0", None, [range(6, 7)], [range(7, 9)])]
    for run_id, device, code, mine0, mine1 in plan:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id.split(".")[0])
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", run_id.split(".")[1])
        for rank, mine in ((0, mine0), (1, mine1)):
            rec = attempts.AttemptRecord(out, rank, 2, device)
            rec.begin()
            for pages in mine:
                _commit(out, rank, "d", pages)
            if code is not None:
                rec.end(code)
    s = attempts.summarize(out, attempts.current_attempt())
    assert [a["exit"] for a in s["attempts"]] == ["killed (no exit recorded)", "stopped", "complete"]
    assert [a["pages"] for a in s["attempts"]] == [3, 2, 3]
    assert all(a["ranks"] == 2 and a["gpu_ranks"] == 2 for a in s["attempts"])
    assert s["attempts_total"]["pages"] == 8 and s["attempts_total"]["restarts"] == 2
    assert s["attempts_total"]["gpu_hours"] > 0


def test_rank0_waits_until_it_sees_every_committed_chunk(tmp_path):
    import threading

    from nougat_dist.errors import SetupError
    from nougat_dist.store.attempts import wait_for_chunks

    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "part-r00000-000000.parquet").write_bytes(b"x")
    # A chunk another node renamed into place that this node's listing shows only later.
    late = threading.Timer(1.0, (pages / "part-r00001-000000.parquet").write_bytes, [b"x"])
    late.start()
    waited = wait_for_chunks(tmp_path, ["part-r00000-000000.parquet", "part-r00001-000000.parquet"],
                             poll_s=0.1)
    late.join()
    assert waited > 0.5
    with pytest.raises(SetupError, match="part-r00002-000000.parquet"):
        wait_for_chunks(tmp_path, ["part-r00002-000000.parquet"], timeout_s=0.3, poll_s=0.1)


def _chunks(out: Path) -> list[Path]:
    return [p for p in (out / "pages").glob("part-*.parquet")] if (out / "pages").is_dir() else []


@pytest.mark.faults
@pytest.mark.timeout(600)
def test_a_node_dies_the_survivor_exits_and_the_same_command_resumes(nodes, tmp_path):
    corpus = tmp_path / "in"
    write_sample_pdfs(corpus, n_docs=3, seed=5)
    write_long_pdf(corpus / "book.pdf", 30, seed=5)
    args = ["--input", str(corpus), "--unit-pages", "2", "--commit-pages", "2",
            "--commit-seconds", "0.5", "--device", "cpu", "--num-workers", "1"]
    model = fake_model.env("delay=0.2")
    run_launch([*args, "--output", str(tmp_path / "ref")], env=model)
    reference = rows(tmp_path / "ref")
    out = tmp_path / "out"
    job = [*args, "--output", str(out)]
    head, victim = nodes.nodes
    logs = [tmp_path / f"kill-{n.hostname}.log" for n in nodes.nodes]
    procs = [torchrun(n, head, job, run_id="job", log=lg, env=model)
             for n, lg in zip(nodes.nodes, logs)]
    deadline = time.monotonic() + 180
    while not _chunks(out):
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, \
            "no commit before the kill\n" + "\n".join(lg.read_text()[-3000:] for lg in logs)
        time.sleep(0.1)
    # The whole node at once: its torchrun is the init of the node's PID namespace.
    os.kill(procs[1].pid, signal.SIGKILL)
    killed = time.monotonic()
    procs[1].wait(timeout=30)
    try:
        rc = procs[0].wait(timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the surviving node did not exit within 240 s of the node loss\n"
                    + logs[0].read_text()[-4000:])
    print(f"survivor exited {rc} after {time.monotonic() - killed:.1f} s")
    assert rc != 0
    assert not (out / "stats.json").exists()
    committed = len(pd.read_parquet(out / "pages"))
    assert 0 < committed < len(reference), committed
    survivor_text = logs[0].read_text()
    rank_logs = "".join(p.read_text() for p in (out / "logs").glob("rank*.log"))
    assert "the work loop failed" in rank_logs, survivor_text[-3000:]
    run_job(nodes, job, tmp_path, "job", env=model)
    assert rows(out) == reference
    s = stats(out)
    assert s["pages_resumed"] >= committed
    first, last = s["attempts"]
    # The dead node wrote nothing; the survivor's record names the lost peer.
    assert "killed (no exit recorded)" in first["exit"], first
    # gloo says "Connection closed by peer [addr]" or "Read error [addr]: Connection reset by peer".
    assert "by peer" in first["exit"] and f"[{victim.addr}]" in first["exit"], first
    assert last["exit"] == "complete" and s["attempts_total"]["restarts"] == 1
    assert first["pages"] + last["pages"] == len(reference)
    assert first["hosts"] == last["hosts"] == sorted(n.hostname for n in nodes.nodes)
