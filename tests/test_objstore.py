"""Object-store inputs (s3:// through the real s3fs client) against an S3 server on loopback.

The server is moto's (`moto.server.ThreadedMotoServer`), which speaks the S3 REST API over HTTP on
127.0.0.1: s3fs, aiobotocore and botocore run unchanged, only the endpoint differs
(FSSPEC_S3_ENDPOINT_URL, which fsspec applies to every S3 filesystem, in this process and in the
launched job).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, rows, run_launch
from test_archives import write_rar5_stored, write_zip
from nougat_dist.inputs import objstore
from nougat_dist.inputs import remote as download
from nougat_dist.inputs.remote import Downloader, DownloadError
from nougat_dist.inputs.sources import InputError, Source, discover, read_bytes
from nougat_dist.store import bucket
from nougat_dist.store.lease import LeaseHeld
from nougat_dist.store.manifest import inspect
from testing import fake_model

BUCKET = "papers-bucket"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """A fresh S3 server on a free loopback port, with s3fs pointed at it."""
    import s3fs  # noqa: F401 - pinned in requirements-dev.txt: a missing client fails here, loudly
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """An s3fs filesystem on the loopback server with an empty bucket, and a fresh download cache."""
    import fsspec
    import fsspec.config

    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_endpoint})
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if fs.exists(BUCKET):
        fs.rm(BUCKET, recursive=True)
    fs.mkdir(BUCKET)
    fs.invalidate_cache()
    return fs


@pytest.fixture(scope="module")
def five_pdfs(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    from testing.samples import write_sample_pdfs

    return [p.read_bytes() for p in write_sample_pdfs(tmp_path_factory.mktemp("five"), n_docs=5, seed=3)]


@pytest.fixture(scope="module")
def corpus(five_pdfs: list[bytes], tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """What the bucket holds (key → bytes): two PDFs, a note, a RAR and a zip of PDFs (five
    different documents in all)."""
    a, b, c, d, e = five_pdfs
    tmp_path = tmp_path_factory.mktemp("archives")
    rar = write_rar5_stored(tmp_path / "x.rar", [("r/one.pdf", c), ("r/two.pdf", d)])
    zp = write_zip(tmp_path / "y.zip", [("z/one.pdf", e), ("z/readme.txt", b"not a pdf")])
    return {"papers/a.pdf": a, "papers/sub/b.pdf": b, "papers/notes.txt": b"notes",
            "books/x.rar": rar.read_bytes(), "books/y.zip": zp.read_bytes()}


def upload(fs, corpus: dict[str, bytes]) -> None:
    for key, data in corpus.items():
        fs.pipe_file(f"{BUCKET}/{key}", data)
    fs.invalidate_cache()


def url(key: str) -> str:
    return f"s3://{BUCKET}/{key}"


def test_protocols_and_listing_specs():
    assert objstore.protocol("s3://b/k.pdf") == "s3" and objstore.protocol("GS://b/k") == "gs"
    # Handled elsewhere, or not a protocol at all: never an object store.
    for spec in ("https://h/a.pdf", "hf://datasets/a/b/*.pdf", "file:///tmp/a.pdf", "papers/a.pdf",
                 "nosuchproto://b/k"):
        assert objstore.protocol(spec) is None, spec
    assert download.is_remote("s3://b/k.pdf") and not download.is_remote("nosuchproto://b/k")
    listing = ["s3://b/papers/**.pdf", "s3://b/papers/", "s3://b", "s3://b/", "s3://b/x/[ab].pdf"]
    single = ["s3://b/papers/a.pdf", "s3://b/books/x.rar"]
    assert all(download.is_listing(s) for s in listing)
    assert not any(download.is_listing(s) for s in single)
    assert download.remote_name("s3://b/dir/weird%20name.PDF#sha256=" + "0" * 64) == "weird%20name.PDF"


def test_missing_package_is_a_setup_error_that_names_the_extra(monkeypatch, tmp_path):
    from fsspec.registry import known_implementations

    monkeypatch.setitem(known_implementations, "gs",
                        {"class": "no_such_module_xyz.GCSFileSystem", "err": "Install gcsfs to access GCS"})
    with pytest.raises(InputError, match=r"Install gcsfs.*pip install 'nougat-dist\[gcs\]'"):
        discover(["gs://bucket/papers/a.pdf"])
    listing = tmp_path / "inputs.txt"
    listing.write_text("gs://bucket/papers/a.pdf\n")
    with pytest.raises(InputError, match=r"nougat-dist\[gcs\]"):
        discover([str(listing)])


def test_glob_prefix_and_archives_are_discovered_and_read(s3, corpus, five_pdfs, tmp_path):
    upload(s3, corpus)
    assert discover([url("papers/**.pdf")]) == [Source(url("papers/a.pdf")), Source(url("papers/sub/b.pdf"))]
    # A prefix lists every document under it, like a directory (the note is not a document).
    assert discover([url("papers/")]) == [Source(url("papers/a.pdf")), Source(url("papers/sub/b.pdf"))]
    assert discover([url("papers/*/*.pdf")]) == [Source(url("papers/sub/b.pdf"))]
    books = discover([url("books/*")])
    assert books == [Source(url("books/x.rar"), "r/one.pdf"), Source(url("books/x.rar"), "r/two.pdf"),
                     Source(url("books/y.zip"), "z/one.pdf")]
    assert [read_bytes(s) for s in books] == five_pdfs[2:]
    for src in discover([url("papers/")]):
        assert read_bytes(src) == corpus[src.source.split(f"{BUCKET}/", 1)[1]]

    # A list file mixes object-store lines (with a checksum) and a missing object, which becomes
    # an error row instead of stopping the job.
    good = hashlib.sha256(corpus["papers/a.pdf"]).hexdigest()
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"{url('papers/a.pdf')} {good}\n{url('papers/gone.pdf')}\n{url('books/y.zip')}\n")
    found = discover([str(listing)])
    assert [s.source for s in found] == [f"{url('papers/a.pdf')}#sha256={good}", url("papers/gone.pdf"),
                                         url("books/y.zip")]
    assert read_bytes(found[0]) == corpus["papers/a.pdf"]
    err = inspect(found[1]).error
    assert "not found" in err and url("papers/gone.pdf") in err

    with pytest.raises(InputError, match="no PDF or archive matches"):
        discover([url("papers/*.txt.pdf")])


def test_cache_checksum_and_permanent_errors(s3, corpus, tmp_path):
    upload(s3, corpus)
    sleeps: list[float] = []
    dl = Downloader(tmp_path / "dl", retries=3, backoff=0.5, sleep=sleeps.append)
    path = dl.fetch(url("papers/a.pdf"))
    assert path.read_bytes() == corpus["papers/a.pdf"] and path.name.endswith("-a.pdf")
    # The cache answers the next fetch: the object is gone from the bucket, the bytes are not.
    s3.rm_file(f"{BUCKET}/papers/a.pdf")
    assert Downloader(dl.cache_dir).fetch(url("papers/a.pdf")) == path

    with pytest.raises(DownloadError, match="sha256 mismatch"):
        dl.fetch(url("papers/sub/b.pdf") + "#sha256=" + "0" * 64)
    with pytest.raises(DownloadError, match="not found"):
        dl.fetch(url("papers/nothing.pdf"))
    assert sleeps == []  # neither is retried
    assert sorted(p.name for p in dl.cache_dir.rglob("*") if p.is_file()) == [path.name]


def test_transient_errors_are_retried_and_a_partial_read_resumes(s3, corpus, tmp_path, monkeypatch):
    """A connection that drops mid-object is retried with backoff, from the byte it reached."""
    data = corpus["papers/sub/b.pdf"]
    upload(s3, corpus)
    ranges: list[tuple[int, int]] = []
    fs_cls = type(s3)
    real_cat = fs_cls.cat_file
    failures = iter([False, True, False, True])  # second and fourth reads drop

    def flaky_cat(self, path, start=None, end=None, **kw):
        ranges.append((start, end))
        if next(failures, False):
            raise ConnectionResetError("connection reset by peer")
        return real_cat(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(fs_cls, "cat_file", flaky_cat)
    # fsspec binds an async filesystem's sync methods per instance when it is created: drop the
    # cached instances so the downloader's is created with the patched method.
    fs_cls.clear_instance_cache()
    monkeypatch.setattr(download, "CHUNK_BYTES", 4096)  # several reads per object
    sleeps: list[float] = []
    dl = Downloader(tmp_path / "dl", retries=3, backoff=0.5, sleep=sleeps.append)
    path = dl.fetch(url("papers/sub/b.pdf"))
    assert path.read_bytes() == data
    assert sleeps == [0.5, 0.5], ranges  # progress between the drops resets the count
    starts = [r[0] for r in ranges]
    # Each retry starts where the part ended, never at byte 0 again.
    assert starts[:4] == [0, 4096, 4096, 8192] and starts.count(0) == 1
    assert len(data) > 8192


COMMON = ["--device", "cpu", "--num-workers", "1"]
FAKE_MODEL = fake_model.env("delay=0")


@pytest.fixture(scope="module")
def local_run(corpus: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The corpus as local files, and the pages of a job over them with a local --output."""
    local = tmp_path_factory.mktemp("local")
    for key, data in corpus.items():
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(data)
    out = local / "out"
    run_launch(["--input", str(local / "papers"), str(local / "books"), "--output", str(out), *COMMON],
               env=FAKE_MODEL, timeout=240)
    return local, rows(out)


def job_env(tmp_path: Path, **over: str) -> dict[str, str]:
    return {**FAKE_MODEL, **S3_ENV, "FSSPEC_S3_ENDPOINT_URL": os.environ["FSSPEC_S3_ENDPOINT_URL"],
            download.CACHE_ENV: str(tmp_path / "job-cache"), bucket.STAGING_ENV: str(tmp_path / "staging"),
            **over}


def test_e2e_bucket_equals_local(s3, corpus, local_run, tmp_path):
    """The job reads a 2-file prefix and archives from the bucket; its pages equal the same files
    given as local paths."""
    upload(s3, corpus)
    run_launch(["--input", url("papers/**.pdf"), url("books/"), "--output", str(tmp_path / "remote"),
                *COMMON], env=job_env(tmp_path), timeout=240)
    remote_rows = rows(tmp_path / "remote")
    assert remote_rows == local_run[1] and len(remote_rows) > 0
    df = pd.read_parquet(tmp_path / "remote" / "pages")
    # source: each object's key from its input's prefix
    assert set(df.source) == {"a.pdf", "sub/b.pdf", "x.rar", "y.zip"}
    assert set(df.status) <= {"ok", "empty"}, df[["source", "page", "status", "error"]]


# --- outputs -------------------------------------------------------------------------------------

def bucket_copy(fs, prefix: str, dest: Path) -> Path:
    """Everything under the bucket prefix, downloaded as a directory (what a reader of the
    bucket sees)."""
    fs.invalidate_cache()
    fs.get(f"{BUCKET}/{prefix}/", str(dest), recursive=True)
    return dest


def test_two_rank_job_writes_its_output_to_the_bucket(s3, local_run, tmp_path):
    local, reference = local_run
    out = url("out/run1")
    run_launch(["--input", str(local / "papers"), str(local / "books"), "--output", out, *COMMON],
               nproc=2, env=job_env(tmp_path), timeout=300)
    got = bucket_copy(s3, "out/run1", tmp_path / "got")
    assert rows(got) == reference
    assert (got / "manifest.parquet").exists() and (got / "documents").is_dir()
    stats = json.loads((got / "stats.json").read_text())
    assert stats["complete"] and stats["world_size"] == 2
    assert not (got / "lease.json").exists()  # released at the end
    # The staging dir is where the ranks wrote; the bucket holds the same committed chunks.
    staged = sorted(p.name for p in (tmp_path / "staging").rglob("part-*.parquet"))
    assert staged == sorted(p.name for p in (got / "pages").glob("part-*.parquet")) and staged


def test_a_plan_on_a_bucket_output_writes_nothing_there(s3, local_run, tmp_path):
    """A plan only reads: it runs while another job holds the prefix's lease (a writer would be
    refused), leaves that lease alone and adds no object."""
    local, _ = local_run
    out = url("out/planned")
    other = bucket.BucketLease(bucket.BucketSync(out, tmp_path / "other-node"), "slurm:4343")
    other.holder.host = "another-node"
    other.acquire()
    try:
        s3.invalidate_cache()
        before = {p: s3.info(p)["size"] for p in s3.find(f"{BUCKET}/out/planned")}
        proc = run_launch(["--input", str(local / "papers"), "--output", out, "--plan", *COMMON],
                          check=False, env=job_env(tmp_path), timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        s3.invalidate_cache()
        assert {p: s3.info(p)["size"] for p in s3.find(f"{BUCKET}/out/planned")} == before
        assert list(before) == [f"{BUCKET}/out/planned/lease.json"]
    finally:
        other.release()


@pytest.mark.faults
def test_kill9_then_resume_on_a_fresh_node_is_exactly_once(s3, local_run, tmp_path):
    """SIGKILL mid-run; the resume runs with an empty staging dir (another node) and gets what was
    committed from the bucket alone."""
    local, reference = local_run
    out = url("out/killed")
    args = ["--input", str(local / "papers"), str(local / "books"), "--output", out,
            "--device", "cpu", "--num-workers", "1", "--unit-pages", "2", "--commit-pages", "2",
            "--batch-size", "2"]
    env = {**os.environ, **job_env(tmp_path, **{bucket.STAGING_ENV: str(tmp_path / "node-a"),
                                                 bucket.SYNC_ENV: "0.3"}, **fake_model.env("delay=0.5"))}
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            s3.invalidate_cache()
            if s3.glob(f"{BUCKET}/out/killed/pages/part-*.parquet"):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read()[-4000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    in_bucket = rows(bucket_copy(s3, "out/killed", tmp_path / "at-kill"))
    assert 0 < len(in_bucket) < len(reference)
    s3.invalidate_cache()
    assert s3.exists(f"{BUCKET}/out/killed/lease.json")  # the killed job never released it

    run_launch(args, timeout=240,
               env=job_env(tmp_path, **{bucket.STAGING_ENV: str(tmp_path / "node-b")}))
    got = bucket_copy(s3, "out/killed", tmp_path / "got")
    assert rows(got) == reference  # every page once (rows() fails on a page stored twice)
    stats = json.loads((got / "stats.json").read_text())
    assert stats["pages_resumed"] >= len(in_bucket)


def test_a_second_job_on_the_same_prefix_is_refused(s3, local_run, tmp_path):
    local, _ = local_run
    out = url("out/shared")
    other = bucket.BucketLease(bucket.BucketSync(out, tmp_path / "other-node"), "slurm:4242")
    other.holder.host = "another-node"  # a live job elsewhere: fresh heartbeat, not ours
    other.acquire()
    try:
        proc = run_launch(["--input", str(local / "papers"), "--output", out, *COMMON], check=False,
                          env=job_env(tmp_path), timeout=240)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "being written by another job" in proc.stderr and "another-node" in proc.stderr
        s3.invalidate_cache()
        assert not s3.glob(f"{BUCKET}/out/shared/pages/*")
    finally:
        other.release()
    s3.invalidate_cache()
    assert not s3.exists(f"{BUCKET}/out/shared/lease.json")


def _stale_lease(out: str, stage: Path) -> bucket.BucketLease:
    """A lease left by a job that died elsewhere an hour ago."""
    dead = bucket.BucketLease(bucket.BucketSync(out, stage), "slurm:1")
    dead.holder.host = "a-node-that-died"
    dead.holder.heartbeat -= 3600
    dead.acquire()
    return dead


def test_two_jobs_taking_over_one_stale_lease_exactly_one_wins(s3, tmp_path, monkeypatch):
    """Both takers read the stale lease before either writes (the interleaving in which a
    read-then-write takeover lets both start); the takeover is conditional on the version they
    read, so the store accepts one write, and the other taker re-reads and is refused."""
    out = url("out/stale")
    dead = _stale_lease(out, tmp_path / "dead")
    takers = [bucket.BucketLease(bucket.BucketSync(out, tmp_path / f"t{i}"), f"slurm:{10 + i}")
              for i in range(2)]
    both_read = threading.Barrier(2, timeout=30)
    real_read = bucket.BucketLease._read

    def read_then_wait(self):
        holder, version = real_read(self)
        if self in takers and holder is not None and holder.token == dead.holder.token:
            both_read.wait()
        return holder, version

    monkeypatch.setattr(bucket.BucketLease, "_read", read_then_wait)
    sent: list[dict] = []
    real_replace = bucket.BucketLease._replace

    def record(self, version):
        sent.append({"taker": takers.index(self), "version": version})
        return real_replace(self, version)

    monkeypatch.setattr(bucket.BucketLease, "_replace", record)
    outcome: dict[int, str] = {}

    def take(i: int) -> None:
        try:
            takers[i].acquire()
            outcome[i] = "won"
        except LeaseHeld as e:
            outcome[i] = str(e)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcome) == [0, 1] and list(outcome.values()).count("won") == 1, outcome
    winner = next(i for i, o in outcome.items() if o == "won")
    loser = 1 - winner
    # Both sent a conditional takeover on the stale lease's ETag; only one was accepted.
    etag = s3.info(f"{BUCKET}/out/stale/lease.json")["ETag"]
    assert len(sent) == 2 and sent[0]["version"] == sent[1]["version"] != etag, sent
    assert f"slurm:{10 + winner}" in outcome[loser] and "being written by another job" in outcome[loser]
    held = json.loads(s3.cat_file(f"{BUCKET}/out/stale/lease.json"))
    assert held["token"] == takers[winner].holder.token
    # The dead job, back to life, finds out at its next renewal and writes nothing over it.
    monkeypatch.setattr(bucket.BucketLease, "_replace", real_replace)
    assert not dead.renew()
    assert takers[winner].renew()
    assert json.loads(s3.cat_file(f"{BUCKET}/out/stale/lease.json"))["token"] == takers[winner].holder.token
    takers[winner].release()
    assert not s3.exists(f"{BUCKET}/out/stale/lease.json")


def test_a_renewal_after_a_takeover_does_not_overwrite_it(s3, tmp_path, monkeypatch):
    """The holder reads its own lease, another job takes it over before the holder writes the
    new heartbeat: the heartbeat's write is conditional, fails, and the holder stops."""
    out = url("out/renew")
    slow = _stale_lease(out, tmp_path / "slow")
    taker = bucket.BucketLease(bucket.BucketSync(out, tmp_path / "taker"), "slurm:20")
    real_read = bucket.BucketLease._read
    calls = []

    def read_then_lose(self):
        got = real_read(self)
        if self is slow and not calls:
            calls.append(1)
            taker.acquire()  # between the holder's read and its write
        return got

    monkeypatch.setattr(bucket.BucketLease, "_read", read_then_lose)
    assert not slow.renew()
    assert calls and json.loads(s3.cat_file(f"{BUCKET}/out/renew/lease.json"))["token"] == taker.holder.token
    taker.release()


def test_a_release_after_a_takeover_leaves_the_new_lease(s3, tmp_path, monkeypatch):
    """The holder reads its own lease to release it, and the same job restarted elsewhere takes
    it over before the delete: the delete is conditional on the version read, and fails."""
    out = url("out/release")
    mine = bucket.BucketLease(bucket.BucketSync(out, tmp_path / "mine"), "slurm:40")
    mine.acquire()
    again = bucket.BucketLease(bucket.BucketSync(out, tmp_path / "again"), "slurm:40")
    real_read = bucket.BucketLease._read

    def read_then_taken(self):
        got = real_read(self)
        if self is mine:
            again.acquire()  # the same job id: taken over at once
        return got

    monkeypatch.setattr(bucket.BucketLease, "_read", read_then_taken)
    mine.release()
    monkeypatch.setattr(bucket.BucketLease, "_read", real_read)
    assert json.loads(s3.cat_file(f"{BUCKET}/out/release/lease.json"))["token"] == again.holder.token
    again.release()
    assert not s3.exists(f"{BUCKET}/out/release/lease.json")


def test_push_creates_chunks_once_and_never_overwrites_another_writers(s3, tmp_path, caplog):
    stage = tmp_path / "stage"
    (stage / "pages").mkdir(parents=True)
    sync = bucket.BucketSync(url("out/once"), stage)
    (stage / "pages" / "part-r00000-000000.parquet").write_bytes(b"mine")
    (stage / "pages" / "part-r00000-000001.parquet").write_bytes(b"mine too")
    s3.pipe_file(f"{BUCKET}/out/once/pages/part-r00000-000001.parquet", b"another writer's")
    (stage / "pages" / ".tmp-part-r00000-000002.parquet").write_bytes(b"half written")
    assert sync.push() == 1
    assert s3.cat_file(f"{BUCKET}/out/once/pages/part-r00000-000000.parquet") == b"mine"
    assert s3.cat_file(f"{BUCKET}/out/once/pages/part-r00000-000001.parquet") == b"another writer's"
    assert "already exists with other content" in caplog.text
    assert not s3.exists(f"{BUCKET}/out/once/pages/.tmp-part-r00000-000002.parquet")
    # Finalize (rank 0, under the lease) rewrites one chunk and removes another: mirrored.
    (stage / "pages" / "part-r00000-000000.parquet").write_bytes(b"deduplicated")
    (stage / "pages" / "part-r00000-000001.parquet").unlink()
    sync.push(mirror_removals=True)
    assert s3.cat_file(f"{BUCKET}/out/once/pages/part-r00000-000000.parquet") == b"deduplicated"
    # Not synced by this process (another writer's object): never removed.
    assert s3.cat_file(f"{BUCKET}/out/once/pages/part-r00000-000001.parquet") == b"another writer's"
    # Rank 0 at the end of a complete job (finalize ran, under the lease): the bucket becomes
    # the staging dir, so a chunk finalize removed does not linger there.
    sync.push(authoritative=True)
    assert not s3.exists(f"{BUCKET}/out/once/pages/part-r00000-000001.parquet")
    # A fresh staging dir (a new node) pulls what is committed.
    other = bucket.BucketSync(url("out/once"), tmp_path / "fresh")
    assert other.pull() == 1
    assert (tmp_path / "fresh" / "pages" / "part-r00000-000000.parquet").read_bytes() == b"deduplicated"


# --- GCS -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gcs_endpoint():
    """A GCS emulator (the JSON API gcsfs speaks) on a free loopback port, in memory.

    It does not implement ifGenerationMatch, so a create-if-absent write overwrites there: the
    job tests here do not rely on it; `gcs_requests` records what is sent and enforces it."""
    import gcsfs  # noqa: F401 - pinned in requirements-dev.txt
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_gcs_inputs_and_output_through_gcsfs(gcs_endpoint, corpus, local_run, tmp_path, monkeypatch):
    """gs:// globs and prefixes are discovered and read, and a job whose inputs and output are in
    the bucket produces the pages of the same files given locally."""
    import fsspec

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    monkeypatch.setenv(download.CACHE_ENV, str(tmp_path / "cache"))
    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    for key, data in corpus.items():
        fs.pipe_file(f"{BUCKET}/{key}", data)
    type(fs).clear_instance_cache()
    gs = lambda key: f"gs://{BUCKET}/{key}"  # noqa: E731
    assert discover([gs("papers/**.pdf")]) == [Source(gs("papers/a.pdf")), Source(gs("papers/sub/b.pdf"))]
    books = discover([gs("books/")])
    assert [(s.source, s.member) for s in books] == [(gs("books/x.rar"), "r/one.pdf"),
                                                     (gs("books/x.rar"), "r/two.pdf"), (gs("books/y.zip"), "z/one.pdf")]
    assert read_bytes(Source(gs("papers/sub/b.pdf"))) == corpus["papers/sub/b.pdf"]

    env = {**FAKE_MODEL, "STORAGE_EMULATOR_HOST": gcs_endpoint, download.CACHE_ENV: str(tmp_path / "job-cache"),
           bucket.STAGING_ENV: str(tmp_path / "staging")}
    run_launch(["--input", gs("papers/**.pdf"), gs("books/"), "--output", gs("out/run1"), *COMMON],
               env=env, timeout=240)
    fs.invalidate_cache()
    fs.get(f"{BUCKET}/out/run1/", str(tmp_path / "got"), recursive=True)
    assert rows(tmp_path / "got") == local_run[1]
    assert json.loads((tmp_path / "got" / "stats.json").read_text())["complete"]
    assert not (tmp_path / "got" / "lease.json").exists()


class _ConditionNotMet(Exception):
    pass


@pytest.fixture
def gcs_requests(gcs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, dict]]:
    """Every request the GCS emulator receives, as (method, path, query).

    The emulator keeps generations but ignores ifGenerationMatch; this fixture enforces it where
    objects are stored (the emulator serves one request at a time, so the check and the write
    are one step, as on GCS) and answers 412 as GCS does. What is proven with it is that the
    client sends the precondition and handles the refusal; that GCS enforces it is GCS's
    documented behaviour, not something this emulator can show."""
    from urllib.parse import parse_qs, urlsplit

    from gcp_storage_emulator import server as emu
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.storage import Storage

    seen: list[tuple[str, str, dict]] = []
    real_handle, real_create = emu.Router.handle, Storage.create_file

    def handle(self, method):
        u = urlsplit(self._request_handler.path)
        seen.append((method, u.path, parse_qs(u.query)))
        try:
            return real_handle(self, method)
        except _ConditionNotMet:
            rh = self._request_handler
            body = b'{"error": {"code": 412, "message": "conditionNotMet"}}'
            rh.send_response(412)
            rh.send_header("Content-Type", "application/json")
            rh.send_header("Content-Length", str(len(body)))
            rh.end_headers()
            rh.wfile.write(body)

    def create_file(self, bucket_name, file_name, content, file_obj, file_id=None):
        want = seen[-1][2].get("ifGenerationMatch", [None])[0]
        if want is not None:
            try:
                have = str(self.get_file_obj(bucket_name, file_name)["generation"])
            except NotFound:
                have = "0"
            if have != want:
                raise _ConditionNotMet(f"{file_name}: generation {have}, wanted {want}")
        return real_create(self, bucket_name, file_name, content, file_obj, file_id)

    monkeypatch.setattr(emu.Router, "handle", handle)
    monkeypatch.setattr(Storage, "create_file", create_file)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    return seen


def test_gcs_writes_carry_their_generation_preconditions(gcs_requests, tmp_path):
    """Lease and chunks are created with ifGenerationMatch=0; a takeover of a stale lease sends
    the generation it read, and a second taker holding the same generation is refused (412)."""
    import fsspec

    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    out = f"gs://{BUCKET}/out/gcs-lease"
    lease_key = "out/gcs-lease/lease.json"

    def posts(key: str) -> list[str | None]:
        got = []
        for method, path, query in gcs_requests:
            if method == "POST" and "/upload/" in path and (
                    query.get("name", [None])[0] in (None, key)):
                got.append(query.get("ifGenerationMatch", [None])[0])
        return got

    dead = _stale_lease(out, tmp_path / "dead")
    assert posts(lease_key) == ["0"]
    stage = tmp_path / "stage"
    (stage / "pages").mkdir(parents=True)
    (stage / "pages" / "part-r00000-000000.parquet").write_bytes(b"chunk")
    del gcs_requests[:]
    assert bucket.BucketSync(out, stage).push() == 1
    assert posts("out/gcs-lease/pages/part-r00000-000000.parquet") == ["0"]

    fs.invalidate_cache()
    stale_gen = str(fs.info(f"{BUCKET}/{lease_key}")["generation"])
    del gcs_requests[:]
    taker = bucket.BucketLease(bucket.BucketSync(out, tmp_path / "taker"), "slurm:30")
    taker.acquire()
    # The create (refused: the dead job's lease is there), then the takeover at its generation.
    assert posts(lease_key) == ["0", stale_gen]
    assert json.loads(fs.cat_file(f"{BUCKET}/{lease_key}"))["token"] == taker.holder.token
    # A second job that read the same stale lease: its takeover is refused, nothing written.
    late = bucket.BucketLease(bucket.BucketSync(out, tmp_path / "late"), "slurm:31")
    assert not late._replace(stale_gen)
    assert json.loads(fs.cat_file(f"{BUCKET}/{lease_key}"))["token"] == taker.holder.token
    assert not dead.renew()
    assert taker.renew()
    fs.invalidate_cache()
    held_gen = str(fs.info(f"{BUCKET}/{lease_key}")["generation"])
    del gcs_requests[:]
    taker.release()
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/{lease_key}")
    deletes = [q.get("ifGenerationMatch", [None])[0] for m, p, q in gcs_requests if m == "DELETE"]
    assert deletes == [held_gen]
