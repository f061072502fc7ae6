"""A bucket output two ways, side by side on one S3 server: the node-local staging directory the
product uses, and chunks written straight to the bucket (a prototype, here only).

    python bench/bucket.py [--chunks 120] [--pages-per-chunk 64] [--trials 4] [--sync-s 1]
                           [--request-ms 0] [--compute-ms 0]

(a) staging: `ChunkWriter` commits to a local directory (temp file, fsync, rename), `BucketSync`
    pushes new chunks in the background (created if absent), the end pushes the rest.
(b) native: each commit serialises the chunk in memory and PUTs it with ``If-None-Match: *``
    through s3fs; the rank waits for the PUT. The committed index is what a listing shows.

Each trial runs both, in alternating order, on fresh prefixes, against a moto server in its own
process on loopback (so its request handling does not share this process's interpreter lock).
Measured per design:
  commit     what a rank waits for per chunk (median; p90)
  job        lease + resume listing + every commit + the last push, then finalize's read of every
             row on rank 0 (staging: the chunks are local; native: read back from the bucket)
  resume     a fresh node rebuilding the committed index (staging: pull every chunk, read the
             footers locally; native: list, then read every footer from the bucket)
Figures are medians over the trials and the ratio native / staging. Never asserts on time.

Moto on loopback answers in about a millisecond; a real bucket takes tens of milliseconds per
request. --request-ms adds that much before every S3 request this process sends (both designs,
every request: a model of the distance to the bucket, not a measurement of one). --compute-ms is
the OCR time a rank spends between two commits, during which the staging design's pushes run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from nougat_dist.store.bucket import BucketLease, BucketSync  # noqa: E402
from nougat_dist.store.chunks import PAGES_SCHEMA, UNITS_KEY, ChunkWriter, chunk_name  # noqa: E402
from nougat_dist.store.index import committed_units  # noqa: E402

BUCKET = "bench"
TEXT = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 40  # ~2.3 kB, a typical page


def row(doc: int, page: int) -> dict:
    return {"doc_id": f"{doc:064x}", "source": f"s3://papers/{doc}.pdf", "member": None,
            "page": page, "text": TEXT, "status": "ok", "error": None, "n_tokens": 600,
            "batch_steps": 600, "elapsed_ms": 100.0, "rank": 0, "model": "0.1.0-small@abc",
            "dtype": "bfloat16"}


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def s3fs_for(endpoint: str):
    import fsspec

    deadline = time.monotonic() + 60
    while True:
        try:
            fs = fsspec.filesystem("s3", skip_instance_cache=True)
            fs.mkdir(BUCKET)
            return fs
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class NativeWriter:
    """A rank's commit straight to the bucket: the chunk as bytes, created only if absent."""

    def __init__(self, fs, root: str, rank: int = 0) -> None:
        self.fs, self.root, self.rank, self.seq = fs, root, rank, 0

    def commit(self, rows: list[dict], units: list[str]) -> None:
        table = pa.Table.from_pylist(rows, schema=PAGES_SCHEMA)
        table = table.replace_schema_metadata({UNITS_KEY: json.dumps(units).encode()})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        name = chunk_name(self.rank, self.seq, "bench")
        self.fs.pipe_file(f"{self.root}/pages/{name}", buf.getvalue(), mode="create")
        self.seq += 1


def chunk_rows(c: int, pages: int) -> tuple[list[dict], str]:
    return [row(c, p) for p in range(1, pages + 1)], f"{c:064x}:1-{pages}"


def add_request_latency(ms: float) -> None:
    """Every S3 request of this process (s3fs's single entry point to botocore) waits ms first."""
    import asyncio

    from s3fs.core import S3FileSystem

    real = S3FileSystem._call_s3

    async def slow(self, *args, **kwargs):
        await asyncio.sleep(ms / 1e3)
        return await real(self, *args, **kwargs)

    S3FileSystem._call_s3 = slow


def run_staging(fs, prefix: str, tmp: Path, chunks: int, pages: int, sync_s: float,
                compute_s: float) -> dict:
    url = f"s3://{BUCKET}/{prefix}"
    t0 = time.perf_counter()
    sync = BucketSync(url, tmp / "staging")
    sync.start(rank=0, local_rank=0, barrier=lambda: None, job_id="bench:a", every_s=sync_s)
    w = ChunkWriter(sync.local, rank=0, commit_pages=10**9, commit_seconds=10**9, run_id="bench")
    waits = []
    for c in range(chunks):
        time.sleep(compute_s)
        rows, key = chunk_rows(c, pages)
        w.expect(key, pages)
        for r in rows:
            w.add(key, r)
        t = time.perf_counter()
        w.commit()
        waits.append(time.perf_counter() - t)
    sync.close(rank=0)
    n = pq.read_table(sync.local / "pages").num_rows  # finalize reads local chunks
    job = time.perf_counter() - t0
    assert n == chunks * pages
    t = time.perf_counter()
    fresh = BucketSync(url, tmp / "fresh-node")
    fresh.pull()
    index = committed_units(fresh.local)
    resume = time.perf_counter() - t
    assert len(index) == chunks
    return {"waits": waits, "job": job, "resume": resume}


def run_native(fs, prefix: str, chunks: int, pages: int, compute_s: float) -> dict:
    url = f"s3://{BUCKET}/{prefix}"
    root = f"{BUCKET}/{prefix}"
    t0 = time.perf_counter()
    lease = BucketLease(BucketSync(url, Path(tempfile.gettempdir()) / "unused"), "bench:b")
    lease.acquire()
    fs.invalidate_cache()
    fs.find(root)  # the resume listing: the committed index is what is listed
    w = NativeWriter(fs, root)
    waits = []
    for c in range(chunks):
        time.sleep(compute_s)
        rows, key = chunk_rows(c, pages)
        t = time.perf_counter()
        w.commit(rows, [key])
        waits.append(time.perf_counter() - t)
    lease.release()
    fs.invalidate_cache()
    paths = sorted(fs.glob(f"{root}/pages/part-*.parquet"))
    n = pq.read_table(paths, filesystem=fs).num_rows  # finalize reads the chunks from the bucket
    job = time.perf_counter() - t0
    assert n == chunks * pages
    t = time.perf_counter()
    fs.invalidate_cache()
    index = {}
    for p in sorted(fs.glob(f"{root}/pages/part-*.parquet")):
        with fs.open(p, "rb") as f:
            for key in json.loads((pq.read_schema(f).metadata or {}).get(UNITS_KEY, b"[]")):
                index.setdefault(key, []).append(p)
    resume = time.perf_counter() - t
    assert len(index) == chunks
    return {"waits": waits, "job": job, "resume": resume}


def p90(xs: list[float]) -> float:
    return sorted(xs)[int(0.9 * (len(xs) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=120, help="chunks one rank commits per trial")
    ap.add_argument("--pages-per-chunk", type=int, default=64, help="page rows per chunk")
    ap.add_argument("--trials", type=int, default=4, help="trials; each runs both designs")
    ap.add_argument("--sync-s", type=float, default=1.0, help="staging: seconds between pushes")
    ap.add_argument("--request-ms", type=float, default=0.0,
                    help="added before every S3 request (a model of a remote bucket's latency)")
    ap.add_argument("--compute-ms", type=float, default=0.0,
                    help="OCR time a rank spends between two commits")
    args = ap.parse_args()
    server, endpoint = start_server()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint})
    import fsspec.config

    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    results: dict[str, list[dict]] = {"staging": [], "native": []}
    try:
        fs = s3fs_for(endpoint)
        if args.request_ms:
            add_request_latency(args.request_ms)
        with tempfile.TemporaryDirectory() as tmp:
            for t in range(args.trials):
                order = ("staging", "native") if t % 2 == 0 else ("native", "staging")
                for design in order:
                    prefix = f"t{t}-{design}"
                    if design == "staging":
                        r = run_staging(fs, prefix, Path(tmp) / prefix, args.chunks,
                                        args.pages_per_chunk, args.sync_s, args.compute_ms / 1e3)
                    else:
                        r = run_native(fs, prefix, args.chunks, args.pages_per_chunk,
                                       args.compute_ms / 1e3)
                    results[design].append(r)
                    print(f"trial {t} {design:8s} commit median {statistics.median(r['waits']) * 1e3:6.2f} ms"
                          f"  job {r['job']:6.2f} s  resume {r['resume']:6.2f} s", flush=True)
    finally:
        server.kill()
        server.wait()

    def med(design: str, what: str) -> float:
        if what == "commit":
            return statistics.median(statistics.median(r["waits"]) for r in results[design])
        if what == "commit_p90":
            return statistics.median(p90(r["waits"]) for r in results[design])
        return statistics.median(r[what] for r in results[design])

    print(f"\n{args.chunks} chunks x {args.pages_per_chunk} pages (~2.3 kB of text each), "
          f"{args.trials} trials, +{args.request_ms:g} ms per request, {args.compute_ms:g} ms "
          f"of OCR between commits; medians:")
    print(f"{'':16s} {'staging':>10s} {'native':>10s} {'native/staging':>15s}")
    for what, unit, scale in (("commit", "ms", 1e3), ("commit_p90", "ms", 1e3), ("job", "s", 1), ("resume", "s", 1)):
        a, b = med("staging", what) * scale, med("native", what) * scale
        print(f"{what + ' (' + unit + ')':16s} {a:10.2f} {b:10.2f} {b / a:14.2f}x")


if __name__ == "__main__":
    main()
