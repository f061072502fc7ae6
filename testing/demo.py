"""`make demo`: a 2-rank job on generated sample papers with the tiny random-weight checkpoint."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build the tiny checkpoint (once), generate sample PDFs, OCR them with 2 ranks "
        "under torchrun (CPU, gloo) and print a summary of the Parquet output.")
    parser.add_argument("--output", default=str(ROOT / "demo-output"), help="Output directory (replaced).")
    parser.add_argument("--nproc", type=int, default=2, help="Ranks to start.")
    parser.add_argument("--n-docs", type=int, default=3, help="Sample papers to generate.")
    args = parser.parse_args(argv)

    from nougat_dist.log import filter_known_warnings

    filter_known_warnings()  # the checkpoint build imports torch and nougat, as a run does
    from testing.samples import write_sample_pdfs
    from testing.tiny_checkpoint import build_tiny_checkpoint

    cache = ROOT / ".cache"
    ckpt = build_tiny_checkpoint(cache / "tiny-checkpoint", seed=0)
    pdf_dir = cache / "demo" / "pdfs"
    pdfs = write_sample_pdfs(pdf_dir, n_docs=args.n_docs, seed=0)
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", str(ROOT / "launch.py"),
           "--config", str(ROOT / "examples" / "run.yaml"), "--input", str(pdf_dir),
           "--output", str(out), "--checkpoint", str(ckpt), "--device", "cpu"]
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    if rc != 0:
        print(f"demo job failed with exit code {rc}; see {out}/logs/", file=sys.stderr)
        return rc
    summarize(out, len(pdfs))
    print("\nNOTE: the tiny checkpoint has RANDOM weights, so the text above is gibberish by design. "
          "For real text, use the real checkpoint (downloaded by nougat on first use):\n"
          f"  torchrun --nproc_per_node=2 launch.py --input {pdf_dir} --output out/ "
          "--model 0.1.0-small")
    return 0


def summarize(out: Path, n_inputs: int) -> None:
    import json

    import pandas as pd
    import pyarrow.parquet as pq

    pages = pq.read_table(out / "pages")
    docs = pd.read_parquet(out / "documents")
    stats = json.loads((out / "stats.json").read_text())
    print(f"\nOutput: {out}")
    print(f"  manifest.parquet   {n_inputs} input PDFs")
    print(f"  pages/             {pages.num_rows} page rows in {len(list((out / 'pages').glob('*.parquet')))} chunk(s); "
          f"status {stats['pages_by_status']}")
    print(f"  documents/         {len(docs)} documents")
    print(f"  stats.json         {stats['pages_per_s']} pages/s over {stats['world_size']} ranks, "
          f"wall {stats['wall_s']} s, idle {stats['idle_fraction']:.0%}")
    for r in stats["per_rank"]:
        print(f"    rank {r['rank']}: {r['pages']} pages, {r['units_stolen']} unit(s) stolen")
    first = docs.iloc[0]
    print(f"\nFirst document ({Path(first.source).name}, {first.n_pages} pages), first 160 characters:")
    print("  " + repr(first.text[:160]))


if __name__ == "__main__":
    sys.exit(main())
