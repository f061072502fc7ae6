#!/bin/bash
# The container command of each pod of the Indexed Job in k8s/ocr-job.yaml: one torchrun per pod,
# one rank per GPU, all pods joined by torchrun's c10d rendezvous on pod 0.
#
# Kubernetes gives each pod JOB_COMPLETION_INDEX (0..N-1) and, with the Job's headless Service as
# the pod template's subdomain, a DNS name <job>-<index>.<service>: pod 0's name is the rendezvous
# endpoint. The manifest passes the rest as env (below). Exit codes, read by the Job's
# podFailurePolicy:
#   0   the job is complete (OUTPUT/stats.json written), or this pod's part of it ended cleanly
#   2   setup error (bad inputs, missing checkpoint, unusable GPU): retrying will not help
#   75  stopped on SIGTERM (preemption, node drain, kubectl delete pod) after committing: the
#       Job creates the pod again and the job resumes
#   other: a failure; counts against the Job's backoffLimit, and the next pod resumes
#
# DRY_RUN=1 prints the torchrun command instead of running it (tests; debugging a manifest).
set -uo pipefail  # no -e: exit codes are handled explicitly below

EXIT_SETUP=2
EXIT_STOPPED=75

say() { echo "[k8s/entry.sh $(date +%H:%M:%S)] $*"; }

# ---- From Kubernetes and the manifest.
INDEX="${JOB_COMPLETION_INDEX:-}"        # set by the Job controller (completionMode: Indexed)
NNODES="${NNODES:-}"                     # = the Job's completions and parallelism
INPUT="${INPUT:-}"                       # space separated: gs://b/papers/**.pdf, /data/list.txt, ...
OUTPUT="${OUTPUT:-}"                     # gs://bucket/prefix, or a directory every pod sees (RWX volume)
CHECKPOINT="${CHECKPOINT:-}"             # a checkpoint dir from a volume (empty: --model download)
# Ranks per pod: the GPUs of the pod's resource limit (the manifest passes it), else what the
# container sees, else 1 (a CPU pod).
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=1
    if command -v nvidia-smi >/dev/null 2>&1; then
        n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')"
        if (( n > 0 )); then GPUS_PER_NODE="$n"; fi
    fi
fi
DEVICE="${DEVICE:-cuda}"
# Pod 0's name through the headless Service: <job name>-0.<service>. The Job's pods are named
# <job name>-<index>, so the job name is this pod's hostname without its index.
RDZV_SERVICE="${RDZV_SERVICE:-}"
RDZV_HOST="${RDZV_HOST:-${HOSTNAME%-*}-0${RDZV_SERVICE:+.$RDZV_SERVICE}}"
RDZV_PORT="${RDZV_PORT:-29400}"
# The rendezvous id (the Job's uid from the downward API): the same for every pod of the Job and
# across its re-created pods, so a resumed pod takes back the output lease its Job holds.
RUN_ID="${RUN_ID:-${HOSTNAME%-*}}"
RDZV_WAIT_S="${RDZV_WAIT_S:-600}"        # how long pods > 0 wait for pod 0's DNS name
STOP_TIMEOUT="${STOP_TIMEOUT:-240}"      # < terminationGracePeriodSeconds, which ends in SIGKILL
MAX_RESTARTS="${MAX_RESTARTS:-0}"        # 0: the Job's pod re-creation is the restart
EXTRA_ARGS="${EXTRA_ARGS:-}"             # more launcher flags, e.g. "--batch-size 8"
PYTHON="${PYTHON:-python}"
# ----

if [[ -z "$INDEX" || -z "$NNODES" || -z "$INPUT" || -z "$OUTPUT" ]]; then
    say "JOB_COMPLETION_INDEX, NNODES, INPUT and OUTPUT must be set (run as an Indexed Job: see k8s/ocr-job.yaml)" >&2
    exit "$EXIT_SETUP"
fi
if ! [[ "$INDEX" =~ ^[0-9]+$ && "$NNODES" =~ ^[1-9][0-9]*$ && "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] \
        || (( INDEX >= NNODES )); then
    say "need 0 <= JOB_COMPLETION_INDEX ($INDEX) < NNODES ($NNODES) and GPUS_PER_NODE ($GPUS_PER_NODE) >= 1" >&2
    exit "$EXIT_SETUP"
fi

read -r -a inputs <<< "$INPUT"
read -r -a extra <<< "$EXTRA_ARGS"
launch_args=(--input "${inputs[@]}" --output "$OUTPUT" --device "$DEVICE")
if [[ -n "$CHECKPOINT" ]]; then launch_args+=(--checkpoint "$CHECKPOINT"); fi
launch_args+=("${extra[@]}")
# is_host: pod 0 hosts the rendezvous store. Said explicitly because torchrun's own test (is the
# endpoint one of my addresses?) fails when the name resolves differently inside the pod.
cmd=("$PYTHON" -m torch.distributed.run
     --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE"
     --rdzv-backend=c10d --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" --rdzv-id="$RUN_ID"
     --rdzv-conf="is_host=$(( INDEX == 0 ))"
     --max-restarts="$MAX_RESTARTS"
     --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
     --shutdown-timeout="$STOP_TIMEOUT"
     -m nougat_dist.cli "${launch_args[@]}")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi

# Pods start in any order and pod 0's DNS record exists only once it runs: wait for it here, so
# that torchrun's rendezvous timeout counts from a name that resolves.
if (( INDEX > 0 )); then
    waited=0
    until getent hosts "$RDZV_HOST" >/dev/null; do
        if (( waited >= RDZV_WAIT_S )); then
            say "rendezvous host $RDZV_HOST did not resolve within ${RDZV_WAIT_S}s: is pod 0 running, and is the headless Service named in RDZV_SERVICE the pod template's subdomain?" >&2
            exit 1
        fi
        sleep 2; waited=$((waited + 2))
    done
fi

# Kubernetes sends SIGTERM to this script (PID 1) on preemption, drain or delete, then SIGKILL after
# terminationGracePeriodSeconds. torchrun forwards it to the ranks, which finish their batch,
# commit and exit 75; torchrun reports that as a failure, so the stop is remembered here.
stop_requested=0
child=""
# shellcheck disable=SC2317  # called by the trap
on_term() {
    stop_requested=1
    say "SIGTERM: asking the ranks to commit and stop"
    if [[ -n "$child" ]]; then kill -TERM "$child" 2>/dev/null || true; fi
}
trap on_term TERM INT

# How this pod's ranks ended, from their attempt records (store/attempts.py): torchrun turns any
# rank exit code into its own 1, but the Job must tell "stopped" (resume) from "setup error" (give
# up). Records of this attempt are those started since this script did, written on this host.
started="$(date +%s)"
rank_exits() {
    "$PYTHON" - "$OUTPUT" "$started" <<'PY' 2>/dev/null
import json, pathlib, platform, sys
out = sys.argv[1]
if "://" in out:  # a bucket output: the records are in this node's staging dir
    from nougat_dist.store.bucket import staging_dir
    out = staging_dir(out)
for p in (pathlib.Path(out) / "attempts").glob("*.r*.json"):
    try:
        r = json.loads(p.read_text())
    except (OSError, ValueError):
        continue
    if r.get("host") == platform.node() and r.get("start", 0) >= float(sys.argv[2]) - 5:
        print(r.get("exit"))
PY
}
say "pod $INDEX of $NNODES: $GPUS_PER_NODE rank(s), rendezvous $RDZV_HOST:$RDZV_PORT, run id $RUN_ID"
"${cmd[@]}" &
child=$!
if (( stop_requested )); then kill -TERM "$child" 2>/dev/null || true; fi
rc=0
while :; do  # a trapped signal interrupts `wait`: wait again until torchrun has exited
    wait "$child"; rc=$?
    if ! kill -0 "$child" 2>/dev/null; then break; fi
done

if (( rc == 0 )); then
    say "done (pod $INDEX)"; exit 0
fi
exits="$(rank_exits)"
if grep -qx "setup error" <<< "$exits"; then
    say "a rank stopped with a setup error (see $OUTPUT/logs): not retrying" >&2
    exit "$EXIT_SETUP"
fi
# Stopped: this pod got SIGTERM, or a rank on another pod did and the stop reached every rank
# through the status rounds. Either way what was committed is kept and the next pod resumes.
if (( stop_requested )) || grep -qx "stopped" <<< "$exits"; then
    say "stopped (code $rc): everything committed is kept; the Job re-creates the pod to resume"
    exit "$EXIT_STOPPED"
fi
say "failed (code $rc); see the rank logs (OUTPUT/logs). The Job re-creates the pod (backoffLimit) and it resumes" >&2
exit "$rc"
