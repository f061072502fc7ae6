"""Where a result came from: the installed nougat-dist version and, when it runs from a git
checkout, the commit (with a `+dirty` mark when the tracked files differ from it); the run that
made each page (a run id per launch of the job, agreed by every rank) and when."""

from __future__ import annotations

import importlib.metadata as md
import logging
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow.parquet as pq

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent


def git_commit(where: Path = _PACKAGE_DIR) -> str | None:
    """The commit of the checkout holding `where`, or None (an installed wheel, no git)."""
    try:
        top = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if top.returncode != 0:
            return None
        root, sha = top.stdout.split()
        if Path(root).resolve() != where.parent:
            return None  # a wheel installed inside some other repository's tree
        dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "nougat_dist"],
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return sha + ("+dirty" if dirty else "")


def tool_provenance() -> dict[str, str | None]:
    """{'nougat-dist': version, 'nougat-dist-commit': sha or None} for stats.json."""
    try:
        version: str | None = md.version("nougat-dist")
    except md.PackageNotFoundError:
        version = None  # run from a clone that was never pip-installed
    return {"nougat-dist": version, "nougat-dist-commit": git_commit()}


def iso_utc(ts: float) -> str:
    """An epoch time as ISO 8601 UTC, to the second: `2026-12-04T17:47:18Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def new_run_id(now: float | None = None) -> str:
    """A name for one launch of a job (a resume is a new run): its UTC start time, which sorts
    runs in order, and 6 random hex digits, which keep two launches in the same second apart.
    Rank 0 makes it; the other ranks receive it with the plan."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(3)}"


def pages_by_run(paths: Iterable[Path]) -> dict[str | None, dict[str, Any]]:
    """Committed pages per run id, with the first and last page's OCR time, read from the
    chunks' two provenance columns. Chunks written before runs were recorded lack them: their
    pages count under None."""
    runs: dict[str | None, dict[str, Any]] = {}
    for p in paths:
        names = pq.read_schema(p).names
        if "run_id" not in names:
            entry = runs.setdefault(None, {"pages": 0, "first_page_at": None, "last_page_at": None})
            entry["pages"] += pq.read_metadata(p).num_rows
            continue
        table = pq.read_table(p, columns=["run_id", "ocr_at"])
        grouped = table.group_by("run_id").aggregate(
            [([], "count_all"), ("ocr_at", "min"), ("ocr_at", "max")])
        for row in grouped.to_pylist():
            entry = runs.setdefault(row["run_id"], {"pages": 0, "first_page_at": None,
                                                    "last_page_at": None})
            entry["pages"] += row["count_all"]
            for key, agg, pick in (("first_page_at", "ocr_at_min", min),
                                   ("last_page_at", "ocr_at_max", max)):
                if row[agg] is not None:
                    ts = row[agg].timestamp()
                    entry[key] = ts if entry[key] is None else pick(entry[key], ts)
    return runs


def run_fields(paths: Iterable[Path], run_id: str, started_at: float,
               attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """stats.json's provenance of a finished job: this run's id, start and end (ISO 8601 UTC),
    and `runs`, every run whose pages are in the output, oldest first (a resumed job lists each
    launch that committed pages; `run_id` null counts pages written by a release that did not
    record runs). Start, end and exit of a run come from its attempt record when there is one."""
    finished = time.time()
    by_attempt = {a.get("run_id"): a for a in attempts if a.get("run_id")}
    history = []
    for rid, entry in pages_by_run(paths).items():
        att = by_attempt.get(rid, {})
        first, last = entry["first_page_at"], entry["last_page_at"]
        history.append({
            "run_id": rid,
            "started_at": att.get("start") or (iso_utc(first) if first is not None else None),
            "finished_at": (iso_utc(finished) if rid == run_id else
                            att.get("end") or (iso_utc(last) if last is not None else None)),
            "pages": entry["pages"],
            "exit": "complete" if rid == run_id else att.get("exit"),
        })
    history.sort(key=lambda r: (r["run_id"] is not None, r["started_at"] or "", r["run_id"] or ""))
    return {"run_id": run_id, "started_at": iso_utc(started_at), "finished_at": iso_utc(finished),
            "runs": history}
