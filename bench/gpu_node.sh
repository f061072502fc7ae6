#!/usr/bin/env bash
# The CUDA path on one GPU node, in one go (about 6 minutes on one H200): versions, the NCCL
# collectives the control plane uses, `selftest` on CUDA in bf16 and fp32 (launcher text == stock
# nougat text on the same GPU), a 1-rank torchrun job over generated papers compared page for page
# with the stock CLI, the same job re-run (nothing redone), pipeline vs model-only pages/s with the
# real 0.1.0-small architecture, and the batch probe at nougat's real max_length (3584).
#
#   bench/gpu_node.sh PDF_DIR REPORT_DIR     # PDF_DIR: e.g. `python -m testing.samples DIR --n-docs 12`
#   QUICK=1 bench/gpu_node.sh ...            # stop after the tiny-checkpoint job and its re-run
#
# Random-weight checkpoints only (the project builds them; no download): texts are gibberish, the
# code paths, tensor shapes and decode lengths are the real ones.
set -uo pipefail
pdfs=$(realpath "$1"); report=$(mkdir -p "$2" && realpath "$2")
work=$(mktemp -d)
export NLTK_DATA=${NLTK_DATA:-$PWD/tests/fixtures/nltk_data} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
step() { echo; echo "=== $(date +%T) $*"; }

step versions
nvidia-smi -L
$py - <<'EOF'
import numpy, pyarrow, timm, torch, transformers
print("torch", torch.__version__, "CUDA", torch.version.cuda, "NCCL", torch.cuda.nccl.version(),
      "GPU", torch.cuda.get_device_name(0))
print("numpy", numpy.__version__, "pyarrow", pyarrow.__version__, "transformers",
      transformers.__version__, "timm", timm.__version__)
EOF

step "NCCL: the collectives the control plane uses (async all_gather of a CUDA int64 vector polled with is_completed, all_gather_object, broadcast_object_list, barrier)"
MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 RANK=0 WORLD_SIZE=1 $py - <<'EOF'
import time, torch, torch.distributed as dist
from nougat_dist.sched.queue import RankStatus
dev = torch.device("cuda", 0)
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
mine = torch.tensor(RankStatus(done_pages=7, claimed=2).encode(), dtype=torch.int64, device=dev)
out = [torch.empty_like(mine)]
work = dist.all_gather(out, mine, async_op=True)
polls = 0
while not work.is_completed():
    polls += 1
    time.sleep(0.001)
work.wait()
got = RankStatus.decode(torch.stack(out).cpu().tolist()[0])
assert got.done_pages == 7 and got.claimed == 2, got
objs = [None]
dist.all_gather_object(objs, {"entries": [("doc", 3)]})
msg = [{"plan": 1}] if True else [None]
dist.broadcast_object_list(msg, src=0)
dist.barrier()
print("nccl ok: backend", dist.get_backend(), "status vector round-trip", got, "after", polls, "polls")
dist.destroy_process_group()
EOF

step "tiny checkpoint"
$py -m testing.tiny_checkpoint "$work/tiny" || exit 1

step "selftest on CUDA, bf16, tiny checkpoint (fidelity, speed, batch probe verified at its max_length)"
$py -m nougat_dist selftest --checkpoint "$work/tiny" --device cuda --pages 8 2>&1 | tee "$report/selftest_tiny_bf16.txt"

step "selftest on CUDA, fp32, tiny checkpoint"
$py -m nougat_dist selftest --checkpoint "$work/tiny" --device cuda --pages 8 --full-precision \
    --no-verify-batch 2>&1 | tee "$report/selftest_tiny_fp32.txt"

step "torchrun 1 rank on CUDA over $(ls "$pdfs" | wc -l) papers, tiny checkpoint, vs the stock CLI page for page"
torchrun --standalone --nproc_per_node=1 launch.py --input "$pdfs" --output "$work/job" \
    --checkpoint "$work/tiny" --device cuda --batch-size 8 2>&1 | tail -n 15
grep -h "device cuda" "$work/job/logs/"*.log | head -n 2
$py -m predict "$pdfs" -o "$work/stock" --checkpoint "$work/tiny" -b 8 > "$work/stock.log" 2>&1 \
    || tail -n 20 "$work/stock.log"
$py - "$work/job" "$work/stock" <<'EOF'
import sys
from pathlib import Path
import pyarrow.parquet as pq
job, stock = Path(sys.argv[1]), Path(sys.argv[2])
rows = pq.read_table(job / "documents").to_pylist()
same = [r for r in rows if (stock / (Path(r["source"]).stem + ".mmd")).read_text() == r["text"]]
print(f"launcher vs stock CLI on CUDA: {len(same)}/{len(rows)} documents byte-identical")
EOF
cp "$work/job/stats.json" "$report/stats_tiny_job.json"

step "the same command again: nothing is redone"
torchrun --standalone --nproc_per_node=1 launch.py --input "$pdfs" --output "$work/job" \
    --checkpoint "$work/tiny" --device cuda --batch-size 8 2>&1 | tail -n 4

if [ -n "${QUICK:-}" ]; then step "done (QUICK: the real-architecture speed and probe steps skipped)"; exit 0; fi

step "real 0.1.0-small architecture (random weights, 50k vocab), max_length 256: selftest speed at batch 16"
$py bench/realistic_checkpoint.py "$work/real256" --max-length 256 > /dev/null || exit 1
$py -m nougat_dist selftest --checkpoint "$work/real256" --device cuda --pages 32 --batch-size 16 \
    --no-verify-batch 2>&1 | tee "$report/selftest_real256.txt"

step "pipeline on the real architecture: torchrun job over the papers, batch 16"
torchrun --standalone --nproc_per_node=1 launch.py --input "$pdfs" --output "$work/job_real" \
    --checkpoint "$work/real256" --device cuda --batch-size 16 2>&1 | tail -n 6
$py -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in s if k in ('pages_this_run','makespan_s','pages_per_s','batch_size','device','dtype')})" \
    "$work/job_real/stats.json"
cp "$work/job_real/stats.json" "$report/stats_real_job.json"

step "batch probe at nougat's real max_length (3584), real architecture"
$py bench/realistic_checkpoint.py "$work/real3584" --max-length 3584 > /dev/null || exit 1
$py - "$work/real3584" <<'EOF'
import sys, tempfile, torch
from pathlib import Path
from nougat_dist.ocr.model import encoder_input_spec, load_model
from nougat_dist.ocr.probe import largest_batch
from nougat_dist.selftest import render_pages, write_test_pdf
ckpt = Path(sys.argv[1])
size, align = encoder_input_spec(ckpt)
model = load_model(ckpt, torch.device("cuda", 0), False)
with tempfile.TemporaryDirectory() as tmp:
    images = render_pages(write_test_pdf(Path(tmp) / "p.pdf", 4), size, align)
r = largest_batch(model, images, int(model.config.max_length), verify=False)
print(f"probe: batch {r.batch} for {model.config.max_length}-token decodes in {r.budget / 2**30:.1f} GiB;",
      "; ".join(r.notes))
EOF
step done
