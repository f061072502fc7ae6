"""What a rank's job is around its work loop: stop signals, exit codes, the progress bar, and the
end of the job (gather every rank's figures, finalize, stats.json)."""

from __future__ import annotations

import json
import logging
import platform
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nougat_dist.config import Config
from nougat_dist.dist import DistInfo, restart_count
from nougat_dist.ocr.pages import RankStats
from nougat_dist.provenance import run_fields
from nougat_dist.sched.plan import Plan
from nougat_dist.stages import overlap
from nougat_dist.store import attempts
from nougat_dist.store import finalize as gather
from nougat_dist.store import report as store_report
from nougat_dist.store.chunks import ChunkWriter, atomic_write_text
from nougat_dist.store.index import chunk_paths
from nougat_dist.store.layout import OutputDir
from nougat_dist.store.status import write_final_status

log = logging.getLogger(__name__)

EXIT_OK = 0
#: Stopped on request (SIGTERM/SIGUSR1/SIGINT) after committing: run the same command to resume.
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    """Set by the stop signals; a second Ctrl-C while stopping exits at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            # A second Ctrl-C is a person insisting. Repeated SIGTERM/SIGUSR1 is usually the same
            # stop arriving twice (Slurm signals the whole step and torchrun forwards it again),
            # so it must not cut the commit short.
            if signum == signal.SIGINT:
                raise SystemExit(EXIT_STOPPED)
            return
        self.requested = True
        log.warning("received %s: finishing the current batch, committing, then stopping "
                    "(Ctrl-C again to stop immediately)", signal.Signals(signum).name)

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()



def auto_batch_size(device: torch.device) -> int:
    if device.type == "cuda":
        # nougat's own rule: 0.3 pages per GB of GPU memory
        mem = torch.cuda.get_device_properties(device).total_memory
        return max(1, int(mem / 1024 / 1024 / 1000 * 0.3))
    return 4


def progress_bar(info: DistInfo, plan: Plan):
    if not info.is_main:
        return None
    from tqdm import tqdm

    todo_pages = plan.total_pages - plan.committed_pages
    return tqdm(total=todo_pages, unit="page", desc="OCR", dynamic_ncols=True, smoothing=0.1,
                mininterval=1.0)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "nougat-ocr", "transformers", "pypdfium2", "pyarrow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    from nougat_dist.provenance import tool_provenance

    out.update(tool_provenance())  # type: ignore[arg-type]  (None: no git checkout or install)
    return out


def run_stats(parts: list[dict[str, Any]], world_size: int) -> dict[str, Any]:
    """This run's fields of stats.json, from every rank's RankStats (as gathered)."""
    wall = max(p["wall_s"] for p in parts)
    pages_done = sum(p["pages"] for p in parts)
    idle = sum(p["idle_s"] for p in parts)
    return {
        "pages_this_run": pages_done,
        "wall_s": round(wall, 3),
        # from the first rank starting work to the last rank finishing it (setup excluded)
        "makespan_s": round(max(p["work_end"] for p in parts) - min(p["work_start"] for p in parts), 3),
        "pages_per_s": round(pages_done / wall, 3) if wall > 0 else None,
        "idle_fraction": round(idle / (wall * world_size), 4) if wall > 0 else None,
        "busy_s": round(sum(p["busy_s"] for p in parts), 3),
        "world_size": world_size,
        "restart_count": restart_count(),
        "per_rank": [
            {"rank": p["rank"], "host": p["host"], "pages": p["pages"], "units": p["units"],
             "units_stolen": p["units_stolen"],
             "pages_per_s": round(p["pages"] / p["busy_s"], 3) if p["busy_s"] else None,
             "busy_s": round(p["busy_s"], 3), "idle_s": round(p["idle_s"], 3),
             "failures": p["failures"], "oom_retries": p["oom_retries"],
             "render_recoveries": p["render_recoveries"], "rounds": p["rounds"]}
            for p in parts
        ],
    }


def finish(cfg: Config, info: DistInfo, plan: Plan, stats: RankStats, writer: ChunkWriter) -> int:
    out = Path(cfg.output)
    mine = {**stats.__dict__, "host": platform.node(), "chunks": writer.committed}
    if info.distributed:
        parts: list[Any] = [None] * info.world_size
        dist.all_gather_object(parts, mine, group=info.control_group)
        dist.barrier(group=info.control_group)
    else:
        parts = [mine]
    if not info.is_main:
        return EXIT_OK
    attempts.wait_for_chunks(out, [name for p in parts for name in p["chunks"]])
    # The same code as `nougat-dist finalize OUT`, which redoes this step alone if it dies here.
    final = gather.finalize(out, cfg.finalize_memory, plan.entries)
    counts = final.pages_by_status
    run = run_stats(parts, info.world_size)
    history = attempts.summarize(out, attempts.current_attempt() or "")
    result = {
        "complete": True,
        "documents": final.documents,
        "finalize_s": final.wall_s,
        "pages_total": plan.total_pages,
        "pages_resumed": plan.committed_pages,
        "pages_by_status": counts,
        "failed_pages": final.failed_pages,
        "duplicate_rows_removed": final.duplicate_rows_removed,
        # Σ page tokens / Σ (batch size x batch decode steps), from the committed page rows
        "decode": gather.decode_efficiency(out),
        **run,
        **history,
        # this run's id, start and end, and every run whose pages the output holds
        **run_fields(chunk_paths(out), plan.run_id, plan.started_at, history["attempts"]),
        "config": {k: v for k, v in cfg.__dict__.items()},
        "versions": versions(),
    }
    atomic_write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", OutputDir(out).stats)
    write_final_status(out, plan, counts, run)
    msg = (f"done: {final.documents} documents, {plan.total_pages} pages "
           f"({run['pages_this_run']} this run, {plan.committed_pages} resumed) in "
           f"{run['wall_s']:.1f}s → {out}")
    log.info(msg)
    overlap.after_job(cfg)  # --post: the last increment, or the stages over the whole output
    # Which inputs need a look, by name: failed pages, unreadable inputs, duplicates.
    for line in store_report.build(out).lines(out):
        log.warning(line)
    return EXIT_OK
