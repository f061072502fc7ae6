"""`--output s3://…` / `gs://…`: a node-local staging directory kept in step with a bucket prefix.

The job's store (chunks, manifest, index, finalize) relies on a POSIX directory: atomic rename,
listing what was renamed into place, `link()` for the lease. An object store has none of them, so
every rank writes to a staging directory on its own node (``$NOUGAT_DIST_STAGING``, default
``~/.cache/nougat-dist/staging/<hash of the URL>``) exactly as to a local ``--output``, and
`BucketSync` mirrors it:

* **start** (before the plan): rank 0 takes the bucket lease (last paragraph); the first rank of each node
  pulls every object under the prefix into its staging directory, so a resumed job — on the same
  nodes or on fresh ones — sees what is committed (the manifest, every chunk) and numbers its new
  chunks after the committed ones; all ranks wait for that (a barrier).
* **during the run**: the first rank of each node pushes what was committed locally every
  ``$NOUGAT_DIST_SYNC_SECONDS`` (default 10): a *new* chunk or manifest is created with a
  create-if-absent precondition (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``, through
  fsspec's ``mode="create"``), so an object is never overwritten by another writer; rank 0 also
  pulls the chunks other nodes pushed, for the end-of-job handshake.
* **end**: every rank pushes once more before it exits (after a stop too: a stopped rank's last
  commit reaches the bucket), then rank 0 mirrors what finalize rewrote or removed (duplicate rows
  dropped, failed rows set aside) and releases the lease.

A chunk is committed *in the bucket* once its push has returned; a rank killed between its local
commit and the push loses that chunk with its node, and its pages are simply done again on resume.

The bucket lease (``lease.json`` under the prefix, one writer per output) is in
`nougat_dist.store.bucket_lease`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Callable

from nougat_dist.errors import SetupError
from nougat_dist.inputs import objstore
from nougat_dist.store import lease as store_lease
from nougat_dist.store.bucket_lease import BucketLease, _precondition_failed  # noqa: F401 - old import names
from nougat_dist.store.layout import LEASE_FILE, PAGES_DIR, TMP_PREFIX, MANIFEST_FILE

log = logging.getLogger(__name__)

STAGING_ENV = "NOUGAT_DIST_STAGING"
SYNC_ENV = "NOUGAT_DIST_SYNC_SECONDS"
DEFAULT_SYNC_S = 10.0


def is_bucket(output: str) -> bool:
    """Whether --output names an object-store prefix rather than a directory."""
    return objstore.is_objstore(output)


def staging_dir(url: str, env: dict[str, str] | None = None) -> Path:
    """This node's staging directory for url: the same for every rank of the node and across
    restarts, different for different URLs."""
    env = dict(os.environ if env is None else env)
    base = Path(env[STAGING_ENV]).expanduser() if env.get(STAGING_ENV) else (
        Path.home() / ".cache" / "nougat-dist" / "staging")
    return base / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def _write_once(rel: str) -> bool:
    """Files a job writes once under a fresh name: created with the create-if-absent precondition."""
    return rel == MANIFEST_FILE or (rel.startswith(PAGES_DIR + "/") and rel.endswith(".parquet"))


class BucketSync:
    """Mirror between one node's staging directory and the bucket prefix of `--output`."""

    def __init__(self, url: str, local: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self.local = Path(local) if local is not None else staging_dir(url)
        try:
            self.fs, self.root = objstore.filesystem(self.url)
        except ValueError as e:
            raise SetupError(str(e)) from e
        self.root = self.root.rstrip("/")
        # rel path -> (size, mtime_ns) of the local file when it was last known equal to the
        # bucket's object: what this process pulled or pushed.
        self._synced: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lease: BucketLease | None = None
        self.read_only = False

    # --- listing --------------------------------------------------------------------------------

    def _remote(self) -> dict[str, int]:
        """rel path -> size of every object under the prefix (one listing)."""
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return {}
        self.fs.invalidate_cache()  # the next listing must see new objects
        out = {}
        prefix = self.root + "/"
        for path, info in found.items():
            if path.startswith(prefix) and info.get("type", "file") == "file":
                out[path[len(prefix):]] = int(info.get("size") or 0)
        return out

    def _local_files(self) -> dict[str, os.stat_result]:
        out = {}
        if not self.local.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(self.local):
            for f in files:
                if f.startswith(TMP_PREFIX) or f == LEASE_FILE:
                    continue
                p = Path(dirpath) / f
                try:
                    out[p.relative_to(self.local).as_posix()] = p.stat()
                except FileNotFoundError:  # removed while we walked (finalize rewrote it)
                    continue
        return out

    # --- pull and push ---------------------------------------------------------------------------

    def pull(self, only: Callable[[str], bool] = lambda rel: True) -> int:
        """Download the objects missing here (or of another size). Returns how many."""
        n = 0
        with self._lock:
            local = self._local_files()
            for rel, size in sorted(self._remote().items()):
                if rel == LEASE_FILE or not only(rel):
                    continue
                st = local.get(rel)
                if st is not None and st.st_size == size:
                    continue
                dest = self.local / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}.pull-{os.getpid()}")
                self.fs.get_file(f"{self.root}/{rel}", str(tmp))
                os.replace(tmp, dest)
                st = dest.stat()
                self._synced[rel] = (st.st_size, st.st_mtime_ns)
                n += 1
        if n:
            log.info("pulled %d object(s) from %s into %s", n, self.url, self.local)
        return n

    def push(self, *, mirror_removals: bool = False, authoritative: bool = False,
             only: Callable[[str], bool] = lambda rel: True) -> int:
        """Upload what changed here since it was last synced. Returns objects written or removed.

        New chunks and the manifest are created only if absent; an object of another size already
        under a new chunk's name is left alone and logged (another writer's, or a version rank 0
        has rewritten since). mirror_removals removes from the bucket what this process synced and
        is gone here. authoritative (rank 0, once finalize has run under the lease) makes the
        bucket equal to this staging dir: it overwrites what differs and removes chunks that
        finalize removed.
        """
        n = 0
        with self._lock:
            local = {rel: st for rel, st in self._local_files().items() if only(rel)}
            remote: dict[str, int] | None = self._remote() if authoritative else None
            for rel, st in sorted(local.items()):
                mark = (st.st_size, st.st_mtime_ns)
                if self._synced.get(rel) == mark and not authoritative:
                    continue
                if remote is None:
                    remote = self._remote()
                if remote.get(rel) == st.st_size and (rel not in self._synced or authoritative):
                    self._synced[rel] = mark  # already there: pushed by another rank, or pulled
                    continue
                target = f"{self.root}/{rel}"
                if _write_once(rel) and rel not in self._synced and not authoritative:
                    try:
                        self.fs.pipe_file(target, (self.local / rel).read_bytes(), mode="create")
                    except FileExistsError:
                        log.error("%s/%s already exists with other content (another job writing "
                                  "this output, or a chunk rewritten since): not overwritten",
                                  self.url, rel)
                        continue
                else:
                    # Logs, status, attempt records, derived files; a chunk rank 0 rewrote at
                    # finalize, under the lease.
                    self.fs.pipe_file(target, (self.local / rel).read_bytes())
                self._synced[rel] = mark
                n += 1
            gone = set(self._synced) - set(local) if mirror_removals else set()
            if authoritative and remote is not None:
                gone |= {rel for rel in remote if _write_once(rel) and rel not in local and only(rel)}
            for rel in sorted(gone):
                try:
                    self.fs.rm_file(f"{self.root}/{rel}")
                except FileNotFoundError:
                    pass
                self._synced.pop(rel, None)
                n += 1
        return n

    # --- the job's side ----------------------------------------------------------------------------

    def start(self, *, rank: int, local_rank: int, barrier: Callable[[], None],
              job_id: str | None = None, every_s: float | None = None,
              read_only: bool = False) -> None:
        """Lease (rank 0), pull (each node's first rank), barrier, then the background push.

        read_only (a --plan): pull what is committed and nothing else; no lease, no push, so a
        plan leaves the bucket as it found it."""
        self.local.mkdir(parents=True, exist_ok=True)
        self.read_only = read_only
        if read_only:
            if local_rank == 0:
                self.pull()
            barrier()
            return
        if rank == 0:
            self.lease = BucketLease(self, store_lease.job_id_from_env() if job_id is None else job_id)
            self.lease.acquire()
            self.lease.start_heartbeat()
        if local_rank == 0:
            self.pull()
        barrier()
        if local_rank == 0:
            every = every_s if every_s is not None else float(os.environ.get(SYNC_ENV) or DEFAULT_SYNC_S)
            self._thread = threading.Thread(target=self._loop, args=(every, rank == 0),
                                             name="bucket-sync", daemon=True)
            self._thread.start()
        log.info("output %s is staged in %s (pushed every few seconds)", self.url, self.local)

    def _loop(self, every_s: float, pull_pages: bool) -> None:
        while not self._stop.wait(every_s):
            try:
                self.push()
                if pull_pages:  # rank 0 finalizes: it needs the chunks other nodes committed
                    self.pull(lambda rel: rel.startswith(PAGES_DIR + "/"))
            except Exception as e:  # noqa: BLE001 - the store's errors; a bug is re-raised
                if not objstore.is_store_error(e):
                    raise
                # One failed round must not stop the job: the next round retries, and the end
                # of the job pushes everything once more.
                log.warning("syncing %s failed (retried next round): %s", self.url, e)

    def close(self, *, rank: int, complete: bool = False) -> None:
        """Stop the background push, push what is left, and release the lease (rank 0).

        complete (rank 0, the job finished: every chunk was gathered here and finalize ran)
        makes the bucket equal to this staging dir. The other ranks push only their own chunks
        (and logs, records), created if absent, so they never undo what finalize did. Raises
        OSError if the last push fails: the output is then not all in the bucket, and running the
        same command again pushes it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        if self.read_only:
            return
        own = f"{PAGES_DIR}/part-r{rank:05d}-"
        try:
            if rank == 0:
                self.push(mirror_removals=True, authoritative=complete)
            else:
                self.push(only=lambda rel: not rel.startswith(PAGES_DIR + "/") or rel.startswith(own))
        finally:
            if self.lease is not None:
                self.lease.release()
