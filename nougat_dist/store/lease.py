"""One writer per output directory: a lease file with a heartbeat.

Two jobs writing the same `--output` would interleave chunks and finalize each other's pages, so
rank 0 takes a lease (OUTPUT/lease.json) before anything is written, and renews it while the job
runs. The lease is created with `link()`, which is atomic on local file systems and on NFS/Lustre
(where `O_EXCL` was historically unreliable and `flock` may be a no-op): the content is written
to a private temp file first, then linked to the lease name; the link fails if a lease exists.

A lease is released when the job ends. It is taken back or taken over, with a log line, when:
- it names the same job (`SLURM_JOB_ID`, else `TORCHELASTIC_RUN_ID`): a requeue or an elastic
  restart of the job that holds it;
- it was written on this host by a process that no longer exists (a crash here);
- its heartbeat is older than `STALE_AFTER_S` (the holder died elsewhere, or its node is gone).
Otherwise the job is refused (exit 2) with a message naming the holder.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from nougat_dist.errors import SetupError
from nougat_dist.store.layout import TMP_PREFIX, OutputDir

log = logging.getLogger(__name__)

#: Rank 0 rewrites the heartbeat this often.
HEARTBEAT_S = 30.0
#: A lease whose heartbeat is older than this is stale: ten missed heartbeats, so a slow shared
#: file system or a paused process does not lose its lease, and a dead job blocks for 5 minutes.
STALE_AFTER_S = 300.0


def job_id_from_env(env: dict[str, str] | None = None) -> str:
    """The id of the job across its restarts ("" when run without a launcher)."""
    env = dict(os.environ if env is None else env)
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}"
    return ""


@dataclass
class Holder:
    """What a lease file says about the job that holds it."""

    host: str
    pid: int
    job_id: str
    token: str  # unique per acquisition: tells our lease from one that replaced it
    heartbeat: float
    started: float

    def describe(self) -> str:
        age = time.time() - self.heartbeat
        job = self.job_id or "no job id"
        return f"host {self.host}, pid {self.pid}, {job}, heartbeat {age:.0f}s ago"


class LeaseHeld(SetupError):
    """Another live job holds the output directory."""


def _read(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        # A lease cut short by a crash mid-write cannot name a live holder.
        log.warning("unreadable lease %s (%s): treating it as stale", path, e)
        return Holder("?", -1, "?", "?", 0.0, 0.0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _reason_to_take(holder: Holder, job_id: str, stale_after_s: float) -> str | None:
    """Why a lease may be taken (None: it belongs to a live job)."""
    if job_id and holder.job_id == job_id:
        return "the same job restarted"
    if holder.host == platform.node() and holder.pid > 0 and not _pid_alive(holder.pid):
        return "its process is gone"
    if time.time() - holder.heartbeat > stale_after_s:
        return f"its heartbeat is older than {stale_after_s:.0f}s"
    return None


class Lease:
    """The lease of this job on one output directory (rank 0 only)."""

    def __init__(self, out: OutputDir, job_id: str) -> None:
        self.path = out.lease
        now = time.time()
        self.holder = Holder(platform.node(), os.getpid(), job_id, uuid.uuid4().hex, now, now)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write_tmp(self) -> Path:
        tmp = self.path.with_name(f"{TMP_PREFIX}{self.path.name}.{self.holder.token}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(self.holder), f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _try_link(self) -> bool:
        tmp = self._write_tmp()
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self, stale_after_s: float = STALE_AFTER_S) -> None:
        """Take the lease or raise LeaseHeld naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._try_link():
                return
            holder = _read(self.path)
            if holder is None:
                continue  # released between our link and our read: try again
            reason = _reason_to_take(holder, self.holder.job_id, stale_after_s)
            if reason is None:
                raise LeaseHeld(
                    f"{self.path.parent} is being written by another job ({holder.describe()}). "
                    "Wait for it, stop it, or choose another --output. A lease whose heartbeat is "
                    f"older than {stale_after_s:.0f}s is taken over automatically.")
            if self._take_over(holder):
                log.warning("took over the lease of %s: %s (%s)", self.path.parent,
                            reason, holder.describe())
                return
        raise LeaseHeld(f"could not take the lease {self.path}: other jobs keep replacing it")

    def _take_over(self, seen: Holder) -> bool:
        """Replace the lease `seen` with ours, unless someone replaced it first."""
        aside = self.path.with_name(f"{TMP_PREFIX}{self.path.name}.taken.{self.holder.token}")
        try:
            os.rename(self.path, aside)  # one taker wins the rename
        except FileNotFoundError:
            return False
        moved = _read(aside)
        if moved is not None and moved.token != seen.token:
            # Not the stale lease we judged but a fresh one another taker just made: give it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._try_link()

    def renew(self) -> bool:
        """Write a new heartbeat. False (and an error log) if the lease is no longer ours."""
        current = _read(self.path)
        if current is None or current.token != self.holder.token:
            log.error("lost the lease of %s to %s: another job now writes this output",
                      self.path.parent, current.describe() if current else "nobody")
            return False
        self.holder.heartbeat = time.time()
        os.replace(self._write_tmp(), self.path)
        return True

    def start_heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        """Renew in a daemon thread until `release()`."""
        def beat() -> None:
            while not self._stop.wait(every_s):
                try:
                    if not self.renew():
                        return
                except OSError as e:
                    # A failed renewal must not kill the job: a later one may succeed, and the
                    # lease only goes stale after many missed beats.
                    log.warning("lease heartbeat failed: %s", e)
        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        current = _read(self.path)
        if current is not None and current.token == self.holder.token:
            self.path.unlink(missing_ok=True)


def acquire(out: OutputDir, job_id: str | None = None,
            stale_after_s: float = STALE_AFTER_S) -> Lease:
    """Take the lease of `out` for this job and start its heartbeat."""
    lease = Lease(out, job_id_from_env() if job_id is None else job_id)
    lease.acquire(stale_after_s)
    lease.start_heartbeat()
    return lease
