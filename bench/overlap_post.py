"""Time from the start of a job to the first shard on the Hub, with --overlap-post and without.

Runs the same small job twice (generated papers, the test-only fake model with a per-page delay,
a loopback stand-in for the Hub's upload API from tests/test_upload.py) and prints, per mode:
seconds to the first Parquet file committed to the Hub, seconds to the job's exit, and files on
the Hub. Never asserts on time.

    python bench/overlap_post.py [--docs 8] [--delay 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def run(mode: str, corpus: Path, work: Path, delay: float) -> dict:
    from test_upload import Hub

    from testing import fake_model

    hub = Hub()
    out = work / mode
    args = [sys.executable, str(ROOT / "launch.py"), "--input", str(corpus), "--output", str(out),
            "--unit-pages", "2", "--commit-pages", "2",
            "--commit-seconds", "1", "--batch-size", "2", "--post", "clean,chunk,upload",
            "--post-repo", "org/bench", "--post-every", "1"]
    if mode == "overlapped":
        args.append("--overlap-post")
    env = {**os.environ, **fake_model.env(f"delay={delay}"), "HF_ENDPOINT": hub.url,
           "HF_TOKEN": "hf_bench",
           "NLTK_DATA": str(ROOT / "tests" / "fixtures" / "nltk_data")}
    t0 = time.monotonic()
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = None
    while proc.poll() is None:
        if first is None and any(f.endswith(".parquet") for f in list(hub.files)):
            first = time.monotonic() - t0
        time.sleep(0.05)
    end = time.monotonic() - t0
    if first is None and any(f.endswith(".parquet") for f in hub.files):
        first = end
    hub.close()
    return {"mode": mode, "exit": proc.returncode, "first_shard_s": round(first or -1, 2),
            "job_s": round(end, 2), "hub_files": len(hub.files)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=8)
    p.add_argument("--delay", type=float, default=0.2, help="fake model seconds per page")
    args = p.parse_args()
    from testing.samples import write_sample_pdfs

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "pdfs"
        write_sample_pdfs(corpus, n_docs=args.docs, seed=1)
        for mode in ("after", "overlapped"):
            print(json.dumps(run(mode, corpus, work, args.delay)), flush=True)


if __name__ == "__main__":
    main()
