"""The post-OCR stages at corpus scale: finalize, clean and chunk on synthetic committed outputs.

For each --pages size it writes an output directory as a finished job leaves it (manifest.parquet
and pages/ chunks through the project's own ChunkWriter; ~3 KB markdown pages; documents of
1-1000 pages, log-uniform; ~1.5% failed, empty and unrendered pages), then runs
`nougat-dist finalize`, `clean` and `chunk` on it, each as its own process, and prints per stage:
wall time, MB/s of text read, and the peak RSS of the whole process tree (sampled every 50 ms).

    python bench/scale.py --pages 100000 --pages 1000000 --json

Targets (issue text): every stage's peak RSS at the largest size <= 1.3x its peak at the smallest
and <= 2 GiB; finalize >= 50 MB/s of text. They are printed as checks, never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from run import run_cmd  # noqa: E402  (bench/run.py: process-tree memory sampling)

GIB = 1 << 30
WORDS = ("model data page text layer network training results method section figure table "
         "equation learning we show that the of and in to for with on by as from this is are be "
         "proposed approach performance analysis function value set given each which error "
         "distribution sample parameter theorem proof lemma where such can has been our these "
         "following paper first two between more than both however using based large small").split()


def _paragraphs(rng: random.Random, n: int) -> list[str]:
    """Paragraphs of common words mixed with a 20k-word tail (distinct-word ratios like prose)."""
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    rare = ["".join(rng.choice(letters[:12 + k % 14]) for _ in range(rng.randint(3, 11)))
            for k in range(20_000)]
    out = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(3, 7)):
            words = [rng.choice(WORDS) if rng.random() < 0.45 else rng.choice(rare)
                     for _ in range(rng.randint(8, 22))]
            sentences.append(" ".join(words).capitalize() + ".")
        out.append(" ".join(sentences))
    return out


def _page_text(pool: list[str], rng: random.Random, page: int, doc: int) -> str:
    """~3 KB of markdown: a running header, a section heading, six paragraphs, a footer line."""
    body = "\n\n".join(pool[rng.randrange(len(pool))] for _ in range(6))
    return (f"Proceedings of Synthetic Papers {doc % 97}\n\n## {page}. Section {rng.randint(1, 40)}"
            f"\n\n{body}\n\nPage {page} of document {doc}, figure {rng.randint(1, 99)}.\n\n")


def _doc_lengths(rng: random.Random, pages: int) -> list[int]:
    """Documents of 1-1000 pages (log-uniform) until `pages` pages are used."""
    lengths, left = [], pages
    while left > 0:
        n = min(left, int(math.exp(rng.uniform(0, math.log(1000)))))
        if lengths and rng.random() < 0.02:
            n = min(left, lengths[-1])  # a copy of the previous document follows
        lengths.append(max(1, n))
        left -= lengths[-1]
    return lengths


def write_output(out: Path, pages: int, seed: int = 0) -> dict:
    """A finished job's output dir with `pages` committed page rows; returns what was written."""
    from nougat_dist.store import manifest
    from nougat_dist.store.chunks import ChunkWriter
    from nougat_dist.store.manifest import DocEntry, unit_key

    rng = random.Random(seed)
    pool = _paragraphs(rng, 4000)
    lengths = _doc_lengths(rng, pages)
    entries = [DocEntry(f"{i:064x}", f"/corpus/batch-{i // 1000:04d}/paper-{i:07d}.pdf", None, n,
                        n * 60_000, f"{i:064x}") for i, n in enumerate(lengths)]
    manifest.write(out, entries)
    writers = [ChunkWriter(out, rank, commit_pages=256, commit_seconds=1e9) for rank in range(8)]
    text_bytes = 0
    for i, e in enumerate(entries):
        w = writers[i % len(writers)]
        # ~2% of documents repeat the previous one's text (clean's duplicate_document path)
        copy_of = (i - 1) if i and lengths[i - 1] == e.n_pages else None
        for first in range(1, e.n_pages + 1, 16):  # units of 16 pages, as --unit-pages 16
            last = min(first + 15, e.n_pages)
            key = unit_key(e.doc_id, first, last)
            w.expect(key, last - first + 1)
            for p in range(first, last + 1):
                roll = rng.random()
                status, text = "ok", ""
                if roll < 0.005:
                    status = "fail"
                elif roll < 0.01:
                    status, text = "empty", f"\n\n[MISSING_PAGE_EMPTY:{p}]\n\n"
                elif roll < 0.015:
                    status = "render_error"
                elif copy_of is not None:  # the same paper under another name: a duplicate
                    text = _page_text(pool, random.Random(copy_of * 7919 + p), p, copy_of)
                else:
                    text = _page_text(pool, random.Random(i * 7919 + p), p, i)
                text_bytes += len(text.encode())
                w.add(key, {"doc_id": e.doc_id, "source": e.source, "member": None, "page": p,
                            "text": text, "status": status,
                            "error": None if status in ("ok", "empty") else "synthetic",
                            "n_tokens": len(text) // 4, "elapsed_ms": 1000.0, "rank": i % 8,
                            "model": "0.1.0-small@synthetic", "dtype": "bf16"})
            w.maybe_commit()
    for w in writers:
        w.commit()
    return {"documents": len(entries), "pages": pages, "text_bytes": text_bytes,
            "largest_document_pages": max(lengths)}


def _stage(out: Path, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = run_cmd([sys.executable, "-m", "nougat_dist", *argv], env=env, cwd=ROOT,
                sample_memory=True)
    return {"wall_s": round(t.wall_s, 2), "peak_rss": t.peak_rss, "peak_pss": t.peak_pss,
            "stdout": t.stdout.strip().splitlines()[-1] if t.stdout.strip() else ""}


def measure(workdir: Path, pages: int, memory_budget: str, stages: list[str]) -> dict:
    """Write one synthetic output dir and run the three stages on it."""
    from nougat_dist.store.finalize import text_bytes
    from nougat_dist.store.shards import shard_paths
    from nougat_dist.store.layout import OutputDir

    out = workdir / f"out-{pages}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.monotonic()
    made = write_output(out, pages)
    made["write_s"] = round(time.monotonic() - t0, 2)
    layout = OutputDir(out)
    text_mb = text_bytes(out) / 1e6
    res: dict = {"input": made, "stages": {}}
    for name, argv in (("finalize", ["finalize", str(out), "--memory-budget", memory_budget]),
                       ("clean", ["clean", str(out), "--memory-budget", memory_budget]),
                       ("chunk", ["chunk", str(out)])):
        if name not in stages:
            continue
        r = _stage(out, argv)
        r["text_mb"] = round(text_mb, 1)
        r["mb_per_s"] = round(text_mb / r["wall_s"], 1)
        res["stages"][name] = r
        print(f"  {pages:>9} pages  {name:<9} {r['wall_s']:>8.1f} s  {r['mb_per_s']:>7.1f} MB/s  "
              f"peak RSS {r['peak_rss'] / 2**20:>7.0f} MiB", file=sys.stderr, flush=True)
        if name == "clean":  # chunk reads the clean pages
            text_mb = sum(_text_bytes_of(p) for p in shard_paths(layout.clean_pages)) / 1e6
    res["shards"] = {name: len(shard_paths(d)) for name, d in
                     (("documents", layout.documents), ("clean_pages", layout.clean_pages),
                      ("chunks", layout.chunks))}
    return res


def _text_bytes_of(path: Path) -> int:
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    i = meta.schema.names.index("text")
    return sum(meta.row_group(g).column(i).total_uncompressed_size for g in range(meta.num_row_groups))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, action="append",
                   help="committed pages of one synthetic output (repeat for several sizes; "
                        "default: 100000 and 1000000)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every figure")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the synthetic outputs go (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic outputs")
    p.add_argument("--memory-budget", default="1GiB", help="the stages' --memory-budget (default 1GiB)")
    p.add_argument("--stages", default="finalize,clean,chunk",
                   help="comma-separated subset of finalize,clean,chunk (chunk needs clean)")
    args = p.parse_args(argv)
    sizes = sorted(args.pages or [100_000, 1_000_000])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nougat-dist-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for n in sizes:
            results[str(n)] = measure(workdir, n, args.memory_budget, args.stages.split(","))
            if not args.keep:
                shutil.rmtree(workdir / f"out-{n}", ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    small, large = results[str(sizes[0])], results[str(sizes[-1])]
    checks = {}
    for stage in args.stages.split(","):
        ratio = large["stages"][stage]["peak_rss"] / max(1, small["stages"][stage]["peak_rss"])
        checks[f"{stage}_peak_ratio"] = round(ratio, 3)
        checks[f"{stage}_peak_ratio_ok"] = ratio <= 1.3
        checks[f"{stage}_peak_under_2gib"] = all(r["stages"][stage]["peak_rss"] <= 2 * GIB
                                                  for r in results.values())
    checks["finalize_mb_per_s_ok"] = all(r["stages"]["finalize"]["mb_per_s"] >= 50
                                         for r in results.values())
    body = {"sizes": sizes, "memory_budget": args.memory_budget, "cpus": os.cpu_count(),
            "results": results, "checks": checks}
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        for k, v in checks.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
