"""One rank's work loop with stealing (`Worker`), and `run`: a rank's whole job around it (the end
of the job is in job.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from nougat_dist import faults
from nougat_dist.config import Config
from nougat_dist.dist import DistInfo, describe
from nougat_dist.job import (EXIT_OK, EXIT_STOPPED, StopFlag, auto_batch_size, finish,
                             progress_bar)
from nougat_dist.ocr.model import CpuThreads, model_source
from nougat_dist.ocr.pages import PageRunner, RankStats, page_row
from nougat_dist.ocr.nltk_words import _silence_nltk_download
from nougat_dist.ocr.window import DEPTH, BatchWindow
from nougat_dist.errors import SetupError
from nougat_dist.ocr.render import (POLL_S, Batch, EncoderInput, LiveBatchSampler, PageDataset,
                                    RenderWatch, check_shm, close_loader, dead_workers,
                                    death_reason, discard_workers, is_poll_timeout, iterate,
                                    make_loader, pin_thread_alive, shm_free, shm_needed)
from nougat_dist.sched.queue import ClaimQueue, DocIds
from nougat_dist.stages import overlap
from nougat_dist.sched.plan import Plan, _build_plan, format_plan, unit_weights
from nougat_dist.sched.steal import (ST_DONE_PAGES, StatusRounds, all_finished, plan_steals,
                                     stop_requested)
from nougat_dist.store import attempts
from nougat_dist.store.chunks import ChunkWriter
from nougat_dist.store.status import STATUS_EVERY_S, write_live_status

log = logging.getLogger(__name__)

#: Render workers dying this many times in a row outside any page (so no page to blame) is a
#: broken node (memory, /dev/shm), not a bad PDF.
MAX_BLIND_RECOVERIES = 3
#: How long a failed wait for a batch looks for the render worker that is dying.
WORKER_EXIT_WAIT_S = 5.0
#: How long the length-aware window waits for a rendered batch when it already holds one.
READY_S = 0.01


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
        self.queue = ClaimQueue(plan.queues, rank, plan.units, DocIds(plan.docs),
                                unit_weights(plan), plan.skip_set())
        self.watch = RenderWatch(cfg.num_workers)
        self.dataset = PageDataset(plan.docs, encoder_input, cfg.render_timeout, self.watch)
        self.sampler = LiveBatchSampler(self._claim, batch_size)
        self.loader = self._new_loader()
        # --batching length_aware: rendered pages wait here to be grouped by predicted length.
        self.window = (BatchWindow(batch_size, pin_memory=device.type == "cuda")
                       if cfg.batching == "length_aware" else None)
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
                idle = self._drained() and not self.window
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
        # The reserve covers the claims this rank makes before its next post: one batch, and
        # whatever the window still takes in before it is full.
        room = self.window.capacity - len(self.window) if self.window is not None else 0
        return self.queue.status(stats.pages, rate, self.stop.requested, self.batch_size + room,
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

    def _drained(self) -> bool:
        """Nothing more to render for now: the loader ended and nothing is left to claim."""
        return self._it is None and self.queue.exhausted and not self._retry

    def _next_batch(self) -> Batch | None:
        """The next batch for the model, or None (the loop gets on with rounds and looks again).

        In document order it is the next rendered batch. Length-aware, the rendered batches
        that are ready go into the window until it is full, and a batch comes out of it as soon
        as it holds one: the model never waits for the sake of a better grouping, and the window
        fills when rendering runs ahead of the model, which is when grouping pays."""
        if self.window is None:
            return self._next_rendered(POLL_S)
        while not self.window.full() and not self._drained():
            short = len(self.window) < self.batch_size
            rendered = self._next_rendered(POLL_S if short else READY_S)
            if rendered is None:
                if short and self._it is not None:
                    return None  # nothing rendered within POLL_S: rounds, then look again
                break
            failed = self.window.take(rendered)
            if failed is not None:
                return failed  # nothing to decode: no reason to hold these rows back
        if self.window.ready(self._drained()):
            return self.window.pop()
        return None

    def _next_rendered(self, wait_s: float) -> Batch | None:
        """The next rendered batch, or None: none ready within `wait_s` (the loop gets on with
        rounds and looks again), the queue drained for now, or the workers were replaced.

        A render worker that died (a crash, or its page's timer) is found here, wherever the rank
        was when it happened; waiting here never lasts longer than POLL_S, so a slow or hung
        page never holds up a status round."""
        if self._it is None:
            self._it = iterate(self.loader)
        if self.cfg.num_workers > 0:
            self._it._timeout = wait_s  # DataLoader's own wait, read at each next()
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
        render_error row, every other claimed page is rendered again by the new workers (those
        waiting in the length-aware window are rendered already and stay there)."""
        guilty = {}
        for worker_id, exitcode in dead:
            key = self.watch.current(worker_id)
            if key is not None:
                guilty[key] = death_reason(key[1], exitcode, self.cfg.render_timeout)
        parked = self.window.keys() if self.window is not None else set()
        pending = [k for k in self.queue.in_flight() if k not in parked]
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

    batch_size = cfg.batch_size or auto_batch_size(info.device)
    log.info("%s; dtype %s, batch size %d, %d render worker(s) x prefetch %d, batches %s, "
             "checkpoint %s", describe(info), dtype_name, batch_size, cfg.num_workers,
             cfg.prefetch_factor, _batching_line(cfg, batch_size), model_id)
    check_shm(shm_needed(input_size, batch_size, cfg.num_workers, cfg.prefetch_factor,
                         info.local_world_size), shm_free(), cfg.num_workers, cfg.prefetch_factor)
    cpu_cores = _cpu_cores(cfg, info) if source.cpu_threads else None
    writer = ChunkWriter(Path(cfg.output), info.rank, cfg.commit_pages, cfg.commit_seconds)
    stop = StopFlag()
    with contextlib.ExitStack() as stack:
        bar = progress_bar(info, plan)
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
    worker.stats.wall_s = time.monotonic() - t_start
    if info.is_main and worker.status:
        write_live_status(Path(cfg.output), plan, worker.status, worker.stats.work_start,
                          "stopped" if stopped else "gathering")
    if stopped:
        log.warning("stopped on request after committing %d page(s) this run (%d unit(s) in "
                    "flight are redone on resume); run the same command again to resume",
                    writer.committed_pages, writer.pending_units)
        return EXIT_STOPPED
    return finish(cfg, info, plan, worker.stats, writer)


def _cpu_cores(cfg: Config, info: DistInfo) -> int | None:
    """Cores for CpuThreads to divide between the model and the render workers, or None."""
    if info.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ or cfg.num_workers == 0:
        # An explicit OMP_NUM_THREADS (torchrun sets 1) is left alone.
        return None
    # The render workers share the cores with the model; CpuThreads divides them from the
    # first batches' costs.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _batching_line(cfg: Config, batch_size: int) -> str:
    if cfg.batching == "length_aware":
        return f"length-aware (window of {DEPTH} x {batch_size} pages)"
    return "in document order"


