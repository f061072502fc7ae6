"""`python -m nougat_dist status OUT`: how a job is going, from its output dir alone.

Works on a running job (rank 0 rewrites status.json every few seconds), a finished one
(stats.json) and a crashed or stopped one: done/remaining/failed always come from the committed
chunks and the manifest, the only source of truth, so the numbers are right even when the live
file is stale.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nougat_dist.errors import MissingInputError
from nougat_dist.store.layout import STATUS_FILE, OutputDir  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from nougat_dist.sched.plan import Plan

STALE_AFTER_S = 60.0
STATUS_EVERY_S = 2.0


def rank_status(rank: int, pages: int, pages_per_s: float | None, failed: int) -> dict[str, Any]:
    """One rank's entry of status.json's per_rank (the same shape live and finished)."""
    return {"rank": rank, "pages": pages, "pages_per_s": pages_per_s, "failed": failed}


def _write_status(out: Path, *, state: str, pages_total: int, pages_done: int,
                  pages_per_s: float | None, eta_s: float | None, failures: dict[str, int],
                  ranks_alive: int, per_rank: list[dict[str, Any]]) -> None:
    """status.json, the one place its fields are named (read back by `collect`)."""
    from nougat_dist.store.chunks import atomic_write_text

    body = {
        "state": state,
        "updated": time.time(),
        "pages_total": pages_total,
        "pages_done": pages_done,
        "pages_per_s": pages_per_s,
        "eta_s": eta_s,
        "failures_by_status": {k: v for k, v in failures.items() if v},
        "ranks_alive": ranks_alive,
        "per_rank": per_rank,
    }
    atomic_write_text(json.dumps(body, indent=2) + "\n", OutputDir(out).status)


def write_live_status(out: Path, plan: "Plan", status: list[list[int]], work_start: float,
                      state: str) -> None:
    """Rank 0's view of the job from the last status round, for `python -m nougat_dist status`."""
    from nougat_dist.sched.steal import FAILURE_FIELDS, ST_DONE_PAGES, ST_RATE_MILLI

    done = sum(row[ST_DONE_PAGES] for row in status)
    elapsed = max(time.time() - work_start, 1e-9)
    todo = plan.total_pages - plan.committed_pages
    rate = done / elapsed
    _write_status(
        out, state=state, pages_total=plan.total_pages, pages_done=plan.committed_pages + done,
        pages_per_s=round(rate, 3), eta_s=round((todo - done) / rate, 1) if rate > 0 else None,
        failures={name: sum(row[i] for row in status) for name, i in FAILURE_FIELDS.items()},
        ranks_alive=len(status),
        per_rank=[rank_status(r, row[ST_DONE_PAGES], round(row[ST_RATE_MILLI] / 1000, 3),
                              sum(row[i] for i in FAILURE_FIELDS.values()))
                  for r, row in enumerate(status)])


def write_final_status(out: Path, plan: "Plan", pages_by_status: dict[str, int],
                       run: dict[str, Any]) -> None:
    """status.json of a finished job: every page done, no rank alive; per_rank from this run's
    figures (`job.run_stats`, the per_rank of stats.json) in status.json's own shape."""
    from nougat_dist.store.finalize import FAILED_STATUSES

    _write_status(
        out, state="finished", pages_total=plan.total_pages, pages_done=plan.total_pages,
        pages_per_s=run["pages_per_s"], eta_s=0,
        failures={k: v for k, v in pages_by_status.items() if k in FAILED_STATUSES},
        ranks_alive=0,
        per_rank=[rank_status(p["rank"], p["pages"], p["pages_per_s"], sum(p["failures"].values()))
                  for p in run["per_rank"]])



def add_status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="The job's output directory (its --output).")
    p.add_argument("--watch", nargs="?", type=float, const=5.0, default=None, metavar="SECONDS",
                   help="Refresh every SECONDS (default 5) until the job finishes; Ctrl-C to leave.")
    p.add_argument("--json", action="store_true", help="Print the numbers as JSON instead of a table.")


def collect(out: Path) -> dict[str, Any]:
    """Done / remaining / failed pages and the job's state."""
    from nougat_dist.store.finalize import FAILED_STATUSES, status_counts
    from nougat_dist.store.index import committed_units
    from nougat_dist.store.manifest import load, make_units, unique_docs

    entries = load(out)
    if entries is None:
        raise MissingInputError(f"{out} has no manifest.parquet: not a nougat-dist output dir, "
                                "or the job has not got past building its manifest")
    docs = unique_docs(entries)
    total = int(make_units(docs, 1).n_pages.sum())  # unit size does not change page counts
    statuses: Counter[str] = Counter(status_counts(out))  # one chunk's column at a time
    done = sum(statuses.values())
    live: dict[str, Any] = {}
    layout = OutputDir(out)
    if layout.status.exists():
        live = json.loads(layout.status.read_text())
    state = live.get("state", "not started" if done == 0 else "interrupted (no live status)")
    age = time.time() - live["updated"] if "updated" in live else None
    if layout.stats.exists() and json.loads(layout.stats.read_text()).get("complete"):
        state = "finished"
    elif state == "running" and age is not None and age > STALE_AFTER_S:
        state = f"not updated for {age:.0f}s: crashed or stalled (run the same command to resume)"
    return {
        "output": str(out), "state": state, "documents": len(docs), "pages_total": total,
        "pages_done": done, "pages_remaining": max(total - done, 0),
        "pages_failed": sum(n for s, n in statuses.items() if s in FAILED_STATUSES),
        "by_status": dict(sorted(statuses.items())), "units_committed": len(committed_units(out)),
        # status.json is up to a few seconds older than the chunks: never report fewer pages
        # processed than are already committed.
        "pages_processed_live": (max(live.get("pages_done") or 0, done) if state == "running"
                                 else None),
        "pages_per_s": live.get("pages_per_s"), "eta_s": live.get("eta_s") if state == "running" else None,
        "per_rank": live.get("per_rank", []),
        "decode": _decode(out),
    }


def _decode(out: Path) -> dict[str, Any]:
    """Decode-step efficiency of the committed pages (store/finalize.decode_efficiency)."""
    from nougat_dist.store.finalize import decode_efficiency

    return decode_efficiency(out)


def render(info: dict[str, Any]) -> str:
    pct = 100 * info["pages_done"] / info["pages_total"] if info["pages_total"] else 100.0
    eta = info["eta_s"]
    lines = [
        f"{info['output']}: {info['state']}",
        f"  pages      {info['pages_done']} / {info['pages_total']} committed ({pct:.1f}%), "
        f"{info['pages_remaining']} remaining, {info['pages_failed']} failed"
        + (f"; {info['pages_processed_live']} processed (commits follow --commit-pages/-seconds)"
           if info.get("pages_processed_live") is not None else ""),
        "  by status  " + (", ".join(f"{k} {v}" for k, v in info["by_status"].items()) or "-"),
        f"  documents  {info['documents']}, units committed {info['units_committed']}",
    ]
    if info["pages_per_s"] is not None:
        lines.append(f"  speed      {info['pages_per_s']} pages/s"
                     + (f", ETA {eta / 60:.1f} min" if eta else ""))
    decode = info.get("decode") or {}
    if decode.get("efficiency") is not None:
        lines.append(f"  decode     efficiency {decode['efficiency']:.3f} ({decode['page_tokens']} "
                     f"page tokens / {decode['batch_slots']} batch slots)")
    if info["per_rank"]:
        lines.append("  rank   pages   pages/s  failed")
        for r in info["per_rank"]:
            # "failures" by status: a finished job's status.json as earlier versions wrote it
            failed = r.get("failed", sum(r.get("failures", {}).values()))
            lines.append(f"  {r['rank']:>4} {r['pages']:>7} {r.get('pages_per_s') or 0:>9} {failed:>7}")
    return "\n".join(lines)


def run_status(args: argparse.Namespace) -> int:
    out = Path(args.output)
    while True:
        info = collect(out)
        text = json.dumps(info, indent=2) if args.json else render(info)
        if args.watch is None:
            print(text)
            return 0
        print("\033[2J\033[H" + text, flush=True)
        if info["state"] == "finished":
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0
