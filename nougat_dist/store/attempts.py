"""Attempts of one job (requeues, torchrun restarts, manual resumes) and the end-of-job handshake.

A job may run in many attempts. Each rank records its part of an attempt in
OUTPUT/attempts/<attempt>.r<rank>.json when it starts (host, device, start time, the sequence
number its next chunk gets) and again when it exits (end, exit reason). A rank killed outright
writes no end; its pages and end are then read from the chunks it committed (their names carry
the rank and a sequence number that continues across attempts). At the end of the job rank 0
turns the records into `stats.json["attempts"]` and totals.

The handshake: on a shared file system a directory listing on one node can miss files renamed
into place on another node moments earlier (NFS caches directory contents), so rank 0 waits until
it sees every chunk the ranks say they committed before it trusts `pages/`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq

from nougat_dist.errors import SetupError
from nougat_dist.store.chunks import PAGES_DIR, atomic_write_text, chunk_seq

log = logging.getLogger(__name__)

ATTEMPTS_DIR = "attempts"
_current: str | None = None
#: This process's record, begun but not written until the job holds the output's lease.
_pending: "AttemptRecord | None" = None
EXIT_REASONS = {0: "complete", 75: "stopped", 2: "setup error"}


def attempt_id(env: dict[str, str] | None = None) -> str:
    """A name every rank of one attempt derives alike from what its launchers set."""
    env = dict(os.environ if env is None else env)
    parts = []
    if "SLURM_JOB_ID" in env:
        parts.append(f"slurm{env['SLURM_JOB_ID']}.{env.get('SLURM_RESTART_COUNT', '0')}")
    if "TORCHELASTIC_RUN_ID" in env:
        parts.append(f"{env['TORCHELASTIC_RUN_ID']}.{env.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    if not parts:  # one process without a launcher: nobody else shares the attempt
        parts.append(f"local-{platform.node()}-{os.getpid()}")
    return "-".join(p.replace("/", "_") for p in parts)


def _seqs(out_dir: Path, rank: int) -> list[tuple[int, Path]]:
    """(sequence number, path) of rank's committed chunks, names with or without a run part."""
    out = []
    for p in (out_dir / PAGES_DIR).glob(f"part-r{rank:05d}-*.parquet"):
        seq = chunk_seq(p.name, rank)
        if seq is not None:
            out.append((seq, p))
    return out


def _next_seq(out_dir: Path, rank: int) -> int:
    return max((seq for seq, _ in _seqs(out_dir, rank)), default=-1) + 1


class AttemptRecord:
    """This rank's record of the current attempt: `begin()` at start, `end(code)` at exit."""

    def __init__(self, out_dir: Path, rank: int, world_size: int, device: str) -> None:
        self.dir = out_dir / ATTEMPTS_DIR
        self.key = attempt_id()
        # The same launcher id again (a manual resume with the same --rdzv-id): a new attempt.
        n, base = 1, self.key
        while (self.dir / f"{self.key}.r{rank}.json").exists():
            self.key, n = f"{base}~{n}", n + 1
        self.path = self.dir / f"{self.key}.r{rank}.json"
        self.out_dir, self.rank = out_dir, rank
        self.written = False
        self.data: dict[str, Any] = {
            "attempt": self.key, "rank": rank, "world_size": world_size, "host": platform.node(),
            "device": device, "pid": os.getpid(), "start": time.time(),
            "start_seq": None, "end": None, "exit": None, "run_id": None}

    def begin(self) -> bool:
        """Write the start record; False if the output dir is not writable (the job's own
        check then reports it with a message that says what to do)."""
        global _current
        self.data["start_seq"] = _next_seq(self.out_dir, self.rank)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json.dumps(self.data) + "\n", self.path)
        except OSError as e:
            log.debug("no attempt record: %s", e)
            return False
        self.written = True
        _current = self.key
        return True

    def end(self, code: int | None, reason: str | None = None) -> None:
        """Record the exit (code None: an exception, named by `reason`); nothing when the start
        was never written (the job stopped before it held the lease)."""
        if not self.written:
            return
        self.data["end"] = time.time()
        self.data["exit"] = reason or EXIT_REASONS.get(code, f"exit code {code}")
        try:
            atomic_write_text(json.dumps(self.data) + "\n", self.path)
        except OSError as e:  # the output dir may be what failed; the exit code still tells
            log.warning("could not record the end of attempt %s: %s", self.key, e)


def begin_when_leased(record: AttemptRecord) -> None:
    """Begin `record` at `start()`, once the job holds the output's lease: a job refused by the
    lease (or stopped by a setup error before it) leaves nothing in the output dir."""
    global _pending
    _pending = record


def start(run_id: str | None = None) -> None:
    """Begin the record of `begin_when_leased`, if any: every rank calls it once rank 0 holds
    the output's lease. run_id: the run this attempt is (see provenance.new_run_id)."""
    global _pending
    record, _pending = _pending, None
    if record is not None:
        record.data["run_id"] = run_id
        record.begin()


def commit_after_failure(writer: Any) -> None:
    """Commit the finished units of a rank whose work loop failed (a collective broke because a
    peer died, say): each unit is complete, so keeping it is as safe as on a normal commit."""
    try:
        path = writer.commit()
    except (OSError, SetupError) as e:  # SetupError: no space (store.chunks)
        log.error("could not commit the finished units after the failure: %s", e)
        return
    log.error("the work loop failed%s; run the same command again to resume",
              f": committed {path.name} with the units this rank finished first" if path else "")


def current_attempt() -> str | None:
    """The attempt this process began (None before `AttemptRecord.begin`)."""
    return _current


def _read_records(out_dir: Path) -> list[dict[str, Any]]:
    records = []
    for p in sorted((out_dir / ATTEMPTS_DIR).glob("*.r*.json")):
        try:
            records.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping unreadable attempt record %s: %s", p.name, e)
    return records


def _rank_chunks(out_dir: Path, rank: int, first: int, stop: float) -> list[Path]:
    return [p for seq, p in _seqs(out_dir, rank) if first <= seq < stop]


def summarize(out_dir: Path, current: str) -> dict[str, Any]:
    """Every attempt (start, end, pages, ranks, hosts, exit) and totals, for stats.json.

    `current` is the attempt finishing the job now: its ranks have not written their end yet.
    Pages count rows of the chunks an attempt committed that are still in pages/ (duplicates of
    raced steals are removed before), so the attempts' pages add up to the job's pages."""
    records = sorted(_read_records(out_dir), key=lambda r: r["start"])
    now = time.time()
    by_rank: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_rank.setdefault(r["rank"], []).append(r)
    for rank_records in by_rank.values():  # a rank's chunk numbers continue across attempts
        for r, nxt in zip(rank_records, rank_records[1:] + [None]):
            stop = nxt["start_seq"] if nxt else float("inf")
            chunks = _rank_chunks(out_dir, r["rank"], r["start_seq"], stop)
            r["_pages"] = sum(pq.read_metadata(p).num_rows for p in chunks)
            if r["attempt"] == current:
                r["end"], r["exit"] = now, "complete"
            elif r["end"] is None:
                r["end"] = max((p.stat().st_mtime for p in chunks), default=r["start"])
                r["exit"] = "killed (no exit recorded)"
    attempts: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        attempts.setdefault(r["attempt"], []).append(r)
    rows = [_attempt_row(key, rs) for key, rs in attempts.items()]
    rows.sort(key=lambda a: a.pop("start_ts"))
    return {
        "attempts": rows,
        "attempts_total": {
            "attempts": len(rows), "restarts": max(len(rows) - 1, 0),
            "wall_s": round(sum(a["wall_s"] for a in rows), 3),
            "rank_hours": round(sum(a["wall_s"] * a["ranks"] for a in rows) / 3600, 6),
            "gpu_hours": round(sum(a["wall_s"] * a["gpu_ranks"] for a in rows) / 3600, 6),
            "pages": sum(a["pages"] for a in rows),
        },
    }


def _attempt_row(key: str, rs: list[dict[str, Any]]) -> dict[str, Any]:
    start, end = min(r["start"] for r in rs), max(r["end"] for r in rs)
    exits = sorted({r["exit"] for r in rs})
    return {
        "attempt": key, "run_id": rs[0].get("run_id"),  # None: recorded before run ids
        "start": _iso(start), "end": _iso(end), "wall_s": round(end - start, 3),
        "pages": sum(r["_pages"] for r in rs), "ranks": len(rs),
        "world_size": max(r["world_size"] for r in rs),
        "gpu_ranks": sum(1 for r in rs if str(r["device"]).startswith("cuda")),
        "hosts": sorted({r["host"] for r in rs}),
        # one word when every rank agrees; else each distinct reason (a rank killed, others stopped)
        "exit": exits[0] if len(exits) == 1 else "; ".join(exits),
        "start_ts": start,
    }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def wait_for_chunks(out_dir: Path, names: Iterable[str], timeout_s: float = 300.0,
                    poll_s: float = 0.5) -> float:
    """Block until every named chunk is visible in pages/; returns seconds waited.

    Raises SetupError naming the chunks still missing: finalizing without them would write an
    incomplete documents/ and stats.json that claims completeness."""
    pages = out_dir / PAGES_DIR
    missing = set(names)
    t0 = time.monotonic()
    while True:
        # A fresh listing, then a lookup by name: either can be what an NFS client refreshes.
        listed = set(os.listdir(pages)) if pages.is_dir() else set()
        missing = {n for n in missing if n not in listed and not (pages / n).exists()}
        waited = time.monotonic() - t0
        if not missing:
            if waited >= poll_s:
                log.info("waited %.1f s until every committed chunk was visible", waited)
            return waited
        if waited >= timeout_s:
            raise SetupError(
                f"{len(missing)} chunk(s) the ranks committed are not visible in {pages} after "
                f"{timeout_s:.0f} s (first: {sorted(missing)[0]}); is OUTPUT on a file system all "
                "nodes share? Run the same command again to finish the job")
        time.sleep(poll_s)
