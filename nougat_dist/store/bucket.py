"""`--output s3://…` / `gs://…`: a node-local staging directory kept in step with a bucket prefix.

The job's store (chunks, manifest, index, finalize) relies on a POSIX directory: atomic rename,
listing what was renamed into place, `link()` for the lease. An object store has none of them, so
every rank writes to a staging directory on its own node (``$NOUGAT_DIST_STAGING``, default
``~/.cache/nougat-dist/staging/<hash of the URL>``) exactly as to a local ``--output``, and
`BucketSync` mirrors it:

* **start** (before the plan): rank 0 takes the bucket lease (below); the first rank of each node
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

The bucket lease (``lease.json`` under the prefix) is created with the same precondition, renewed
by rank 0 every `lease.HEARTBEAT_S`, and taken over when it names the same job or its heartbeat is
older than `lease.STALE_AFTER_S`. Every replacement or removal of the lease object (a takeover, a
renewal, the release) is conditional on the version that was read: S3 ``If-Match: <ETag>``, GCS
``ifGenerationMatch=<generation>``. Two jobs that find the same stale lease both try to replace
that version; the store accepts one write and answers the other with 412, so exactly one takes
over and the other re-reads, finds a live lease and is refused. A renewal whose condition fails
(another job replaced the lease) stops this job (SIGTERM to itself: commit, push, exit 75).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import signal
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from nougat_dist.errors import SetupError
from nougat_dist.inputs import objstore
from nougat_dist.store import lease as store_lease
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


def _precondition_failed(e: BaseException) -> bool:
    """Whether e is the store refusing a conditional write (HTTP 412)."""
    # gcsfs raises FileExistsError for every 412; s3fs maps PreconditionFailed to a plain OSError
    # (FileExistsError only for If-None-Match) and keeps botocore's error as the cause.
    if isinstance(e, FileExistsError):
        return True
    err = getattr(e.__cause__, "response", None) or {}
    return err.get("Error", {}).get("Code") in {"PreconditionFailed", "412"}


class BucketLease:
    """The single-writer lease of a bucket output: an object created only if absent, and
    replaced only at the version that was read."""

    def __init__(self, sync: BucketSync, job_id: str) -> None:
        self.fs = sync.fs
        self.path = f"{sync.root}/{LEASE_FILE}"
        self.url = sync.url
        self.protocol = objstore.protocol(sync.url) or ""
        now = time.time()
        self.holder = store_lease.Holder(platform.node(), os.getpid(), job_id, uuid.uuid4().hex, now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[store_lease.Holder | None, str | None]:
        """(holder, version) of the lease object now; (None, None) when there is none.

        The version (S3 ETag, GCS generation) is read before the content: if the object changes
        in between, a write conditional on that version fails, so a decision taken on newer
        content can never overwrite a lease nobody looked at."""
        self.fs.invalidate_cache(self.path)
        try:
            info = self.fs.info(self.path)
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        version = info.get("generation") or info.get("ETag") or info.get("etag")
        try:
            return store_lease.Holder(**json.loads(raw)), (str(version) if version else None)
        except (ValueError, TypeError):
            return store_lease.Holder("?", -1, "?", "?", 0.0, 0.0), (str(version) if version else None)

    def _body(self) -> bytes:
        return json.dumps(asdict(self.holder)).encode()

    def _replace(self, version: str | None) -> bool:
        """Overwrite the lease object only if it is still at `version`. False when another writer
        replaced or removed it first (the store answered 412 or 404)."""
        body = self._body()
        try:
            if self.protocol in ("gs", "gcs") and version:
                # gcsfs's pipe_file knows only ifGenerationMatch=0; a one-request media upload
                # carries the generation the lease was read at.
                from urllib.parse import quote

                bucket, key, _ = self.fs.split_path(self.path)
                self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                             uploadType="media", name=key, ifGenerationMatch=version, data=body,
                             headers={"Content-Type": "application/octet-stream"})
                self.fs.invalidate_cache(self.path)
            elif self.protocol in ("s3", "s3a") and version:
                self.fs.pipe_file(self.path, body, IfMatch=version)
            else:
                # A store without a conditional overwrite known here: the replacement is
                # read-then-write, and two takers of one stale lease can both start.
                self.fs.pipe_file(self.path, body)
        except FileNotFoundError:
            return False
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        return True

    def acquire(self, stale_after_s: float = store_lease.STALE_AFTER_S) -> None:
        """Take the lease or raise LeaseHeld naming the holder."""
        for _ in range(3):
            try:
                self.fs.pipe_file(self.path, self._body(), mode="create")
                return
            except FileExistsError:
                pass
            holder, version = self._read()
            if holder is None:
                continue  # released between our create and our read
            # The local lease's rules: the same job restarted, a dead process on this host, or a
            # heartbeat older than the stale bound.
            reason = store_lease._reason_to_take(holder, self.holder.job_id, stale_after_s)
            if reason is None:
                raise store_lease.LeaseHeld(
                    f"{self.url} is being written by another job ({holder.describe()}). Wait for "
                    "it, stop it, or choose another --output. A lease whose heartbeat is older "
                    f"than {stale_after_s:.0f}s is taken over automatically.")
            if not self._replace(version):
                # Another job replaced (or released) that version first: look again.
                continue
            log.warning("took over the lease of %s: %s (%s)", self.url, reason, holder.describe())
            return
        raise store_lease.LeaseHeld(f"could not take the lease of {self.url}: other jobs keep replacing it")

    def renew(self) -> bool:
        """Write a new heartbeat; False (and an error) when another job's lease is there now."""
        current, version = self._read()
        if current is not None and current.token == self.holder.token:
            self.holder.heartbeat = time.time()
            if self._replace(version):
                return True
            current, _ = self._read()  # replaced between our read and our write
        log.error("lost the lease of %s to %s: another job now writes this output; stopping",
                  self.url, current.describe() if current else "nobody")
        return False

    def start_heartbeat(self, every_s: float = store_lease.HEARTBEAT_S) -> None:
        """Renew in a daemon thread; a lost lease stops the job as a SIGTERM does (commit, exit 75)."""
        def beat() -> None:
            while not self._stop.wait(every_s):
                try:
                    if not self.renew():
                        os.kill(os.getpid(), signal.SIGTERM)
                        return
                except OSError as e:
                    log.warning("lease heartbeat on %s failed: %s", self.url, e)
        self._thread = threading.Thread(target=beat, name="bucket-lease", daemon=True)
        self._thread.start()

    def _remove(self, version: str | None) -> bool:
        """Delete the lease object only if it is still at `version` (False when it was replaced)."""
        try:
            if self.protocol in ("gs", "gcs") and version:
                bucket, key, _ = self.fs.split_path(self.path)
                self.fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=version)
            elif self.protocol in ("s3", "s3a") and version:
                bucket, key, _ = self.fs.split_path(self.path)
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            else:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            return True
        except OSError as e:
            if _precondition_failed(e):
                return False
            raise
        finally:
            self.fs.invalidate_cache(self.path)
        return True

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours (at the version read, so a
        lease another job took over in between stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        current, version = self._read()
        if current is not None and current.token == self.holder.token and not self._remove(version):
            log.warning("the lease of %s was taken over while this job released it: left to its "
                        "new holder", self.url)
