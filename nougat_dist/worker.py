"""One rank's whole job: setup, manifest, assignment, the work loop with stealing, and the end."""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nougat_dist import faults
from nougat_dist.config import Config
from nougat_dist.dist import DistInfo, describe, restart_count
from nougat_dist.ocr.model import (CpuThreads, FakeModel, checkpoint_name, encoder_input_spec,
                                   is_oom, load_model, page_results)
from nougat_dist.ocr.nltk_words import _silence_nltk_download
from nougat_dist.ocr.render import (Batch, EncoderInput, LiveBatchSampler, PageDataset, check_shm,
                                    close_loader, collate, discard_workers, make_loader,
                                    render_isolated, shm_free, shm_needed)
from nougat_dist.sched.plan import Plan, _build_plan, format_plan, unit_weights
from nougat_dist.sched.steal import (FAILURE_FIELDS, ST_DONE_PAGES, StatusRounds, all_finished,
                                     apply_steals, plan_steals, stop_requested)
from nougat_dist.store import attempts
from nougat_dist.store import finalize as gather
from nougat_dist.store import index as committed_index
from nougat_dist.store.chunks import ChunkWriter, atomic_write_text
from nougat_dist.store.layout import OutputDir
from nougat_dist.store.status import STATUS_EVERY_S, STATUS_FILE, write_live_status

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


@dataclass
class RankStats:
    rank: int
    pages: int = 0
    units: int = 0
    units_stolen: int = 0
    busy_s: float = 0.0
    idle_s: float = 0.0
    wall_s: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    oom_retries: int = 0
    render_recoveries: int = 0
    rounds: int = 0
    work_start: float = 0.0  # epoch seconds: comparable across ranks, unlike monotonic clocks
    work_end: float = 0.0


class PageRunner:
    """Inference on one batch with OOM back-off: halve the batch and retry the pieces."""

    def __init__(self, model: Any, cfg: Config, stats: RankStats) -> None:
        self.model = model
        self.cfg = cfg
        self.stats = stats
        tok = getattr(getattr(model, "decoder", None), "tokenizer", None)
        self.pad_token_id = getattr(tok, "pad_token_id", None)

    def infer(self, images: torch.Tensor, pages: list[int]) -> list:
        try:
            with torch.inference_mode():
                out = self.model.inference(image_tensors=images, early_stopping=self.cfg.skipping)
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not is_oom(e) or len(images) == 1:
                raise
            self.stats.oom_retries += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            half = len(images) // 2
            log.warning("out of memory on a batch of %d pages: retrying as %d + %d",
                        len(images), half, len(images) - half)
            return self.infer(images[:half], pages[:half]) + self.infer(images[half:], pages[half:])
        return page_results(out, pages, markdown=self.cfg.markdown, skipping=self.cfg.skipping,
                            pad_token_id=self.pad_token_id)


def run(cfg: Config, info: DistInfo, plan_only: bool = False) -> int:
    """Run this rank's part of the job. Returns the process exit code."""
    t_start = time.monotonic()
    out = Path(cfg.output)
    faults.configure(info.rank)
    plan = _build_plan(cfg, info, plan_only)
    if plan_only:
        if info.is_main:
            print(format_plan(plan, info.world_size, cfg.plan_pages_per_s))
        return EXIT_OK
    if not plan.nltk_ok:
        _silence_nltk_download()

    fake = cfg.test_fake_model is not None
    if fake:
        input_size, align = [448, 224], False
        model_id, dtype_name = "fake", "none"
    else:
        ckpt = Path(plan.checkpoint)
        input_size, align = encoder_input_spec(ckpt)
        model_id = checkpoint_name(ckpt)
        dtype_name = "float32" if cfg.full_precision else "bfloat16"

    batch_size = cfg.batch_size or _auto_batch_size(info.device)
    log.info("%s; dtype %s, batch size %d, %d render worker(s) x prefetch %d, checkpoint %s",
             describe(info), dtype_name, batch_size, cfg.num_workers, cfg.prefetch_factor, model_id)
    check_shm(shm_needed(input_size, batch_size, cfg.num_workers, cfg.prefetch_factor,
                         info.local_world_size), shm_free(), cfg.num_workers, cfg.prefetch_factor)
    stats = RankStats(rank=info.rank)
    writer = ChunkWriter(out, info.rank, cfg.commit_pages, cfg.commit_seconds)
    docs, units, queues = plan.docs, plan.units, plan.queues
    weight_list = unit_weights(plan)
    my_queue = queues[info.rank]
    state = {"ptr": 0, "claimed_pages": 0}
    page_unit: dict[tuple[int, int], str] = {}
    skip = plan.skip_set()

    def next_unit_pages() -> list[tuple[int, int]] | None:
        if state["ptr"] >= len(my_queue):
            return None
        u = units[my_queue[state["ptr"]]]
        state["ptr"] += 1
        key = u.key(docs[u.doc].doc_id)
        keys = [(u.doc, p) for p in u.pages()] if u.first else [(u.doc, 0)]
        if skip:  # pages of this unit an earlier run committed (another --unit-pages)
            keys = [k for k in keys if k not in skip]
        writer.expect(key, len(keys))
        state["claimed_pages"] += len(keys)
        for k in keys:
            page_unit[k] = key
        stats.units += 1
        return keys

    dataset = PageDataset(docs, EncoderInput(input_size, align))
    sampler = LiveBatchSampler(next_unit_pages, batch_size)

    def new_loader() -> torch.utils.data.DataLoader:
        return make_loader(dataset, sampler, cfg.num_workers, cfg.prefetch_factor,
                           pin_memory=info.device.type == "cuda",
                           timeout=cfg.render_timeout * batch_size)

    # The render workers start (fork, and render the first batches) before the model loads:
    # the pipeline is full when the model is ready, and the workers do not inherit the model.
    # No collective is in flight here: a fork copies whatever locks a background thread holds.
    loader = new_loader()
    it: Any = iter(loader)
    try:
        model: Any = (FakeModel(cfg.test_fake_model, info.rank) if fake
                      else load_model(ckpt, info.device, cfg.full_precision))
    except BaseException:
        discard_workers(it)
        dataset.close()
        raise
    threads = None
    if info.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and not fake:
        # The render workers share the cores with the model; CpuThreads divides them from the
        # first batches' costs. An explicit OMP_NUM_THREADS (torchrun sets 1) is left alone.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = CpuThreads(cores) if cfg.num_workers > 0 else None
    runner = PageRunner(model, cfg, stats)
    rounds = StatusRounds(info.world_size, info.control_group, info.comm_device)
    bar = _progress_bar(info, plan)

    def vector() -> list[int]:
        finished = state["ptr"] >= len(my_queue) and stats.pages == state["claimed_pages"]
        # Throughput over the time this rank had work, render waits included: that is what
        # predicts when its queue will be done.
        active = time.time() - stats.work_start - stats.idle_s
        rate = int(1000 * stats.pages / active) if stats.pages and active > 0 else 0
        # Units this rank may claim before it applies the round it is posting (about one batch:
        # a round completes when the slowest rank posts after its batch); thieves leave them
        # alone so a steal rarely races a claim, and a race that does happen only costs a
        # duplicate unit, dropped at gather.
        reserve, pages_ahead, i = 0, 0, state["ptr"]
        while i < len(my_queue) and pages_ahead < batch_size:
            pages_ahead += weight_list[my_queue[i]]
            reserve += 1
            i += 1
        inflight = state["claimed_pages"] - stats.pages
        failures = [stats.failures.get(name, 0) for name in FAILURE_FIELDS]
        return [stats.pages, state["ptr"], int(finished), rate, int(stop.requested), reserve, inflight,
                *failures]

    def process(batch: Batch) -> None:
        t0 = time.monotonic()
        results = {}
        if batch.images is not None:
            imgs = batch.images.to(info.device, non_blocking=True)
            pages = [batch.keys[i][1] for i in batch.ok_index]
            for i, r in zip(batch.ok_index, runner.infer(imgs, pages)):
                results[i] = r
        per_page_ms = (time.monotonic() - t0) * 1000 / max(len(batch.ok_index), 1)
        if threads is not None and batch.ok_index:
            threads.observe(sum(batch.render_ms[i] for i in batch.ok_index) / len(batch.ok_index),
                            per_page_ms)
        for i, (d, page) in enumerate(batch.keys):
            e = docs[d]
            row = {"doc_id": e.doc_id, "source": e.source, "member": e.member, "page": page,
                   "rank": info.rank, "model": model_id, "dtype": dtype_name}
            if i in results:
                r = results[i]
                row.update(text=r.text, status=r.status, error=None, n_tokens=r.n_tokens,
                           elapsed_ms=per_page_ms + batch.render_ms[i])
            else:
                status = "error" if page == 0 else "render_error"
                row.update(text="", status=status, error=batch.errors[i], n_tokens=None,
                           elapsed_ms=batch.render_ms[i])
            if row["status"] != "ok":
                stats.failures[row["status"]] = stats.failures.get(row["status"], 0) + 1
            writer.add(page_unit.pop((d, page)), row)
        stats.pages += len(batch.keys)
        stats.busy_s += time.monotonic() - t0
        writer.maybe_commit()

    last_done = 0
    last_status_write = 0.0
    status: list[list[int]] = []
    stopped = False
    stop = StopFlag()
    stop.install()
    stats.work_start = time.time()
    try:
        rounds.post(vector())
        committed_on_stop = False
        while True:
            if stop.requested and not committed_on_stop:
                # Commit what is done before waiting on the other ranks: under torchrun a stop
                # usually means a peer has died, and then the next round never completes (gloo
                # notices a dead peer only at its timeout) and this rank is killed in the wait.
                writer.commit()
                committed_on_stop = True
            idle = it is None and state["ptr"] >= len(my_queue)
            if idle or rounds.ready():
                t_wait = time.monotonic()
                status = rounds.collect()
                if idle:
                    stats.idle_s += time.monotonic() - t_wait
                done = sum(row[ST_DONE_PAGES] for row in status)
                if bar is not None:
                    bar.update(done - last_done)
                last_done = done
                if info.is_main and time.monotonic() - last_status_write >= STATUS_EVERY_S:
                    write_live_status(out, plan, status, stats.work_start, "running")
                    last_status_write = time.monotonic()
                if all_finished(status):
                    break
                if stop_requested(status):
                    stopped = True
                    break
                if cfg.steal and info.world_size > 1:
                    steals = plan_steals(queues, status, weight_list)
                    apply_steals(queues, steals)
                    for s in steals:
                        if s.thief == info.rank:
                            stats.units_stolen += len(s.units)
                            log.debug("took %d unit(s) from rank %d", len(s.units), s.victim)
                    state["ptr"] = min(state["ptr"], len(my_queue))
                rounds.post(vector())
                if idle and state["ptr"] >= len(my_queue):
                    continue  # still nothing to do: wait for the next round
            if it is None:
                it = iter(loader)
            try:
                batch = next(it, None)
            except RuntimeError as e:
                # A render worker died or a batch took longer than the render timeout (a hostile
                # PDF can hang or crash pdfium). Drop the workers and redo every claimed page
                # one at a time, each in a process of its own: only the guilty page is lost.
                log.warning("render workers failed (%s); isolating the %d claimed page(s)",
                            str(e).splitlines()[0], len(page_unit))
                discard_workers(it)
                it = None
                loader = new_loader()
                stats.render_recoveries += 1
                pending = sorted(page_unit)
                for i in range(0, len(pending), batch_size):
                    items = [render_isolated(dataset, k, cfg.render_timeout)
                             for k in pending[i:i + batch_size]]
                    process(collate(items))
                continue
            if batch is None:
                it = None
                continue
            process(batch)
        writer.commit()
        stats.work_end = time.time()
    except RuntimeError:
        # A collective failed: usually a peer node died. Keep what this rank finished.
        attempts.commit_after_failure(writer)
        raise
    finally:
        stop.uninstall()
        if bar is not None:
            bar.close()
        close_loader(loader)
        dataset.close()
    stats.rounds = rounds.rounds
    stats.wall_s = time.monotonic() - t_start
    if info.is_main and status:
        write_live_status(out, plan, status, stats.work_start, "stopped" if stopped else "gathering")
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
    return out


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
    removed = gather.drop_duplicate_units(out) + committed_index.drop_duplicate_pages(out)
    docs_table = gather.write_documents(out, plan.entries)
    counts = gather.status_counts(out)
    wall = max(p["wall_s"] for p in parts)
    pages_done = sum(p["pages"] for p in parts)
    busy = sum(p["busy_s"] for p in parts)
    idle = sum(p["idle_s"] for p in parts)
    failed = sum(v for k, v in counts.items() if k in gather.FAILED_STATUSES)
    result = {
        "complete": True,
        "documents": docs_table.num_rows,
        "pages_total": plan.total_pages,
        "pages_this_run": pages_done,
        "pages_resumed": plan.committed_pages,
        "pages_by_status": counts,
        "failed_pages": failed,
        "duplicate_rows_removed": removed,
        "wall_s": round(wall, 3),
        # from the first rank starting work to the last rank finishing it (setup excluded)
        "makespan_s": round(max(p["work_end"] for p in parts) - min(p["work_start"] for p in parts), 3),
        "pages_per_s": round(pages_done / wall, 3) if wall > 0 else None,
        "idle_fraction": round(idle / (wall * info.world_size), 4) if wall > 0 else None,
        "busy_s": round(busy, 3),
        "world_size": info.world_size,
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
        **attempts.summarize(out, attempts.current_attempt() or ""),
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
    msg = (f"done: {docs_table.num_rows} documents, {plan.total_pages} pages "
           f"({pages_done} this run, {plan.committed_pages} resumed) in {wall:.1f}s → {out}")
    if failed:
        msg += (f"; completed with {failed} failed page(s), see status/error columns "
                "(--retry-failed does them again)")
    log.info(msg)
    return EXIT_OK
