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
from nougat_dist.ocr.model import checkpoint_name, dtype_name, injected_model, resolve_checkpoint
from nougat_dist.ocr.nltk_words import ensure_nltk_words
from nougat_dist.provenance import new_run_id
from nougat_dist.sched.steal import assign
from nougat_dist.store import attempts
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
    #: documents whose input is no longer given or found: kept, not scheduled
    retired: int = 0
    #: rank 0: how the inputs differ from the manifest ("" for a new output)
    input_changes: str = ""
    #: rank 0: committed pages of files replaced in place (set aside; a plan only counts them)
    replaced_pages: int = 0
    #: this launch of the job (provenance.new_run_id), the same on every rank, and when rank 0
    #: started it (epoch seconds)
    run_id: str = ""
    started_at: float = 0.0

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


def _todo_units(done: dict[str, np.ndarray], docs: Sequence[DocEntry],
                units: Units) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the units with a page no committed chunk holds yet, and the (doc, page) pairs
    of those units that are committed already (after a change of --unit-pages a unit can be
    half done): the worker skips them, so no page is stored twice."""
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
    injected = injected_model()
    if injected is not None:
        return injected.model_id, injected.dtype
    return checkpoint_name(Path(ckpt)), dtype_name(cfg.full_precision)


def _reconcile_committed(cfg: Config, out: Path, ckpt: str) -> int:
    """Rank 0, under the lease: one model per output, and --retry-failed's failed rows set
    aside. Returns the rows moved to superseded/."""
    model, dtype = run_model_id(cfg, ckpt)
    others = checkpoint.committed_models(out) - {(model, dtype)}
    if others and not cfg.redo_other_model:
        named = ", ".join(f"{m} ({d})" for m, d in sorted(others))
        raise SetupError(
            f"{out} holds pages OCR'd by {named}; this run uses {model} ({dtype}). A document "
            "must not mix two models: use the same --checkpoint and precision, another --output, "
            "or --redo-other-model to do those pages again with this model.")
    moved = 0
    if others:
        moved += checkpoint.set_aside(
            out, lambda t: pc.invert(pc.and_(pc.equal(t["model"], model),
                                             pc.equal(t["dtype"], dtype))), "other-model")
    if cfg.retry_failed:
        failed = pa.array(FAILED_STATUSES)
        moved += checkpoint.set_aside(out, lambda t: pc.is_in(t["status"], value_set=failed),
                                      "retry-failed")
    return moved


def _check_readable_output(out: Path) -> None:
    """--plan's check: it only reads, so a missing output dir is fine and none is created."""
    if out.exists() and not out.is_dir():
        raise SetupError(f"--output {out} exists and is not a directory")


@dataclass
class _Start:
    """What rank 0 knows before the documents are inspected (kept on rank 0 only)."""

    old: DocTable | None
    changes: manifest.InputChanges
    moved: int  # committed rows moved to superseded/ before planning


def _prepare(cfg: Config, out: Path, plan_only: bool) -> tuple[_Start, list, str, bool]:
    """Rank 0, before any other rank does anything: lease, inputs, and what changed since the
    manifest was written. A plan reads only: no lease, no temp-file cleanup, nothing moved."""
    layout = OutputDir(out)
    if plan_only:
        _check_readable_output(out)
    else:
        _check_output_dir(out)
        # Before anything else is written: one job per output directory. The lease goes with
        # the process (a crash leaves it to be taken back or over).
        atexit.register(store_lease.acquire(layout).release)
    sources = discover(cfg.input)
    if not sources:
        raise SetupError("the inputs contain no PDF files: " + " ".join(cfg.input))
    needs_model = injected_model() is None and not plan_only
    ckpt = str(resolve_checkpoint(cfg.checkpoint, cfg.model)) if needs_model else ""
    nltk_ok = ensure_nltk_words() if needs_model else True
    moved = 0
    if not plan_only:
        checkpoint.remove_temp_files(out)
        if cfg.discard_committed:
            moved += checkpoint.discard_committed(out)
        moved += _reconcile_committed(cfg, out, ckpt)
    # --discard-committed starts from the inputs alone: rows of inputs no longer given go too.
    old = None if cfg.discard_committed else manifest.load(out)
    changes = manifest.diff_inputs(old, sources, recheck=cfg.rebuild_manifest,
                                   recheck_errors=cfg.retry_failed,
                                   absolute_source=cfg.absolute_source)
    to_inspect = [sources[i] for i in changes.to_inspect]
    return _Start(old, changes, moved), to_inspect, ckpt, nltk_ok


def _build_plan(cfg: Config, info: DistInfo, plan_only: bool = False) -> Plan:
    out = Path(cfg.output)
    # Rank 0 decides what the job is; failures travel to every rank so nobody hangs in a barrier.
    head: Any = None
    start: _Start | None = None
    if info.is_main:
        started_at = time.time()
        try:
            start, *rest = _prepare(cfg, out, plan_only)
            head = (*rest, new_run_id(started_at), started_at)
        except (SetupError, InputError, OSError, RuntimeError) as e:
            head = SetupError(str(e))
    to_inspect, ckpt, nltk_ok, run_id, started_at = _share(info, head)
    if not plan_only:
        attempts.start(run_id)  # the lease is held: this attempt's records may be written now

    # Every rank hashes and counts the pages of its share of the new and changed documents
    # (remote ones of this share download in parallel first).
    parts: list[Any] = [[]]
    if to_inspect:
        prefetch(to_inspect[info.rank::info.world_size])
        mine = manifest.build_entries(to_inspect, info.rank, info.world_size,
                                      cfg.absolute_source)
        if info.distributed:
            parts = [None] * info.world_size
            dist.all_gather_object(parts, mine, group=info.control_group)
        else:
            parts = [mine]

    msg: Any = None
    if info.is_main:
        assert start is not None
        try:
            plan = _decide_on_rank0(cfg, out, start, parts, info.world_size, ckpt, nltk_ok,
                                    plan_only)
        except (SetupError, OSError, RuntimeError) as e:
            msg = SetupError(str(e))
        else:
            plan.run_id, plan.started_at = run_id, started_at
            if not info.distributed:
                return plan
            msg = plan_message(plan)
    msg = _share(info, msg)
    if info.is_main:
        return plan
    plan = plan_from_message(msg, cfg.unit_pages)
    plan.run_id, plan.started_at = run_id, started_at
    return plan


def _decide_on_rank0(cfg: Config, out: Path, start: _Start, parts: list[Any], world_size: int,
                     ckpt: str, nltk_ok: bool, plan_only: bool) -> Plan:
    """The new manifest (written unless planning), pages of replaced files set aside, the plan,
    and stale derived outputs removed when this run will change the pages."""
    ch = start.changes
    order = ch.to_inspect
    inspected = {order[j]: e for j, e in sorted(x for part in parts for x in part)}
    entries = manifest.merge_inputs(start.old, ch, inspected)
    if start.old is not None and (ch.rewrite or ch.changed):
        log.info("inputs since the manifest was written: %s", ch.summary())
    if ch.rewrite and not plan_only:
        manifest.write(out, entries)
        log.info("manifest: %d documents written to %s", len(entries), OutputDir(out).manifest)
    done = {} if (plan_only and cfg.discard_committed) else checkpoint.committed_pages(out)
    # Committed pages of a doc_id the manifest no longer holds came from a file since replaced
    # (same name, other bytes): they must not mix into its new document.
    ids = set(entries.column("doc_id"))
    orphans = sorted(d for d in done if d not in ids)
    replaced = sum(len(done.pop(d)) for d in orphans)
    moved = start.moved
    if orphans and not plan_only:
        moved += checkpoint.set_aside(out, lambda t: pc.is_in(t["doc_id"],
                                                              value_set=pa.array(orphans)),
                                      "replaced")
    plan = decide_plan(out, entries, cfg.unit_pages, world_size, ckpt, nltk_ok, done=done)
    if start.old is not None:
        plan.input_changes = ch.summary() if ch.rewrite or ch.changed else "inputs unchanged"
    plan.replaced_pages = replaced
    if not plan_only and (len(plan.todo) or moved):
        # Pages only added (a resume, new inputs): increments already published stay valid.
        checkpoint.invalidate_derived(out, keep_published=not moved)
    return plan


def decide_plan(out: Path, entries: Sequence[DocEntry], unit_pages: int, world_size: int,
                ckpt: str = "", nltk_ok: bool = True,
                done: dict[str, np.ndarray] | None = None) -> Plan:
    """Rank 0: unique documents, units, what is left to do, and each rank's queue.

    done: the committed pages (read from out when not given). A document whose input is no
    longer given (`removed`) keeps what it has: its missing pages are neither scheduled nor
    counted."""
    if done is None:
        done = checkpoint.committed_pages(out)
    docs = manifest.unique_docs(entries)
    units = manifest.make_units(docs, unit_pages)
    todo, skip = _todo_units(done, docs, units)
    # Retired: every row of the doc_id is removed (a copy still given keeps the document going).
    table = entries if isinstance(entries, DocTable) else DocTable.from_entries(entries)
    removed = table.removed_array()
    retired = np.zeros(len(docs), dtype=bool)
    if removed.any():
        active = set(pc.filter(table.table["doc_id"], pa.array(~removed)).to_pylist())
        retired = np.array([d not in active for d in manifest.doc_ids(docs)], dtype=bool)
    retired_pages = 0
    if retired.any():
        todo = todo[~retired[units.doc[todo]]]
        skip = skip[~retired[skip[:, 0]]] if len(skip) else skip
        ids = manifest.doc_ids(docs)
        retired_pages = sum(len(done.get(ids[d], ())) for d in np.flatnonzero(retired).tolist())
    weights = units.n_pages[todo]
    queues = [todo[np.asarray(q, dtype=np.int64)].tolist() for q in assign(weights.tolist(), world_size)]
    n_pages = units.n_pages
    total = int(n_pages[~retired[units.doc]].sum()) + retired_pages
    failed = sum(n for s, n in status_counts(out).items() if s in FAILED_STATUSES)
    return Plan(entries, docs, units, todo, queues, ckpt, nltk_ok, total,
                total - int(weights.sum()) + len(skip), skip, failed,
                retired=int(retired.sum()))


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
        f"kept, not given {plan.retired} document(s) whose input is no longer given or found: "
        "committed pages kept, nothing scheduled",
        f"failed rows     {plan.failed_rows} committed with status error/render_error/fail"
        + (" (--retry-failed would do them again)" if plan.failed_rows else ""),
    ]
    if plan.input_changes:
        lines.insert(1, f"since manifest  {plan.input_changes}")
    if plan.replaced_pages:
        lines.append(f"replaced files  {plan.replaced_pages} committed page(s) of files changed in "
                     "place: set aside to superseded/ (the files' new content is scheduled)")
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

