"""The plan: rank 0 builds or loads the manifest, decides which units are left and which rank
does what, and every other rank receives it as Arrow bytes and integer arrays."""

from __future__ import annotations

import atexit
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch.distributed as dist

from nougat_dist.config import Config
from nougat_dist.dist import DistInfo
from nougat_dist.errors import SetupError
from nougat_dist.inputs.sources import InputError, discover, prefetch
from nougat_dist.ocr.model import checkpoint_name, resolve_checkpoint
from nougat_dist.ocr.nltk_words import ensure_nltk_words
from nougat_dist.sched.steal import assign
from nougat_dist.store import index as checkpoint
from nougat_dist.store import lease as store_lease
from nougat_dist.store import manifest
from nougat_dist.store.finalize import FAILED_STATUSES, status_counts
from nougat_dist.store.layout import OutputDir
from nougat_dist.store.manifest import DocEntry, DocTable, Units

log = logging.getLogger(__name__)


def _share(info: DistInfo, obj: Any) -> Any:
    """Rank 0's object on every rank. An Exception travels too, and is raised everywhere."""
    if info.distributed:
        box = [obj if info.is_main else None]
        dist.broadcast_object_list(box, src=0, group=info.control_group)
        obj = box[0]
    if isinstance(obj, Exception):
        raise SetupError(str(obj))
    return obj


def _check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SetupError(f"cannot write to output directory {out}: {e}. Choose a writable --output.") from e


@dataclass
class Plan:
    """What rank 0 decided and every rank needs."""

    entries: Sequence[DocEntry] | None  # manifest rows, duplicates included: rank 0 only
    docs: Sequence[DocEntry]  # unique documents; a DocTable on the other ranks
    units: Units
    todo: np.ndarray  # unit indices not yet committed
    queues: list[list[int]]
    checkpoint: str
    nltk_ok: bool
    total_pages: int
    committed_pages: int = 0
    #: (doc, page) rows of `todo` units committed already (shape n×2): not to be redone.
    skip: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))

    #: committed rows with a failed status (rank 0 only): what --retry-failed would redo.
    failed_rows: int = 0

    def skip_set(self) -> set[tuple[int, int]]:
        return set(map(tuple, self.skip.tolist()))


@dataclass
class _PlanMessage:
    """The plan as rank 0 sends it: Arrow bytes and integer arrays, cheap to pickle at any size.
    Units are not sent: every rank derives the same ones from the documents."""

    docs: bytes
    todo: np.ndarray
    queue_lengths: np.ndarray
    queue_units: np.ndarray
    checkpoint: str
    nltk_ok: bool
    total_pages: int
    committed_pages: int
    skip: np.ndarray


def _todo_units(out: Path, docs: Sequence[DocEntry], units: Units) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the units with a page no committed chunk holds yet, and the (doc, page) pairs
    of those units that are committed already (after a change of --unit-pages a unit can be
    half done): the worker skips them, so no page is stored twice."""
    done = checkpoint.committed_pages(out)
    todo = np.ones(len(units), dtype=bool)
    skip: list[np.ndarray] = []
    if done:
        ends = np.append(units.start[1:], len(units))
        for d, doc_id in enumerate(manifest.doc_ids(docs)):
            pages = done.get(doc_id)
            if pages is None:
                continue
            for j in range(int(units.start[d]), int(ends[d])):
                first, last = int(units.first[j]), int(units.last[j])
                inside = pages[(pages >= first) & (pages <= last)]
                if len(inside) == units.n_pages[j]:
                    todo[j] = False
                elif len(inside):
                    skip.append(np.stack([np.full(len(inside), d), inside]).T)
    pairs = np.concatenate(skip) if skip else np.zeros((0, 2), dtype=np.int64)
    return np.flatnonzero(todo), pairs.astype(np.int64)


def run_model_id(cfg: Config, ckpt: str) -> tuple[str, str]:
    """The (model, dtype) this run writes on its rows."""
    if cfg.test_fake_model is not None:
        return "fake", "none"
    return checkpoint_name(Path(ckpt)), "float32" if cfg.full_precision else "bfloat16"


def _reconcile_committed(cfg: Config, out: Path, ckpt: str,
                         old: DocTable | None) -> DocTable | None:
    """Rank 0, under the lease: one model per output, and --retry-failed. Returns the manifest."""
    model, dtype = run_model_id(cfg, ckpt)
    others = checkpoint.committed_models(out) - {(model, dtype)}
    if others and not cfg.redo_other_model:
        named = ", ".join(f"{m} ({d})" for m, d in sorted(others))
        raise SetupError(
            f"{out} holds pages OCR'd by {named}; this run uses {model} ({dtype}). A document "
            "must not mix two models: use the same --checkpoint and precision, another --output, "
            "or --redo-other-model to do those pages again with this model.")
    if others:
        checkpoint.set_aside(out, lambda t: pc.invert(pc.and_(pc.equal(t["model"], model),
                                                              pc.equal(t["dtype"], dtype))),
                             "other-model")
    if cfg.retry_failed:
        failed = pa.array(FAILED_STATUSES)
        checkpoint.set_aside(out, lambda t: pc.is_in(t["status"], value_set=failed), "retry-failed")
        if old is not None:
            old, fixed = manifest.reinspect_unreadable(old)
            manifest.write(out, list(old))
            log.info("--retry-failed: %d unreadable document(s) now read", fixed)
    return old


def _build_plan(cfg: Config, info: DistInfo, plan_only: bool = False) -> Plan:
    out = Path(cfg.output)
    # Rank 0 decides what the job is; failures travel to every rank so nobody hangs in a barrier.
    head: Any
    if info.is_main:
        try:
            _check_output_dir(out)
            if not plan_only:
                # Before anything else is written: one job per output directory. The lease
                # goes with the process (a crash leaves it to be taken back or over).
                atexit.register(store_lease.acquire(OutputDir(out)).release)
            sources = discover(cfg.input)
            if not sources:
                raise SetupError("the inputs contain no PDF files: " + " ".join(cfg.input))
            old = manifest.load(out)
            if old is not None and not manifest.same_inputs(old, sources):
                if not cfg.rebuild_manifest:
                    raise SetupError(
                        f"{out} holds a manifest built from different inputs ({len(old)} documents "
                        f"there, {len(sources)} now). Use the same --input to resume, another "
                        "--output for a new job, or --rebuild-manifest to replace it.")
                # Rows of the old inputs must not mix into the new dataset; keep them aside.
                aside = out / f"pages.replaced-{int(time.time())}"
                if OutputDir(out).pages.is_dir():
                    OutputDir(out).pages.rename(aside)
                    log.warning("--rebuild-manifest: previous page chunks moved to %s", aside)
                old = None
            needs_model = cfg.test_fake_model is None and not plan_only
            ckpt = str(resolve_checkpoint(cfg.checkpoint, cfg.model)) if needs_model else ""
            nltk_ok = ensure_nltk_words() if needs_model else True
            checkpoint.remove_temp_files(out)
            if not plan_only:
                old = _reconcile_committed(cfg, out, ckpt, old)
            # The manifest rows stay here: the other ranks get only the unique documents, below.
            entries = old
            head = (sources if old is None else None, ckpt, nltk_ok)
        except (SetupError, InputError, OSError, RuntimeError) as e:
            head = SetupError(str(e))
    else:
        head = entries = None
    sources, ckpt, nltk_ok = _share(info, head)

    if sources is not None:
        # Every rank hashes and counts the pages of its share of the documents.
        # Remote documents of this rank's share download in parallel before being inspected.
        prefetch(sources[info.rank::info.world_size])
        mine = manifest.build_entries(sources, info.rank, info.world_size)
        if info.distributed:
            parts: list[Any] = [None] * info.world_size
            dist.all_gather_object(parts, mine, group=info.control_group)
        else:
            parts = [mine]
        if info.is_main:
            entries = manifest.write(out, [e for _, e in sorted(x for part in parts for x in part)])
            log.info("manifest: %d documents written to %s", len(entries), out / manifest.MANIFEST_FILE)

    msg: Any = None
    if info.is_main:
        plan = decide_plan(out, entries, cfg.unit_pages, info.world_size, ckpt, nltk_ok)
        if not info.distributed:
            return plan
        msg = plan_message(plan)
    msg = _share(info, msg)
    if info.is_main:
        return plan
    return plan_from_message(msg, cfg.unit_pages)


def decide_plan(out: Path, entries: Sequence[DocEntry], unit_pages: int, world_size: int,
                ckpt: str = "", nltk_ok: bool = True) -> Plan:
    """Rank 0: unique documents, units, what is left to do, and each rank's queue."""
    docs = manifest.unique_docs(entries)
    units = manifest.make_units(docs, unit_pages)
    todo, skip = _todo_units(out, docs, units)
    weights = units.n_pages[todo]
    queues = [todo[np.asarray(q, dtype=np.int64)].tolist() for q in assign(weights.tolist(), world_size)]
    total = int(units.n_pages.sum())
    failed = sum(n for s, n in status_counts(out).items() if s in FAILED_STATUSES)
    return Plan(entries, docs, units, todo, queues, ckpt, nltk_ok, total,
                total - int(weights.sum()) + len(skip), skip, failed)


def plan_message(plan: Plan) -> _PlanMessage:
    return _PlanMessage(
        (plan.docs if isinstance(plan.docs, DocTable) else DocTable.from_entries(plan.docs)).to_bytes(),
        plan.todo,
        np.array([len(q) for q in plan.queues], dtype=np.int64),
        np.fromiter((u for q in plan.queues for u in q), dtype=np.int64,
                    count=sum(len(q) for q in plan.queues)),
        plan.checkpoint, plan.nltk_ok, plan.total_pages, plan.committed_pages, plan.skip)


def plan_from_message(msg: _PlanMessage, unit_pages: int) -> Plan:
    """The other ranks: the same plan, without the manifest rows (rank 0 alone writes documents)."""
    docs = DocTable.from_bytes(msg.docs)
    units = manifest.make_units(docs, unit_pages)
    ends = np.cumsum(msg.queue_lengths)
    queues = [msg.queue_units[end - n:end].tolist() for n, end in zip(msg.queue_lengths, ends)]
    return Plan(None, docs, units, msg.todo, queues, msg.checkpoint, msg.nltk_ok,
                msg.total_pages, msg.committed_pages, msg.skip)


def unit_weights(plan: Plan) -> list[int]:
    """Pages of every unit still to do (0 for committed ones), indexed by unit."""
    weights = np.zeros(len(plan.units), dtype=np.int64)
    weights[plan.todo] = plan.units.n_pages[plan.todo]
    return weights.tolist()


def format_plan(plan: Plan, world_size: int, pages_per_s: float) -> str:
    """What a run would do, for --plan: inputs, pages, duplicates, failures, split, estimate."""
    entries = plan.entries
    unreadable = [e for e in entries if e.error is not None]
    archives = {e.source for e in entries if e.member is not None}
    n_pages = plan.units.n_pages
    rank_pages = [int(n_pages[np.asarray(q, dtype=np.int64)].sum()) for q in plan.queues]
    todo = sum(rank_pages)
    lines = [
        f"documents       {len(entries)} input(s), {len(plan.docs)} unique by content "
        f"({len(entries) - len(plan.docs)} duplicate(s))",
        f"archives        {len(archives)} ({sum(1 for e in entries if e.member is not None)} member(s))",
        f"pages           {plan.total_pages} in total, {plan.committed_pages} already committed, "
        f"{todo} to do in {len(plan.todo)} unit(s)",
        f"unreadable      {len(unreadable)}",
        f"failed rows     {plan.failed_rows} committed with status error/render_error/fail"
        + (" (--retry-failed would do them again)" if plan.failed_rows else ""),
    ]
    for e in unreadable[:20]:
        lines.append(f"  {e.source}{'::' + e.member if e.member else ''}: {e.error}")
    if len(unreadable) > 20:
        lines.append(f"  ... and {len(unreadable) - 20} more (see manifest.parquet)")
    lines.append(f"ranks           {world_size}: " + ", ".join(
        f"r{r} {p} pages" for r, p in enumerate(rank_pages)))
    est = max(rank_pages, default=0) / pages_per_s
    lines.append(f"estimate        {est / 60:.1f} min at {pages_per_s:g} pages/s per rank "
                 "(--plan-pages-per-s), before stealing evens out the ranks")
    return "\n".join(lines)

