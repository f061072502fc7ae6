"""slurm/ocr.sbatch on a real single-node Slurm cluster (slurmctld + slurmd on 127.0.0.1).

The script is submitted unmodified; the test sets its parameters through the environment and
overrides #SBATCH lines on the sbatch command line, as a user would. Two jobs with 2 CPU ranks
and the fake model: one that runs to the end, and one that gets USR1 mid-run (what
`--signal=B:USR1@secs` sends near the time limit), stops gracefully, requeues itself and completes
in its second attempt. Both outputs must hold every page exactly once.

Debian's slurm-wlm packages are installed when missing (needs root, as on this project's
machines). The daemons run in the foreground as children of this test and are stopped by PID.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from testing import fake_model

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "slurm" / "ocr.sbatch"
SLURM_PACKAGES = ["slurm-wlm", "slurmctld", "slurmd", "slurm-client"]
NODE = "localhost"  # resolves everywhere, so it also works as torchrun's rendezvous host
# The three cluster jobs together must finish within 7 minutes on 2 noisy cores.
BUDGET_S = 420.0


def _installed(pkg: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return proc.returncode == 0 and "install ok installed" in proc.stdout


def _apt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env, timeout=800)


def ensure_slurm() -> None:
    """Install Debian's Slurm packages if any is missing; fail (never skip) if that is impossible."""
    missing = [p for p in SLURM_PACKAGES if not _installed(p)]
    if missing:
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.fail(f"Slurm packages {missing} are missing and cannot be installed here "
                        "(needs apt-get as root): `apt-get install -y " + " ".join(SLURM_PACKAGES) + "`")
        proc = _apt("install", "-y", "--no-install-recommends", *SLURM_PACKAGES)
        if proc.returncode != 0:  # a fresh machine may have no package lists yet
            _apt("update")
            proc = _apt("install", "-y", "--no-install-recommends", *SLURM_PACKAGES)
        if proc.returncode != 0:
            pytest.fail(f"apt-get install {' '.join(SLURM_PACKAGES)} failed:\n{proc.stderr[-3000:]}")
    for tool in ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not on PATH after installing {SLURM_PACKAGES}")
    if os.geteuid() != 0:
        pytest.fail("the test cluster runs slurmd as root (it starts jobs as their users)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A one-node cluster in a temp dir. Its daemons are this process's children."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.job_ids: list[str] = []
        self.deadline = time.monotonic() + BUDGET_S

    def write_config(self) -> None:
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        # A random first job id keeps cgroup paths (…/slurm/uid_0/job_<id>) apart from any other
        # test cluster on the same machine.
        first_job = random.randint(10_000, 900_000)
        self.conf.write_text(f"""\
ClusterName=nougattest
SlurmctldHost={NODE}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/none
CredType=cred/none
# A requeued job waits cred_expire (default 120 s) before it may start again; the scheduler
# looks every sched_interval (default 60 s). Shortened so the requeue test fits its budget.
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/cgroup
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobRequeue=1
FirstJobId={first_job}
NodeName={NODE} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        # Without it every job step dies silently while the job still shows COMPLETED.
        (self.root / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")

    @property
    def env(self) -> dict[str, str]:
        # A test run inside a Slurm job must not leak that job's variables into ours.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=kw.pop("env", self.env),
                              timeout=60, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def start(self) -> None:
        self.write_config()
        log = open(self.root / "log" / "daemons.out", "ab")
        for cmd in (["slurmctld", "-D", "-f", str(self.conf)],
                    ["slurmd", "-D", "-f", str(self.conf), "-N", NODE]):
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))
        log.close()
        until = time.monotonic() + 30
        while time.monotonic() < until:
            for p in self.procs:
                if p.poll() is not None:
                    raise AssertionError(f"{p.args[0]} exited {p.returncode} at start:\n{self.logs()}")
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.3)
        raise AssertionError(f"the node did not become idle in 30 s:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("daemons.out", "slurmctld.log", "slurmd.log"):
            p = self.root / "log" / name
            if p.exists():
                parts.append(f"--- {name}\n" + p.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel our jobs, stop the daemons by PID, then end any job process they left behind."""
        if self.job_ids:
            self.run("scancel", "--full", *self.job_ids, check=False)
            until = time.monotonic() + 15
            while time.monotonic() < until and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # slurmstepd ("slurmstepd: [<job>.<step>]") outlives slurmd: end our jobs' ones by PID.
        for pid in _stepd_pids(self.job_ids):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            except PermissionError:
                os.kill(pid, signal.SIGKILL)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def submit(self, out_log: Path, env: dict[str, str], *sbatch_args: str) -> str:
        """Submit the unmodified slurm/ocr.sbatch from the repo root; returns the job id."""
        proc = self.run("sbatch", "--parsable",
                        # The test node: 2 CPUs and no GPUs; the whole job must fit the budget.
                        "--gpus-per-node=0", "--cpus-per-task=2", "--time=5",
                        "--signal=B:USR1@30", f"--output={out_log}", *sbatch_args, str(SBATCH),
                        env={**self.env, **env}, cwd=ROOT)
        job_id = proc.stdout.strip().split(";")[0]
        self.job_ids.append(job_id)
        return job_id

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict ({} once the job is gone)."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields = {}
        for word in proc.stdout.split():
            key, _, value = word.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_done(self, job_id: str, log_path: Path) -> dict[str, str]:
        """Wait for a job to end (COMPLETED, FAILED, …); returns its last scontrol record."""
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            if self.remaining() <= 0:
                raise AssertionError(f"job {job_id} still {state} at the end of the test budget "
                                     f"({BUDGET_S:.0f} s)\n{_tail(log_path)}\n{self.logs()}")
            time.sleep(0.5)


def _stepd_pids(job_ids: list[str]) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("slurmstepd: [") and any(f"[{j}." in cmd for j in job_ids):
            pids.append(int(proc.name))
    return pids


def _tail(path: Path, n: int = 4000) -> str:
    return f"--- {path}\n" + (path.read_text(errors="replace")[-n:] if path.exists() else "(missing)")


def check_complete(out: Path) -> dict:
    """Every manifest page exactly once in pages/, documents and stats.json agree; returns stats."""
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    n_pages = {row["doc_id"]: row["n_pages"] for row in manifest}
    expected = {(d, p) for d, n in n_pages.items() for p in range(1, n + 1)}
    rows = []
    for chunk in sorted((out / "pages").glob("*.parquet")):
        rows += pq.read_table(chunk, columns=["doc_id", "page", "status"]).to_pylist()
    keys = [(r["doc_id"], r["page"]) for r in rows]
    assert len(keys) == len(set(keys)), f"{len(keys) - len(set(keys))} duplicate page rows"
    assert set(keys) == expected, (f"missing {sorted(expected - set(keys))[:5]}, "
                                   f"unexpected {sorted(set(keys) - expected)[:5]}")
    assert all(r["status"] == "ok" for r in rows)
    docs = pq.read_table(out / "documents", columns=["doc_id", "n_pages"]).to_pylist()
    assert {d["doc_id"]: d["n_pages"] for d in docs} == n_pages
    stats = json.loads((out / "stats.json").read_text())
    assert stats["complete"] is True
    assert stats["pages_total"] == sum(n_pages.values()) == len(keys)
    assert stats["documents"] == len(n_pages)
    assert stats["world_size"] == 2
    assert stats["failed_pages"] == 0
    return stats


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    ensure_slurm()
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def pdfs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from testing.samples import write_long_pdf, write_sample_pdfs

    root = tmp_path_factory.mktemp("slurm-pdfs")
    write_sample_pdfs(root / "small", n_docs=3, seed=1)
    # Enough pages that a USR1 at the first committed chunk lands well before the end.
    write_sample_pdfs(root / "long", n_docs=3, seed=2)
    write_long_pdf(root / "long" / "long_40.pdf", 40, seed=2)
    return {"small": root / "small", "long": root / "long"}


def job_env(pdf_dir: Path, out: Path, *, delay: float | None = None,
            checkpoint: Path | None = None) -> dict[str, str]:
    """The job's settings, passed by environment as a user would. With `delay`, a fake model (a
    sleep per page) that paces the job so a stop lands mid-run; with `checkpoint`, a real one."""
    return {
        **(fake_model.env(f"delay={delay}") if delay is not None else {}),
        "INPUT": str(pdf_dir),
        "OUTPUT": str(out),
        "GPUS_PER_NODE": "2",
        "DEVICE": "cpu",
        "PYTHON": sys.executable,
        **({"CHECKPOINT": str(checkpoint)} if checkpoint is not None else {}),
        # Small chunks make commits frequent so that the stop lands between them.
        "EXTRA_ARGS": "--num-workers 1 --batch-size 2 --commit-pages 4 --commit-seconds 1",
    }


@pytest.mark.timeout(900)  # a first run installs the packages
def test_slurm_tools_installed() -> None:
    ensure_slurm()


@pytest.mark.timeout(300)
def test_sbatch_job_completes(cluster: Cluster, pdfs: dict[str, Path], tmp_path: Path,
                              tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    log = tmp_path / "job.out"
    job_id = cluster.submit(log, job_env(pdfs["small"], out, checkpoint=tiny_checkpoint))
    info = cluster.wait_done(job_id, log)
    detail = f"{_tail(log)}\n{_tail(out / 'logs' / 'rank0.log')}\n{cluster.logs()}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", detail
    assert info["Restarts"] == "0", detail
    check_complete(out)
    models = set(pq.read_table(out / "pages", columns=["model"])["model"].to_pylist())
    assert len(models) == 1 and models.pop().startswith(tiny_checkpoint.name + "@"), detail
    assert "complete: " in log.read_text()
    assert list((out / "logs").glob(f"slurm-{job_id}-attempt0-node0.log")), detail


@pytest.mark.timeout(180)
@pytest.mark.parametrize("to_batch", [True, False], ids=["batch", "step"])
def test_usr1_stops_requeues_and_resumes(cluster: Cluster, pdfs: dict[str, Path], tmp_path: Path,
                                         to_batch: bool) -> None:
    """USR1 to the batch script (what --signal=B:USR1@secs sends), and the easy mistake of
    `scancel --signal=USR1 <jobid>` without --batch, which signals the job step instead."""
    out = tmp_path / "out"
    log = tmp_path / "job.out"
    job_id = cluster.submit(log, job_env(pdfs["long"], out, delay=0.5))  # paced: USR1 lands mid-run
    # Signal the batch script (as --signal=B:USR1@secs would) once the first chunk is committed.
    while not list((out / "pages").glob("*.parquet")):
        state = cluster.job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING") or cluster.remaining() <= 0:
            raise AssertionError(f"job {job_id} is {state} before its first commit\n{_tail(log)}")
        time.sleep(0.2)
    signalled = time.monotonic()
    cluster.run("scancel", "--signal=USR1", *(["--batch"] if to_batch else []), job_id)
    info = cluster.wait_done(job_id, log)
    text = log.read_text()
    rank_logs = "".join(p.read_text() for p in sorted((out / "logs").glob("rank*.log")))
    detail = f"{_tail(log)}\n{rank_logs[-4000:]}\n{cluster.logs()}"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", detail
    # Attempt 0 stopped on request (not by finishing), requeued itself, attempt 1 finished.
    assert info["Restarts"] == "1", detail
    assert "stopped on request" in rank_logs, detail
    assert f"requeueing job {job_id}" in text and f"attempt 1 of job {job_id}" in text, detail
    assert "complete: " in text, detail
    if not to_batch:
        assert f"next time use: scancel --signal=USR1 --batch {job_id}" in text, detail
    stats = check_complete(out)
    first = stats["attempts"][0]
    assert first["exit"] == "stopped" and stats["attempts_total"]["restarts"] == 1, stats["attempts"]
    assert 0 < stats["pages_resumed"] < stats["pages_total"], stats
    print(f"USR1 {time.monotonic() - signalled:.1f} s before the requeued job completed; "
          f"{stats['pages_resumed']} of {stats['pages_total']} pages committed before the stop")
