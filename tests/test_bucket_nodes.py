"""Two nodes, one bucket, no shared output directory.

Two "nodes" (network + UTS + PID namespaces, tests/netns.py), one torchrun each, write one job to
the same ``s3://`` prefix. Each node has its own staging directory and its own download cache;
the inputs are in the bucket too. What one node commits reaches the other only through the
bucket, as on a Kubernetes cluster with no shared file system.

The S3 server (moto) runs inside the cluster's bridge namespace, on an address given to the
bridge there, so both nodes reach it over their veth and nothing is added to the host's network.
The test process itself has no route to it: what the test asks the bucket (create it, upload
the inputs, wait for a committed chunk, download the prefix) runs in that namespace too.

Needs root (CI runs as root); without it the tests fail, never skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import rows, stats
from netns import Cluster, _ip
from test_multinode import torchrun, wait_all
from testing import fake_model

BRIDGE_ADDR = "10.77.0.254"  # the bridge's own address, inside the cluster's switch namespace
S3_PORT = 5000
ENDPOINT = f"http://{BRIDGE_ADDR}:{S3_PORT}"
BUCKET = "two-nodes"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": ENDPOINT}

# What the test asks the bucket, run with the switch namespace's network: argv[1] is the request.
ASK = r"""
import sys, time
import fsspec
fs = fsspec.filesystem("s3", skip_instance_cache=True)
op, args = sys.argv[1], sys.argv[2:]
if op == "mkbucket":
    deadline = time.monotonic() + 60
    while True:
        try:
            fs.mkdir(args[0])
            break
        except Exception:  # noqa: BLE001 - the server is still starting (refused, reset)
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
elif op == "put":
    fs.put(args[0], args[1], recursive=True)
elif op == "wait-chunks":  # until a committed chunk is in the bucket; prints how many
    deadline = time.monotonic() + float(args[1])
    while time.monotonic() < deadline:
        fs.invalidate_cache()
        found = fs.glob(args[0] + "/pages/part-*.parquet")
        if found:
            print(len(found))
            sys.exit(0)
        time.sleep(0.1)
    sys.exit(1)
elif op == "get":
    fs.invalidate_cache()
    fs.get(args[0] + "/", args[1], recursive=True)
"""


class ClusterBucket:
    """The S3 server on the cluster's bridge, and the test's requests to it."""

    def __init__(self, cluster: Cluster, log: Path) -> None:
        self.cluster = cluster
        _ip("-n", cluster.switch, "addr", "add", f"{BRIDGE_ADDR}/24", "dev", "br0")
        _ip("-n", cluster.switch, "link", "set", "lo", "up")
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", cluster.switch, sys.executable, "-m", "moto.server",
             "-H", BRIDGE_ADDR, "-p", str(S3_PORT)],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.ask("mkbucket", BUCKET)

    def ask(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["ip", "netns", "exec", self.cluster.switch, sys.executable, "-c", ASK,
                               *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **S3_ENV})
        if check and proc.returncode != 0:
            raise AssertionError(f"bucket request {args} exited {proc.returncode}: {proc.stderr[-3000:]}")
        return proc

    def wait_chunks(self, prefix: str, timeout: float) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.cluster.switch, sys.executable, "-c",
                                 ASK, "wait-chunks", f"{BUCKET}/{prefix}", str(timeout)],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, **S3_ENV})

    def copy(self, prefix: str, dest: Path) -> Path:
        """Everything under the prefix as a directory: what a reader of the bucket sees."""
        self.ask("get", f"{BUCKET}/{prefix}", str(dest))
        return dest

    def close(self) -> None:
        os.killpg(self.server.pid, signal.SIGKILL)
        self.server.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Two nodes, the S3 server on their bridge, and the inputs in the bucket."""
    from testing.samples import write_long_pdf, write_sample_pdfs

    if os.geteuid() != 0:
        pytest.fail("the two-node bucket tests make network namespaces: run them as root")
    tmp = tmp_path_factory.mktemp("bucket-nodes")
    corpus = tmp / "corpus"
    write_sample_pdfs(corpus, n_docs=2, seed=7)
    write_long_pdf(corpus / "book.pdf", 40, seed=7)
    with Cluster(2) as c:
        b = ClusterBucket(c, tmp / "s3-server.log")
        try:
            b.ask("put", f"{corpus}/", f"{BUCKET}/in/")
            yield c, b, tmp
        finally:
            b.close()


def node_env(tmp: Path, name: str) -> dict[str, str]:
    """A node's own disk: its staging directory and download cache."""
    return {**S3_ENV, "NOUGAT_DIST_STAGING": str(tmp / name / "staging"),
            "NOUGAT_DIST_CACHE": str(tmp / name / "cache"), "NOUGAT_DIST_SYNC_SECONDS": "0.3"}


def job_args(prefix: str) -> list[str]:
    return ["--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/{prefix}",
            "--unit-pages", "2", "--commit-pages", "2",
            "--commit-seconds", "0.5", "--device", "cpu", "--num-workers", "1"]


def start(c: Cluster, tmp: Path, args: list[str], disks: list[str], tag: str,
          delay: float) -> tuple[list, list[Path]]:
    """The job on both nodes, each rank with the fake model at `delay` seconds a page."""
    head = c.nodes[0]
    logs = [tmp / f"{tag}-{n.hostname}.log" for n in c.nodes]
    model = fake_model.env(f"delay={delay}")
    procs = [torchrun(n, head, args, run_id=tag.split("-")[0], log=lg,
                      env={**node_env(tmp, disk), **model})
             for n, lg, disk in zip(c.nodes, logs, disks)]
    return procs, logs


def finish(procs: list, logs: list[Path], timeout: float = 300) -> None:
    wait_all(procs, logs, timeout)


def chunk_ranks(d: Path) -> set[str]:
    return {p.name[len("part-"):][:6] for p in d.rglob("part-r*.parquet")}


def every_page_once(out: Path) -> dict:
    """The rows of out, checked against its manifest: each page of each document exactly once."""
    got = rows(out)  # fails on a page stored twice
    manifest = pd.read_parquet(out / "manifest.parquet")
    want = {(d, p) for d, n in zip(manifest.doc_id, manifest.n_pages) for p in range(1, n + 1)}
    assert set(got) == want and len(want) == manifest.n_pages.sum() > 40
    return got


@pytest.fixture(scope="module")
def uninterrupted(cluster) -> dict:
    c, b, tmp = cluster
    procs, logs = start(c, tmp, job_args("clean"), ["a", "b"], "clean", 0)
    finish(procs, logs)
    got = b.copy("clean", tmp / "clean-bucket")
    return {"rows": every_page_once(got), "out": got}


def test_two_nodes_write_one_job_to_one_bucket_prefix(cluster, uninterrupted):
    c, _, tmp = cluster
    out = uninterrupted["out"]
    s = stats(out)
    assert s["complete"] and s["world_size"] == 2
    assert {r["host"] for r in s["per_rank"] if r["pages"] > 0} == {n.hostname for n in c.nodes}
    assert not (out / "lease.json").exists()  # released at the end
    # Both ranks' chunks are in the bucket. Each node staged only what it wrote, except rank 0's,
    # which pulled the other node's chunks from the bucket to finalize them.
    assert chunk_ranks(out / "pages") == {"r00000", "r00001"}
    staged = sorted([chunk_ranks(tmp / disk / "staging") for disk in ("a", "b")], key=len)
    assert len(staged[0]) == 1 and staged[1] == {"r00000", "r00001"}, staged


@pytest.mark.faults
@pytest.mark.timeout(900)
def test_a_node_killed_mid_run_then_resumed_equals_the_uninterrupted_job(cluster, uninterrupted):
    """kill -9 of one node's ranks once the bucket holds a committed chunk; the survivor exits;
    the same command on a replacement node (empty staging dir and cache) and the survivor's
    node resumes from the bucket, and the bucket ends up as after the uninterrupted job."""
    c, b, tmp = cluster
    reference = uninterrupted["rows"]
    waiter = b.wait_chunks("killed", timeout=240)
    procs, logs = start(c, tmp, job_args("killed"), ["c", "d"], "killed-1", 0.3)
    try:
        waiter.wait(timeout=300)
    finally:
        # The whole node at once: its torchrun is the init of the node's PID namespace.
        os.kill(procs[1].pid, signal.SIGKILL)
    at_kill = int(waiter.stdout.read().strip() or 0)
    assert waiter.returncode == 0 and at_kill > 0, "no chunk reached the bucket before the kill\n" + \
        "\n".join(lg.read_text(errors="replace")[-3000:] for lg in logs)
    procs[1].wait(timeout=30)
    try:
        rc = procs[0].wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the surviving node did not exit after the node loss\n" + logs[0].read_text()[-4000:])
    assert rc != 0
    after = b.copy("killed", tmp / "killed-at-kill")
    assert not (after / "stats.json").exists()
    committed = len(rows(after))
    print(f"at the kill: {at_kill} chunk(s) in the bucket; after the survivor exited ({rc}): "
          f"{committed} of {len(reference)} pages")
    assert 0 < committed < len(reference), committed

    # The killed node is replaced by a fresh one: nothing staged, nothing cached.
    procs, logs = start(c, tmp, job_args("killed"), ["c", "e"], "killed-2", 0)
    finish(procs, logs)
    got = b.copy("killed", tmp / "killed-bucket")
    assert every_page_once(got) == reference
    s = stats(got)
    assert s["complete"] and s["pages_resumed"] >= committed
    assert [a["exit"] for a in s["attempts"]][-1] == "complete" and len(s["attempts"]) == 2
    assert not (got / "lease.json").exists()
