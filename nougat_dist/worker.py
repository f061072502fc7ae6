"""One rank's whole job: setup, the work loop with stealing (`Worker`), and the end."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from nougat_dist import faults
from nougat_dist.config import Config
from nougat_dist.dist import DistInfo, describe, restart_count
from nougat_dist.ocr.model import CpuThreads, model_source
from nougat_dist.ocr.pages import PageRunner, RankStats, page_row
from nougat_dist.ocr.nltk_words import _silence_nltk_download
from nougat_dist.errors import SetupError
from nougat_dist.ocr.render import (POLL_S, Batch, EncoderInput, LiveBatchSampler, PageDataset,
                                    RenderWatch, check_shm, close_loader, dead_workers,
                                    death_reason, discard_workers, is_poll_timeout, iterate,
                                    make_loader, pin_thread_alive, shm_free, shm_needed)
from nougat_dist.provenance import run_fields
from nougat_dist.sched.queue import ClaimQueue
from nougat_dist.stages import overlap
from nougat_dist.sched.plan import Plan, _build_plan, format_plan, unit_weights
from nougat_dist.sched.steal import (ST_DONE_PAGES, StatusRounds, all_finished, plan_steals,
                                     stop_requested)
from nougat_dist.store import attempts
from nougat_dist.store import finalize as gather
from nougat_dist.store import report as store_report
from nougat_dist.store.chunks import ChunkWriter, atomic_write_text
from nougat_dist.store.index import chunk_paths
from nougat_dist.store.layout import OutputDir
from nougat_dist.store.status import STATUS_EVERY_S, STATUS_FILE, write_live_status

log = logging.getLogger(__name__)

EXIT_OK = 0
#: Stopped on request (SIGTERM/SIGUSR1/SIGINT) after committing: run the same command to resume.
EXIT_STOPPED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: Render workers dying this many times in a row outside any page (so no page to blame) is a
#: broken node (memory, /dev/shm), not a bad PDF.
MAX_BLIND_RECOVERIES = 3
#: How long a failed wait for a batch looks for the render worker that is dying.
WORKER_EXIT_WAIT_S = 5.0


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


class Worker:
    """One rank's work loop: claim units, render them in DataLoader workers, run the model, commit
    chunks, and trade status with the other ranks every round (stealing, stopping, finishing).

    Everything it talks to is handed in, so tests drive it with a fake model and in-process rounds.
    """

    def __init__(self, cfg: Config, plan: Plan, *, rank: int, world_size: int,
                 load: Callable[[], Any], rounds: Any, writer: ChunkWriter, stop: Any,
                 encoder_input: EncoderInput, batch_size: int, model_id: str, dtype_name: str,
                 device: torch.device = torch.device("cpu"), cpu_cores: int | None = None,
                 bar: Any = None, is_main: bool = False) -> None:
        self.cfg, self.plan = cfg, plan
        self.rank, self.world_size = rank, world_size
        self.rounds, self.writer, self.stop, self.bar = rounds, writer, stop, bar
        self.batch_size, self.model_id, self.dtype_name = batch_size, model_id, dtype_name
        self.device, self.cpu_cores, self.is_main = device, cpu_cores, is_main
        self._load = load
        self.stats = RankStats(rank=rank)
        self.queue = ClaimQueue(plan.queues, rank, plan.units, _DocIds(plan.docs),
                                unit_weights(plan), plan.skip_set())
        self.watch = RenderWatch(cfg.num_workers)
        self.dataset = PageDataset(plan.docs, encoder_input, cfg.render_timeout, self.watch)
        self.sampler = LiveBatchSampler(self._claim, batch_size)
        self.loader = self._new_loader()
        self._it: Any = None
        self._retry: list[tuple[int, int]] = []  # claimed pages to render again, before new units
        self._blind_recoveries = 0
        self.runner: PageRunner | None = None
        self.threads: CpuThreads | None = None
        self.status: list[list[int]] = []
        self.stopped = False
        self._last_done = 0
        self._last_status_write = 0.0

    def _claim(self) -> list[tuple[int, int]] | None:
        if self._retry:
            keys, self._retry = self._retry, []
            return keys
        claim = self.queue.claim()
        if claim is None:
            return None
        self.writer.expect(claim.unit_key, claim.n_pages)
        self.stats.units += 1
        return claim.pages

    def _new_loader(self) -> torch.utils.data.DataLoader:
        return make_loader(self.dataset, self.sampler, self.cfg.num_workers,
                           self.cfg.prefetch_factor, pin_memory=self.device.type == "cuda",
                           poll_s=POLL_S)

    def _close_loader(self) -> None:
        close_loader(self.loader)

    def run(self) -> bool:
        """Work until every rank is finished or a stop is requested. Returns True if stopped."""
        with contextlib.ExitStack() as stack:
            stack.callback(self.dataset.close)
            stack.callback(self._close_loader)
            # The render workers start (fork, and render the first batches) before the model
            # loads: the pipeline is full when the model is ready, and the workers do not inherit
            # the model. No collective is in flight here: a fork copies whatever locks a
            # background thread holds.
            self._it = iterate(self.loader)
            model = self._load()
            if self.cpu_cores is not None:
                self.threads = CpuThreads(self.cpu_cores)
            self.runner = PageRunner(model, self.cfg.markdown, self.cfg.skipping, self.stats)
            self.stats.work_start = time.time()
            self.rounds.post(self._vector())
            committed_on_stop = False
            while True:
                if self.stop.requested and not committed_on_stop:
                    # Commit what is done before waiting on the other ranks: under torchrun a stop
                    # usually means a peer has died, and then the next round never completes
                    # (gloo notices a dead peer only at its timeout) and this rank is killed in
                    # the wait.
                    self.writer.commit()
                    committed_on_stop = True
                idle = self._it is None and self.queue.exhausted and not self._retry
                if idle or self.rounds.ready():
                    if self._sync_round(idle):
                        break
                    if idle and self.queue.exhausted:
                        continue  # still nothing to do: wait for the next round
                batch = self._next_batch()
                if batch is not None:
                    self._process(batch)
            self.writer.commit()
            self.stats.work_end = time.time()
        self.stats.rounds = self.rounds.rounds
        return self.stopped

    def _vector(self) -> list[int]:
        stats = self.stats
        # Throughput over the time this rank had work, render waits included: that is what
        # predicts when its queue will be done.
        active = time.time() - stats.work_start - stats.idle_s
        rate = int(1000 * stats.pages / active) if stats.pages and active > 0 else 0
        return self.queue.status(stats.pages, rate, self.stop.requested, self.batch_size,
                                 stats.failures).encode()

    def _sync_round(self, idle: bool) -> bool:
        """Apply the posted round and post the next. Returns True when the loop must end."""
        t_wait = time.monotonic()
        self.status = status = self.rounds.collect()
        if idle:
            self.stats.idle_s += time.monotonic() - t_wait
        done = sum(row[ST_DONE_PAGES] for row in status)
        if self.bar is not None:
            self.bar.update(done - self._last_done)
        self._last_done = done
        if self.is_main and time.monotonic() - self._last_status_write >= STATUS_EVERY_S:
            write_live_status(Path(self.cfg.output), self.plan, status, self.stats.work_start,
                              "running")
            self._last_status_write = time.monotonic()
        if all_finished(status):
            return True
        if stop_requested(status):
            self.stopped = True
            return True
        if self.cfg.steal and self.world_size > 1:
            steals = plan_steals(self.queue.queues, status, self.queue.weights)
            taken = self.queue.apply_steals(steals)
            if taken:
                self.stats.units_stolen += taken
                log.debug("took %d unit(s) from other ranks", taken)
        self.rounds.post(self._vector())
        return False

    def _next_batch(self) -> Batch | None:
        """The next rendered batch, or None: none ready within POLL_S (the loop gets on with
        rounds and looks again), the queue drained for now, or the workers were replaced.

        A render worker that died (a crash, or its page's timer) is found here, wherever the rank
        was when it happened; waiting here never lasts longer than POLL_S, so a slow or hung
        page never holds up a status round."""
        if self._it is None:
            self._it = iterate(self.loader)
        try:
            batch = next(self._it, None)
        except (RuntimeError, OSError, EOFError) as e:
            if isinstance(e, RuntimeError) and is_poll_timeout(e):
                if pin_thread_alive(self._it):
                    return None
                # On CUDA the pin-memory thread fetches the batches; it ends on the same
                # connection error, after which the wait would only ever time out.
                e = RuntimeError("the DataLoader's pin-memory thread ended unexpectedly")
            # A batch's tensors come through the sending worker (their file descriptors are
            # fetched from it), so a worker dying just then surfaces as a connection error,
            # sometimes before the worker is seen dead: give it a moment to be reaped.
            dead = dead_workers(self._it, wait_s=WORKER_EXIT_WAIT_S)
            if not dead:
                raise e
            self._recover_render(dead)
            return None
        if batch is None:
            self._it = None
        else:
            self._blind_recoveries = 0
        return batch

    def _recover_render(self, dead: list[tuple[int, int | None]]) -> None:
        """Replace the render workers after some died; the page a dead worker was on becomes a
        render_error row, every other claimed page is rendered again by the new workers."""
        guilty = {}
        for worker_id, exitcode in dead:
            key = self.watch.current(worker_id)
            if key is not None:
                guilty[key] = death_reason(key[1], exitcode, self.cfg.render_timeout)
        pending = self.queue.in_flight()
        log.warning("render worker(s) %s died (exit codes %s) on page(s) %s; rendering the other "
                    "%d claimed page(s) again", [w for w, _ in dead], [c for _, c in dead],
                    [f"{self.plan.docs[d].source}:{p}" for d, p in guilty] or "none",
                    len(set(pending) - set(guilty)))
        discard_workers(self._it)
        self._it = None
        self._blind_recoveries = 0 if guilty else self._blind_recoveries + 1
        if self._blind_recoveries >= MAX_BLIND_RECOVERIES:
            raise SetupError(
                f"render workers died {self._blind_recoveries} times in a row between pages "
                f"(exit codes {[c for _, c in dead]}), so no PDF is to blame: check this "
                "node's memory (the kernel log names processes the OOM killer ended) and "
                "/dev/shm, or lower --num-workers / --prefetch-factor / --batch-size")
        self.dataset.failed.update(guilty)
        self._retry = pending
        self.watch.reset()
        self.loader = self._new_loader()
        self.stats.render_recoveries += 1

    def _process(self, batch: Batch) -> None:
        """Run the model on a batch's rendered pages and hand every page's row to the writer."""
        assert self.runner is not None
        t0 = time.monotonic()
        results = {}
        if batch.images is not None:
            imgs = batch.images.to(self.device, non_blocking=True)
            pages = [batch.keys[i][1] for i in batch.ok_index]
            results = dict(zip(batch.ok_index, self.runner.infer(imgs, pages)))
        per_page_ms = (time.monotonic() - t0) * 1000 / max(len(batch.ok_index), 1)
        if self.threads is not None and batch.ok_index:
            render_ms = sum(batch.render_ms[i] for i in batch.ok_index) / len(batch.ok_index)
            self.threads.observe(render_ms, per_page_ms)
        stats = self.stats
        for i, key in enumerate(batch.keys):
            d, page = key
            result = results.get(i)
            model_ms = per_page_ms if result is not None else 0.0
            row = page_row(self.plan.docs[d], page, rank=self.rank, model_id=self.model_id,
                           dtype=self.dtype_name, result=result, error=batch.errors.get(i),
                           elapsed_ms=batch.render_ms[i] + model_ms, run_id=self.plan.run_id)
            if row["status"] != "ok":
                stats.failures[row["status"]] = stats.failures.get(row["status"], 0) + 1
            self.writer.add(self.queue.finish(key), row)
        stats.pages += len(batch.keys)
        stats.busy_s += time.monotonic() - t0
        self.writer.maybe_commit()


class _DocIds(Sequence[str]):
    """doc_id by document index, read lazily (the plan's documents may be a DocTable)."""

    def __init__(self, docs: Sequence[Any]) -> None:
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i):  # type: ignore[override]
        return self.docs[i].doc_id


def run(cfg: Config, info: DistInfo, plan_only: bool = False) -> int:
    """Run this rank's part of the job. Returns the process exit code."""
    t_start = time.monotonic()
    faults.configure(info.rank)
    plan = _build_plan(cfg, info, plan_only)
    if plan_only:
        if info.is_main:
            print(format_plan(plan, info.world_size, cfg.plan_pages_per_s))
        return EXIT_OK
    if not plan.nltk_ok:
        _silence_nltk_download()

    source = model_source(plan.checkpoint, cfg.full_precision)
    input_size, align = source.input_size, source.align_long_axis
    model_id, dtype_name = source.model_id, source.dtype
    load: Callable[[], Any] = lambda: source.load(info.rank, info.device)

    batch_size = cfg.batch_size or _auto_batch_size(info.device)
    log.info("%s; dtype %s, batch size %d, %d render worker(s) x prefetch %d, checkpoint %s",
             describe(info), dtype_name, batch_size, cfg.num_workers, cfg.prefetch_factor, model_id)
    check_shm(shm_needed(input_size, batch_size, cfg.num_workers, cfg.prefetch_factor,
                         info.local_world_size), shm_free(), cfg.num_workers, cfg.prefetch_factor)
    cpu_cores = None
    if (info.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and source.cpu_threads
            and cfg.num_workers > 0):
        # The render workers share the cores with the model; CpuThreads divides them from the
        # first batches' costs. An explicit OMP_NUM_THREADS (torchrun sets 1) is left alone.
        cpu_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    writer = ChunkWriter(Path(cfg.output), info.rank, cfg.commit_pages, cfg.commit_seconds)
    stop = StopFlag()
    with contextlib.ExitStack() as stack:
        bar = _progress_bar(info, plan)
        if bar is not None:
            stack.callback(bar.close)
        stop.install()
        stack.callback(stop.uninstall)
        post = overlap.start(cfg, info.is_main)  # --overlap-post: stopped before finalize
        if post is not None:
            stack.callback(post.stop)
        worker = Worker(cfg, plan, rank=info.rank, world_size=info.world_size, load=load,
                        rounds=StatusRounds(info.world_size, info.control_group, info.comm_device),
                        writer=writer, stop=stop, encoder_input=EncoderInput(input_size, align),
                        batch_size=batch_size, model_id=model_id, dtype_name=dtype_name,
                        device=info.device, cpu_cores=cpu_cores, bar=bar, is_main=info.is_main)
        try:
            stopped = worker.run()
        except RuntimeError:
            # A collective failed: usually a peer node died. Keep what this rank finished.
            attempts.commit_after_failure(writer)
            raise
    stats = worker.stats
    stats.wall_s = time.monotonic() - t_start
    if info.is_main and worker.status:
        write_live_status(Path(cfg.output), plan, worker.status, stats.work_start,
                          "stopped" if stopped else "gathering")
    if stopped:
        log.warning("stopped on request after committing %d page(s) this run (%d unit(s) in "
                    "flight are redone on resume); run the same command again to resume",
                    writer.committed_pages, writer.pending_units)
        return EXIT_STOPPED
    return _finish(cfg, info, plan, stats, writer)


def _auto_batch_size(device: torch.device) -> int:
    if device.type == "cuda":
        # nougat's own rule: 0.3 pages per GB of GPU memory
        mem = torch.cuda.get_device_properties(device).total_memory
        return max(1, int(mem / 1024 / 1024 / 1000 * 0.3))
    return 4


def _progress_bar(info: DistInfo, plan: Plan):
    if not info.is_main:
        return None
    from tqdm import tqdm

    todo_pages = plan.total_pages - plan.committed_pages
    return tqdm(total=todo_pages, unit="page", desc="OCR", dynamic_ncols=True, smoothing=0.1,
                mininterval=1.0)


def _versions() -> dict[str, str]:
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


def _run_stats(parts: list[dict[str, Any]], world_size: int) -> dict[str, Any]:
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


def _finish(cfg: Config, info: DistInfo, plan: Plan, stats: RankStats, writer: ChunkWriter) -> int:
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
    run = _run_stats(parts, info.world_size)
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
        "versions": _versions(),
    }
    atomic_write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", OutputDir(out).stats)
    atomic_write_text(json.dumps({"state": "finished", "updated": time.time(),
                                  "pages_total": plan.total_pages, "pages_done": plan.total_pages,
                                  "pages_per_s": result["pages_per_s"], "eta_s": 0,
                                  "failures_by_status": {k: v for k, v in counts.items()
                                                         if k in gather.FAILED_STATUSES},
                                  "ranks_alive": 0, "per_rank": result["per_rank"]}, indent=2) + "\n",
                      out / STATUS_FILE)
    msg = (f"done: {final.documents} documents, {plan.total_pages} pages "
           f"({run['pages_this_run']} this run, {plan.committed_pages} resumed) in "
           f"{run['wall_s']:.1f}s → {out}")
    log.info(msg)
    overlap.after_job(cfg)  # --post: the last increment, or the stages over the whole output
    # Which inputs need a look, by name: failed pages, unreadable inputs, duplicates.
    for line in store_report.build(out).lines(out):
        log.warning(line)
    return EXIT_OK
