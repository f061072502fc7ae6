"""How long a restart takes to rebuild its state from committed chunks, and what a commit costs.

    python bench/resume.py [--units 100000] [--units-per-chunk 100]

Resume reads only each chunk's Parquet footer (the unit list), never the rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nougat_dist.store.index import committed_units  # noqa: E402
from nougat_dist.store.chunks import ChunkWriter  # noqa: E402

TEXT = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40  # ~2.3 kB, a typical page


def row(doc: int, page: int) -> dict:
    return {"doc_id": f"{doc:064x}", "source": f"/data/papers/{doc}.pdf", "member": None,
            "page": page, "text": TEXT, "status": "ok", "error": None, "n_tokens": 600,
            "elapsed_ms": 100.0, "rank": 0, "model": "0.1.0-small@abc", "dtype": "bfloat16"}


def write_chunks(out: Path, units: int, per_chunk: int, pages_per_unit: int = 1) -> float:
    w = ChunkWriter(out, rank=0, commit_pages=10**9, commit_seconds=10**9)
    t0 = time.perf_counter()
    for u in range(units):
        key = f"{u:064x}:1-{pages_per_unit}"
        w.expect(key, pages_per_unit)
        for p in range(1, pages_per_unit + 1):
            w.add(key, row(u, p))
        if (u + 1) % per_chunk == 0:
            w.commit()
    w.commit()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=100_000)
    ap.add_argument("--units-per-chunk", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "resume"
        write_chunks(out, args.units, args.units_per_chunk)
        n_chunks = len(list((out / "pages").glob("*.parquet")))
        t0 = time.perf_counter()
        index = committed_units(out)
        dt = time.perf_counter() - t0
        assert len(index) == args.units
        print(f"resume scan: {args.units} committed units in {n_chunks} chunks -> {dt:.2f} s "
              f"({dt / n_chunks * 1000:.2f} ms per chunk footer)")
        print("\ncommit cost by chunk size (1-page units, ~2.3 kB of text per page):")
        print(f"{'pages/chunk':>12} {'ms/commit':>10} {'ms/page':>8}")
        for size in (16, 64, 256, 1024):
            d = Path(tmp) / f"c{size}"
            n = 4096
            dt = write_chunks(d, n, size)
            print(f"{size:>12} {dt / (n / size) * 1000:>10.1f} {dt / n * 1000:>8.3f}")


if __name__ == "__main__":
    main()
