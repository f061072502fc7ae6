#!/usr/bin/env bash
# Length-aware vs document-order batches through the real job on one GPU (about 3 minutes on one
# H200, not yet run there): builds the tiny checkpoint's `eos` variant (pages end with </s> at lengths set by their
# ink), then runs `torchrun --standalone --nproc_per_node=1 launch.py` over the same pages with
# --batching document_order and --batching length_aware, interleaved, REPS times each, and prints
# one JSON line: pages/s per policy (work phase, stats.json makespan_s), their ratio, decode
# efficiency per policy (stats.json "decode"), and how many pages' text differs between the two.
#
#   bench/gpu_batching.sh [REPORT_DIR]                      # one CUDA GPU: batch 24, 384 pages
#   DEVICE=cpu bench/gpu_batching.sh                        # the same steps on a CPU, small
#   PDFS=.gpu/pdfs bench/gpu_batching.sh                    # those PDFs instead of generated pages
#
# Size: nougat's real architecture has no eos variant (bench/realistic_checkpoint.py's random
# weights never emit </s>), so this is the tiny architecture. On a GPU a decode step of a small
# batch costs about the same whatever its size, which is what the window's gain depends on; the
# per-step cost itself is not the real model's. max_length stays 128: from 135 steps on nougat's
# batch-level repetition check can flag a page depending on its batch-mates (docs/fidelity.md),
# and the variant's pages then mostly end flagged (decode efficiency 0.12 at 256 on a CPU), which
# would measure the check, not the batching. The JSON counts pages whose text differs (expect 0).
# The generated pages are scan-like (no text layer): their length is predicted from ink.
set -euo pipefail
cd "$(dirname "$0")/.."
device=${DEVICE:-cuda}
if [ "$device" = cpu ]; then
    pages=${PAGES:-24} batch=${BATCH:-8} max_length=${MAX_LENGTH:-128} workers=${WORKERS:-1}
else
    pages=${PAGES:-384} batch=${BATCH:-24} max_length=${MAX_LENGTH:-128} workers=${WORKERS:-4}
fi
reps=${REPS:-2}
py=${PYTHON:-python3}
export NLTK_DATA=${NLTK_DATA:-$PWD/tests/fixtures/nltk_data} PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
report=${1:-$work}
mkdir -p "$report"

echo "=== $(date +%T) eos variant, max_length $max_length" >&2
$py -m testing.tiny_checkpoint "$work/eos" --max-length "$max_length" --variant eos >&2
pdf_args=()
if [ -n "${PDFS:-}" ]; then pdf_args=(--job-pdfs "$(realpath "$PDFS")"); fi
echo "=== $(date +%T) torchrun jobs on $device: batch $batch, $reps x each policy, interleaved" >&2
$py bench/batching.py --job-only --json --job-device "$device" --job-batch-size "$batch" \
    --job-reps "$reps" --job-pages "$pages" --job-max-length "$max_length" \
    --job-checkpoint "$work/eos" --job-workers "$workers" "${pdf_args[@]}" > "$report/batching_job.json"
$py - "$report/batching_job.json" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))["job"]
pol = job["policies"]
print(json.dumps({
    "device": job["device"], "pages": job["pages"], "batch_size": job["batch_size"],
    "max_length": job["max_length"], "reps": job["reps"],
    "pages_per_s": {p: round(r["pages_per_s"], 3) for p, r in pol.items()},
    "length_aware_over_document_order": round(job["length_aware_over_document_order"], 3),
    "decode_efficiency": {p: r["efficiency"] for p, r in pol.items()},
    "pages_whose_text_differs": job["pages_whose_text_differs"],
}))
EOF
