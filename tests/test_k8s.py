"""The Kubernetes job: manifests validated offline against the Kubernetes schemas, and the pod entry
script run with the environment an Indexed Job gives it (as a dry run, and as a real one-pod CPU
job stopped by SIGTERM and resumed, which is what a preemption does to a pod)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from conftest import ROOT, rows
from testing import fake_model

K8S = ROOT / "k8s"
ENTRY = K8S / "entry.sh"
#: Kubernetes release whose schemas the manifests must pass (podReplacementPolicy needs >= 1.28).
K8S_VERSION = "1.31.0"


def manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict:
    (doc,) = [d for d in manifests() if d["kind"] == kind]
    return doc


def env_of(container: dict) -> dict[str, object]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# --- manifests -----------------------------------------------------------------------------------

def test_manifests_pass_the_kubernetes_schemas():
    import kubernetes_validate

    docs = manifests()
    assert {d["kind"] for d in docs} == {"Service", "Job"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The validator does reject a wrong manifest (strict: unknown fields too), so passing means something.
    job = by_kind("Job")
    bad = json.loads(json.dumps(job))
    bad["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = json.loads(json.dumps(job))
    bad["spec"]["completions"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_manifest_parts_agree_with_each_other_and_the_entry_script():
    svc, job = by_kind("Service"), by_kind("Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (ctr,) = pod["containers"]
    env = env_of(ctr)
    # N pods, all at once, as one torchrun job.
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"])
    # Pod 0's DNS name comes from the headless Service being the pods' subdomain.
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert pod["subdomain"] == svc["metadata"]["name"] == env["RDZV_SERVICE"]
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert svc["spec"]["ports"][0]["port"] == ctr["ports"][0]["containerPort"] == 29400
    # G GPUs: one rank each.
    assert int(ctr["resources"]["limits"]["nvidia.com/gpu"]) == int(env["GPUS_PER_NODE"])
    # /dev/shm is memory, not the container's 64 MB default.
    shm = [m for m in ctr["volumeMounts"] if m["mountPath"] == "/dev/shm"][0]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[shm["name"]]["emptyDir"]["medium"] == "Memory"
    assert env["CHECKPOINT"].startswith("/checkpoint/")
    assert any(m["mountPath"] == "/checkpoint" and m.get("readOnly") for m in ctr["volumeMounts"])
    # Preemption as on Slurm: exit 75 and disruptions do not use up the backoff, setup errors end it.
    rules = spec["podFailurePolicy"]["rules"]
    actions = {r["action"]: r for r in rules}
    assert actions["FailJob"]["onExitCodes"]["values"] == [2]
    assert [75] in [r["onExitCodes"]["values"] for r in rules if r["action"] == "Ignore" and "onExitCodes" in r]
    assert any(c["type"] == "DisruptionTarget" for r in rules for c in r.get("onPodConditions", []))
    assert pod["restartPolicy"] == "Never"
    # The grace period outlasts the stop timeout the entry script gives torchrun.
    stop_timeout = int(env.get("STOP_TIMEOUT") or 240)
    assert "STOP_TIMEOUT:-240" in ENTRY.read_text()
    assert pod["terminationGracePeriodSeconds"] > stop_timeout
    # The container runs the entry script where the k8s image puts it.
    assert ctr["command"] == ["bash", "/app/k8s/entry.sh"]
    assert "COPY k8s/entry.sh /app/k8s/entry.sh" in (K8S / "Dockerfile").read_text()
    assert env["RUN_ID"] == {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/controller-uid']"}}


# --- the entry script ----------------------------------------------------------------------------

def pod_env(**over: str) -> dict[str, str]:
    """What the Job controller and the manifest put in a pod's environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("JOB_COMPLETION_INDEX", "NNODES", "RDZV_HOST")}
    env.update(JOB_COMPLETION_INDEX="1", NNODES="3", GPUS_PER_NODE="4", HOSTNAME="nougat-ocr-1",
               RDZV_SERVICE="nougat-ocr", RUN_ID="0f1e2d3c-uid", INPUT="gs://b/papers/**.pdf /data/list.txt",
               OUTPUT="/out/run1", CHECKPOINT="/checkpoint/0.1.0-small", EXTRA_ARGS="--batch-size 8",
               PYTHON=sys.executable)
    env.update(over)
    return env


def dry_run(**over: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRY)], env={**pod_env(**over), "DRY_RUN": "1"},
                          capture_output=True, text=True, timeout=30)


def test_entry_maps_the_indexed_job_env_to_torchrun():
    proc = dry_run()
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nnodes=3" in cmd and "--nproc-per-node=4" in cmd
    assert "--rdzv-backend=c10d" in cmd and "--rdzv-id=0f1e2d3c-uid" in cmd
    assert "--rdzv-endpoint=nougat-ocr-0.nougat-ocr:29400" in cmd
    assert "--rdzv-conf=is_host=0" in cmd
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in cmd
    launch = cmd[cmd.index("nougat_dist.cli") + 1:]
    assert launch == ["--input", "gs://b/papers/**.pdf", "/data/list.txt", "--output", "/out/run1",
                      "--device", "cuda", "--checkpoint", "/checkpoint/0.1.0-small", "--batch-size", "8"]
    # Pod 0 hosts the rendezvous.
    assert "--rdzv-conf=is_host=1" in shlex.split(dry_run(JOB_COMPLETION_INDEX="0", HOSTNAME="nougat-ocr-0").stdout)


@pytest.mark.parametrize("over, says", [
    ({"JOB_COMPLETION_INDEX": ""}, "JOB_COMPLETION_INDEX, NNODES, INPUT and OUTPUT must be set"),
    ({"OUTPUT": ""}, "must be set"),
    ({"JOB_COMPLETION_INDEX": "3"}, "JOB_COMPLETION_INDEX (3) < NNODES (3)"),
    ({"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE (0) >= 1"),
])
def test_entry_refuses_a_broken_pod_env_with_the_setup_exit_code(over, says):
    proc = dry_run(**over)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_pod_cpu_job_stops_on_sigterm_with_75_and_resumes(tmp_path, sample_pdfs):
    """The pod's PID 1 (the entry script) gets SIGTERM as Kubernetes sends it on preemption:
    the ranks commit and the script exits 75; the re-created pod's run completes exactly once."""
    out = tmp_path / "out"
    env = pod_env(JOB_COMPLETION_INDEX="0", NNODES="1", GPUS_PER_NODE="2", HOSTNAME="nougat-ocr-0",
                  RDZV_HOST="127.0.0.1", RDZV_PORT=str(_free_port()), DEVICE="cpu",
                  INPUT=str(sample_pdfs[0].parent), OUTPUT=str(out), CHECKPOINT="", STOP_TIMEOUT="60",
                  EXTRA_ARGS="--unit-pages 2 --commit-pages 2 --batch-size 1",
                  **fake_model.env("delay=1.5"))
    proc = subprocess.Popen(["bash", str(ENTRY)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not list((out / "pages").glob("part-*.parquet")) and time.time() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert list((out / "pages").glob("part-*.parquet")), "nothing committed before the stop"
        proc.send_signal(signal.SIGTERM)  # to the script alone, as the kubelet signals PID 1
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 75, log[-4000:]
    assert "stopped" in log and not (out / "stats.json").exists()
    done = len(pd.read_parquet(out / "pages"))
    manifest = pd.read_parquet(out / "manifest.parquet")
    total = int(manifest.n_pages.sum())
    assert 0 < done < total

    env["RDZV_PORT"] = str(_free_port())
    env.update(fake_model.env("delay=0"))  # only slowed for the stop
    again = subprocess.run(["bash", str(ENTRY)], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["pages_resumed"] == done
    texts = rows(out)  # fails on a page stored twice
    assert len(texts) == total


@pytest.mark.parametrize("rank_exit, code", [("stopped", 75), ("setup error", 2), ("exit code 1", 1)])
def test_entry_reads_how_the_ranks_ended_from_their_attempt_records(tmp_path, rank_exit, code):
    """torchrun exits 1 whatever its ranks returned; the pod's exit code comes from the ranks'
    attempt records. A stop that reached this pod's ranks through the status rounds (another pod
    was preempted) is a stop here too: 75, not a failure that uses up the Job's backoff."""
    out = tmp_path / "out"
    fake = tmp_path / "python"
    # Stands in for torchrun (as `python -m torch.distributed.run ...`): the ranks wrote their
    # records and torchrun exited 1. Anything else (the record reader) is the real Python.
    fake.write_text(f"""#!/bin/bash
if [[ "$1" == "-m" ]]; then
    mkdir -p "{out}/attempts"
    printf '{{"host": "%s", "start": %s, "exit": "{rank_exit}"}}' "$(python3 -c 'import platform; print(platform.node())')" "$(date +%s)" > "{out}/attempts/run.0.r0.json"
    exit 1
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    env = pod_env(JOB_COMPLETION_INDEX="0", NNODES="1", HOSTNAME="nougat-ocr-0", OUTPUT=str(out),
                  PYTHON=str(fake))
    proc = subprocess.run(["bash", str(ENTRY)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == code, proc.stdout + proc.stderr
