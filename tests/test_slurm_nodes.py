"""slurm/ocr.sbatch on a real two-node Slurm cluster: slurmctld plus one slurmd per "node", each
node a network + UTS namespace of its own (tests/netns.py: own hostname, own address on a bridge,
own /etc/hosts). `sbatch --nodes=2` runs one torchrun per node with the c10d rendezvous on the
first node's address, and the ranks talk gloo across the bridge, as on a real cluster.

Two jobs: one that runs to the end (both nodes commit pages, the output holds every page exactly
once) and one that gets USR1 near its "time limit" mid-run, stops on both nodes, requeues itself and
completes in its second attempt. Needs root (namespaces, slurmd); fails, never skips, without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from netns import Cluster, Node
from test_slurm import Cluster as SlurmCluster
from test_slurm import _tail, check_complete, ensure_slurm, job_env

CTLD_PORT, SLURMD_PORT = 6817, 6818  # inside the namespaces made here: nothing else listens there


def _in_node(node: Node, cmd: list[str]) -> list[str]:
    """`cmd` in `node`'s network and UTS namespaces (its hostname), in the host's PID namespace:
    slurmd reads /proc for the processes of its jobs, which a PID namespace without its own /proc
    would confuse. `ip netns exec` mounts a fresh /sys without the cgroup file systems slurmd
    checks for at start; the host's v1 hierarchies are mounted again there (in that command's own
    mount namespace; the same controllers' hierarchies, not new ones)."""
    return ["ip", "netns", "exec", node.netns, "unshare", "--uts", "sh", "-c",
            f'{MOUNT_CGROUPS} && hostname "$0" && exec "$@"', node.hostname, *cmd]


MOUNT_CGROUPS = ("mount -t tmpfs cgroup_root /sys/fs/cgroup && for c in " + " ".join(
    ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "pids")) +
    "; do mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c || exit; done")


class SlurmNodes(SlurmCluster):
    """slurmctld on node 0 and a slurmd on every node, in a temp dir; client commands run on
    node 0. Jobs, waiting and stopping are the one-node cluster's (tests/test_slurm.py)."""

    def __init__(self, nodes: Cluster, root: Path) -> None:
        super().__init__(root)
        self.nodes = nodes

    def write_config(self) -> None:
        for d in ("state", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        head = self.nodes.nodes[0]
        node_lines = "\n".join(f"NodeName={n.hostname} NodeAddr={n.addr} CPUs=2 State=UNKNOWN"
                               for n in self.nodes.nodes)
        # %n: each slurmd's own spool, pid and log file (they share one file system here, as
        # several slurmds on one host do).
        self.conf.write_text(f"""\
ClusterName=nougatnodes
SlurmctldHost={head.hostname}({head.addr})
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool-%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd-%n.log
# Process groups, not cgroups: two slurmds on one kernel would share the cgroup paths of a job
# (…/slurm/uid_0/job_<id>) that runs on both of them.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
FirstJobId={10_000 + os.getpid() % 80_000}
{node_lines}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (self.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        for n in self.nodes.nodes:
            (self.root / f"spool-{n.hostname}").mkdir(exist_ok=True)

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command on node 0 (it reaches slurmctld at node 0's address)."""
        env = kw.pop("env", self.env)
        proc = subprocess.run(_in_node(self.nodes.nodes[0], list(cmd)), capture_output=True,
                              text=True, env=env, timeout=60, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def start(self) -> None:
        self.write_config()
        log = open(self.root / "log" / "daemons.out", "ab")
        head = self.nodes.nodes[0]
        cmds = [(head, ["slurmctld", "-D", "-f", str(self.conf)])]
        cmds += [(n, ["slurmd", "-D", "-f", str(self.conf), "-N", n.hostname]) for n in self.nodes.nodes]
        for node, cmd in cmds:
            # ip, unshare and sh exec in turn: the process is the daemon (stop() signals it)
            self.procs.append(subprocess.Popen(_in_node(node, cmd), stdout=log,
                                               stderr=subprocess.STDOUT, env=self.env))
        log.close()
        until = time.monotonic() + 45
        while time.monotonic() < until:
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"{p.args[-4:]} exited {p.returncode} at start:\n{self.logs()}")
            states = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
            idle = {line.split()[0] for line in states if line.strip().endswith("idle")}
            if idle == {n.hostname for n in self.nodes.nodes}:
                return
            time.sleep(0.5)
        raise AssertionError(f"the nodes did not become idle in 45 s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-2500:]
                         for p in sorted((self.root / "log").glob("*")))

    def submit(self, out_log: Path, env: dict[str, str], *sbatch_args: str) -> str:
        return super().submit(out_log, env, "--nodes=2", *sbatch_args)


@pytest.fixture(scope="module")
def slurm_nodes(tmp_path_factory: pytest.TempPathFactory):
    if os.geteuid() != 0:
        pytest.fail("the two-node Slurm tests make network namespaces and run slurmd: run as root")
    ensure_slurm()
    with Cluster(2) as nodes:
        c = SlurmNodes(nodes, tmp_path_factory.mktemp("slurm-nodes"))
        try:
            c.start()
            yield c
        finally:
            c.stop()


@pytest.fixture(scope="module")
def pdfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testing.samples import write_long_pdf, write_sample_pdfs

    root = tmp_path_factory.mktemp("slurm-nodes-pdfs")
    write_sample_pdfs(root, n_docs=3, seed=3)
    write_long_pdf(root / "long_24.pdf", 24, seed=3)
    return root


def _hosts_that_worked(out: Path) -> set[str]:
    stats = json.loads((out / "stats.json").read_text())
    return {r["host"] for r in stats["per_rank"] if r["pages"] > 0}


def _node_env(pdf_dir: Path, out: Path, **kw) -> dict[str, str]:
    env = job_env(pdf_dir, out, **kw)
    env["GPUS_PER_NODE"] = "1"  # one rank per node: 2 CPUs each
    return env


@pytest.mark.timeout(300)
def test_two_node_sbatch_job_completes(slurm_nodes: SlurmNodes, pdfs: Path, tmp_path: Path,
                                       tiny_checkpoint: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "job.out"
    job_id = slurm_nodes.submit(log, _node_env(pdfs, out, checkpoint=tiny_checkpoint))
    info = slurm_nodes.wait_done(job_id, log)
    detail = f"{_tail(log)}\n{_tail(out / 'logs' / 'rank0.log')}\n{slurm_nodes.logs()}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", detail
    assert set(info["NodeList"].split(",")) == {n.hostname for n in slurm_nodes.nodes.nodes}, info
    head = slurm_nodes.nodes.nodes[0]
    assert f"rendezvous {head.addr}:" in log.read_text(), detail
    check_complete(out)
    # both nodes OCR'd pages, each under its own hostname
    assert _hosts_that_worked(out) == {n.hostname for n in slurm_nodes.nodes.nodes}, detail
    for i in (0, 1):
        assert (out / "logs" / f"slurm-{job_id}-attempt0-node{i}.log").exists(), detail


@pytest.mark.timeout(300)
def test_two_node_usr1_stops_both_nodes_requeues_and_resumes(slurm_nodes: SlurmNodes, pdfs: Path,
                                                              tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "job.out"
    job_id = slurm_nodes.submit(log, _node_env(pdfs, out, delay=0.5))  # paced: USR1 lands mid-run
    while not list((out / "pages").glob("*.parquet")):
        state = slurm_nodes.job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING") or slurm_nodes.remaining() <= 0:
            raise AssertionError(f"job {job_id} is {state} before its first commit\n{_tail(log)}")
        time.sleep(0.2)
    slurm_nodes.run("scancel", "--signal=USR1", "--batch", job_id)
    info = slurm_nodes.wait_done(job_id, log)
    text = log.read_text()
    rank_logs = "".join(p.read_text() for p in sorted((out / "logs").glob("rank*.log")))
    detail = f"{_tail(log)}\n{rank_logs[-4000:]}\n{slurm_nodes.logs()}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", detail
    assert info["Restarts"] == "1", detail
    assert f"requeueing job {job_id}" in text and f"attempt 1 of job {job_id}" in text, detail
    stats = check_complete(out)
    first = stats["attempts"][0]
    # the stop reached the ranks of both nodes, and attempt 0 had committed part of the job
    assert first["exit"] == "stopped" and sorted(first["hosts"]) == sorted(
        n.hostname for n in slurm_nodes.nodes.nodes), stats["attempts"]
    assert 0 < stats["pages_resumed"] < stats["pages_total"], stats
    for rank in (0, 1):  # each node's rank committed and stopped by itself (not killed by srun)
        assert f"r{rank} WARNING nougat_dist.worker: stopped on request" in rank_logs, detail
    models = set(pq.read_table(out / "pages", columns=["model"])["model"].to_pylist())
    assert len(models) == 1, models
