"""Skew scenario: rank 1 is 10x slower than rank 0 (fake model sleeps). Prints makespan / ideal
and idle fraction with stealing on and off, measured side by side in one invocation.

    python bench/skew.py [--pages 120] [--fast 0.1] [--slow 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(pdf: Path, out: Path, fast: float, slow: float, steal: bool) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "launch.py"), "--input", str(pdf), "--output", str(out), "--device", "cpu",
           "--unit-pages", "1", "--batch-size", "1", "--num-workers", "1", "--prefetch-factor", "1",
           ] + ([] if steal else ["--no-steal"])
    from testing import fake_model

    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, **fake_model.env(f"delay={fast},delay_rank1={slow}")})
    return json.loads((out / "stats.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=120)
    ap.add_argument("--fast", type=float, default=0.1, help="seconds per page on rank 0")
    ap.add_argument("--slow", type=float, default=1.0, help="seconds per page on rank 1")
    args = ap.parse_args()
    from testing.samples import write_long_pdf

    ideal = args.pages / (1 / args.fast + 1 / args.slow)
    with tempfile.TemporaryDirectory() as tmp:
        pdf = write_long_pdf(Path(tmp) / "book.pdf", args.pages)
        print(f"{args.pages} pages, rank 0 {args.fast}s/page, rank 1 {args.slow}s/page, ideal {ideal:.2f}s")
        print(f"{'stealing':<9} {'makespan s':>10} {'/ideal':>7} {'idle':>6} {'stolen':>7} {'rounds':>7}  pages per rank")
        for steal in (True, False):
            s = run(pdf, Path(tmp) / f"out-{steal}", args.fast, args.slow, steal)
            print(f"{'on' if steal else 'off':<9} {s['makespan_s']:>10.2f} {s['makespan_s'] / ideal:>7.2f} "
                  f"{s['idle_fraction']:>6.1%} {sum(r['units_stolen'] for r in s['per_rank']):>7} "
                  f"{s['per_rank'][0]['rounds']:>7}  {[r['pages'] for r in s['per_rank']]}")


if __name__ == "__main__":
    main()
