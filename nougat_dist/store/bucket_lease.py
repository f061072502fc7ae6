"""The single-writer lease of a `--output s3://…` / `gs://…` prefix (see `nougat_dist.store.bucket`).

The bucket lease (``lease.json`` under the prefix) is created only if absent (as new chunks are),
renewed by rank 0 every `lease.HEARTBEAT_S`, and taken over when it names the same job or its
heartbeat is older than `lease.STALE_AFTER_S`. Every replacement or removal of the lease object (a
takeover, a renewal, the release) is conditional on the version that was read: S3 ``If-Match:
<ETag>``, GCS ``ifGenerationMatch=<generation>``. Two jobs that find the same stale lease both try
to replace that version; the store accepts one write and answers the other with 412, so exactly one
takes over and the other re-reads, finds a live lease and is refused. A renewal whose condition
fails (another job replaced the lease) stops this job (SIGTERM to itself: commit, push, exit 75).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import threading
import time
import uuid
from dataclasses import asdict
from typing import TYPE_CHECKING

from nougat_dist.inputs import objstore
from nougat_dist.store import lease as store_lease
from nougat_dist.store.layout import LEASE_FILE

if TYPE_CHECKING:
    from nougat_dist.store.bucket import BucketSync

log = logging.getLogger(__name__)


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
