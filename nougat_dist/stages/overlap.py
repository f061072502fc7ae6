"""Post stages that run while the job's OCR runs (`--post clean,chunk,upload --overlap-post`).

A background process started by rank 0 wakes every `--post-every` seconds, takes the documents
whose pages are all committed and not yet published, and makes them an *increment*: clean, then
chunk, then upload, each one increment at a time and in increment order. The dataset reaches the
Hub increment by increment instead of after the last page; the end of the job publishes what is
left (the last increment), then the whole output as `upload` does (pages/, documents/, stats).

The ledger, OUTPUT/post/ (written only by this module), is what makes a crash anywhere harmless:
- `inc-NNNNN.parquet` fixes an increment's documents (doc_id, source, member, n_pages, in manifest
  order) before any stage runs on it;
- `clean-NNNNN.json`, `chunk-NNNNN.json` and `upload-NNNNN.json` say that a stage finished the
  increment (with the files it wrote); `clean-NNNNN.state.parquet` holds the text hashes of the
  documents it kept, which later increments deduplicate against (with clean/pages/ itself).
A stage whose record is missing removes the increment's shards it may have left (named
`train-iNNNNN-*`, so nothing else is touched) and does the increment again; an upload is a single
Hub commit of fixed paths, so doing it again publishes nothing twice. Each document is in one
increment, so none is published twice or lost.

Same dataset as `clean`/`chunk` after the job, with one difference: clean's dedup keeps the
*first published* copy of a duplicated page or document text, where a clean after the job keeps
the first in manifest order. Without text duplicates between documents the rows are the same;
with them, the same page texts are kept once each (the counts are equal), a shared page possibly
under the other document's id, which changes those two documents' clean text.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from nougat_dist.errors import UsageError
from nougat_dist.stages import chunk as chunk_stage
from nougat_dist.stages import postprocess as clean_stage
from nougat_dist.store.chunks import PAGES_SCHEMA, atomic_write_table, atomic_write_text
from nougat_dist.store.index import chunk_paths
from nougat_dist.store.layout import OutputDir
from nougat_dist.store.shards import clear_scratch, increment_paths, scratch_dir
from nougat_dist.store.spill import DEFAULT_MEMORY_BUDGET, connect

log = logging.getLogger(__name__)

STAGES = ("clean", "chunk", "upload")
#: Configs the card lists while the job runs: the ones increments publish.
LIVE_CONFIGS = ("chunks", "clean_documents", "clean_pages")
#: How long the end of the job waits for the background process to finish its step.
STOP_WAIT_S = 30.0

_INC_SCHEMA = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("member", pa.string()),
                         ("n_pages", pa.int32())])

# The manifest's documents (first occurrence of each doc_id) in manifest order; with $complete,
# only those whose pages (or, unreadable, its page-0 error row) are all committed.
_DOCS_SQL = """
WITH m AS (
    SELECT file_row_number AS ord, doc_id, source, member, n_pages, error
    FROM read_parquet($manifest, file_row_number = true)
    QUALIFY row_number() OVER (PARTITION BY doc_id ORDER BY file_row_number) = 1),
c AS (SELECT doc_id, count(DISTINCT page) AS got FROM read_parquet($pages) GROUP BY doc_id)
SELECT m.doc_id, m.source, m.member, m.n_pages
FROM m LEFT JOIN c USING (doc_id)
WHERE NOT $complete OR coalesce(c.got, 0) >= CASE WHEN m.error IS NULL AND m.n_pages > 0
                                                  THEN m.n_pages ELSE 1 END
ORDER BY m.ord
"""


@dataclass(frozen=True)
class PostConfig:
    """What the post stages of a job do (from the job's --post flags)."""

    out: Path
    stages: tuple[str, ...]
    repo: str = ""
    every_s: float = 30.0
    memory_budget: int = DEFAULT_MEMORY_BUDGET


def parse_stages(text: str) -> tuple[str, ...]:
    """`clean,chunk,upload` -> the stages in order; a stage needs the ones before it."""
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    for s in stages:
        if s not in STAGES:
            raise UsageError(f"--post: unknown stage {s!r} (choose from {', '.join(STAGES)})")
    if stages and stages != STAGES[:len(stages)]:
        raise UsageError(f"--post: stages run in the order {','.join(STAGES)}, each after the ones "
                         f"before it; got {text!r}")
    return stages


class Ledger:
    """OUTPUT/post/: which documents each increment holds, and which stages finished it."""

    def __init__(self, out: Path) -> None:
        self.layout = OutputDir(out)
        self.dir = self.layout.post

    def increments(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(p.name[4:9]) for p in self.dir.glob("inc-[0-9]*.parquet"))

    def docs_path(self, n: int) -> Path:
        return self.layout.post_file("inc", n, ".parquet")

    def state_path(self, n: int) -> Path:
        return self.layout.post_file("clean-state", n, ".parquet")

    def record(self, stage: str, n: int) -> dict | None:
        path = self.layout.post_file(stage, n)
        return json.loads(path.read_text()) if path.is_file() else None

    def mark(self, stage: str, n: int, record: dict) -> None:
        atomic_write_text(json.dumps(record, indent=1, sort_keys=True) + "\n",
                          self.layout.post_file(stage, n))

    def published_ids(self) -> set[str]:
        ids: set[str] = set()
        for n in self.increments():
            ids.update(pq.read_table(self.docs_path(n), columns=["doc_id"])["doc_id"].to_pylist())
        return ids


def _documents(out: Path, complete: bool) -> pa.Table:
    """The manifest's documents in order (only the complete ones when `complete`)."""
    scratch = scratch_dir(out, "post")
    pages = [str(p) for p in chunk_paths(out)]
    if not pages:
        pages = [str(scratch / "no-pages.parquet")]
        pq.write_table(PAGES_SCHEMA.empty_table(), pages[0])
    con = connect(scratch, 256 * 2**20)
    try:
        params = {"manifest": str(OutputDir(out).manifest), "pages": pages, "complete": complete}
        return con.sql(_DOCS_SQL, params=params).to_arrow_table().cast(_INC_SCHEMA)
    finally:
        con.close()
        clear_scratch(out, "post")


def form_increment(out: Path, ledger: Ledger, final: bool = False) -> int | None:
    """Fix the next increment: the complete documents no increment holds yet (at the end of the
    job, `final`: every document left). Returns its number, or None when there is nothing new."""
    docs = _documents(out, complete=not final)
    taken = ledger.published_ids()
    if taken:
        docs = docs.filter(pa.array([d not in taken for d in docs["doc_id"].to_pylist()]))
    if not docs.num_rows:
        return None
    n = (ledger.increments() or [-1])[-1] + 1
    atomic_write_table(docs, ledger.docs_path(n))
    log.info("post: increment %d holds %d document(s)", n, docs.num_rows)
    return n


def _holders(out: Path, docs_path: Path) -> list[Path]:
    """The committed chunks that hold pages of an increment's documents."""
    paths = [str(p) for p in chunk_paths(out)]
    if not paths:
        return []
    con = connect(scratch_dir(out, "post"), 256 * 2**20)
    try:
        found = con.execute("SELECT DISTINCT filename FROM read_parquet($pages, filename = true) "
                            "WHERE doc_id IN (SELECT doc_id FROM read_parquet($docs))",
                            {"pages": paths, "docs": str(docs_path)}).fetchall()
    finally:
        con.close()
        clear_scratch(out, "post")
    return sorted(Path(f) for (f,) in found)


def _remove_increment(directories: Sequence[Path], n: int) -> None:
    for d in directories:
        for p in increment_paths(d, n):
            p.unlink()


def clean_step(cfg: PostConfig, ledger: Ledger, n: int) -> None:
    """Clean increment n (after every earlier one), unless the ledger says it is done."""
    if ledger.record("clean", n) is not None:
        return
    layout = OutputDir(cfg.out)
    _remove_increment([layout.clean_pages, layout.clean_documents, layout.clean_dropped], n)
    ledger.state_path(n).unlink(missing_ok=True)  # an interrupted attempt's
    earlier = [m for m in ledger.increments() if m < n]
    prior = ([ledger.state_path(m) for m in earlier if ledger.state_path(m).is_file()],
             [p for m in earlier for p in increment_paths(layout.clean_pages, m)])
    report, state = clean_stage.clean_increment(cfg.out, n, ledger.docs_path(n),
                                                _holders(cfg.out, ledger.docs_path(n)), prior,
                                                memory_budget=cfg.memory_budget)
    if state:
        atomic_write_table(pa.Table.from_pylist(state, schema=clean_stage.DOC_SHA_SCHEMA),
                           ledger.state_path(n))
    files = [str(p.relative_to(cfg.out)) for d in (layout.clean_pages, layout.clean_documents,
                                                   layout.clean_dropped)
             for p in increment_paths(d, n)]
    ledger.mark("clean", n, {"report": asdict(report), "files": files})


def chunk_step(cfg: PostConfig, ledger: Ledger, n: int, tokenizer: Any) -> None:
    """Chunk increment n's clean pages, unless the ledger says it is done."""
    if ledger.record("chunk", n) is not None:
        return
    layout = OutputDir(cfg.out)
    _remove_increment([layout.chunks], n)
    stats = chunk_stage.chunk_increment(cfg.out, n, increment_paths(layout.clean_pages, n),
                                        tokenizer=tokenizer)
    files = [str(p.relative_to(cfg.out)) for p in increment_paths(layout.chunks, n)]
    ledger.mark("chunk", n, {**stats, "files": files})


def upload_step(cfg: PostConfig, ledger: Ledger, pending: list[int], api: Any = None) -> None:
    """Publish the increments in `pending` (done by every earlier stage) in one Hub commit: their
    shards and a card whose configs list what the increments published so far."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from nougat_dist.stages import upload as up

    files = [f for n in pending for stage in ("clean", "chunk") if stage in cfg.stages
             for f in (ledger.record(stage, n) or {}).get("files", [])]
    card = up.dataset_card(cfg.out, cfg.repo, only=LIVE_CONFIGS)
    ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(cfg.out / f)) for f in files]
    ops.append(CommitOperationAdd(path_in_repo=up.CARD_FILE, path_or_fileobj=card.encode()))
    api = api if api is not None else HfApi()
    api.create_repo(cfg.repo, repo_type="dataset", exist_ok=True)
    info = api.create_commit(cfg.repo, ops, repo_type="dataset",
                             commit_message=f"nougat-dist: increment(s) {pending[0]}-{pending[-1]}")
    for n in pending:
        ledger.mark("upload", n, {"commit": getattr(info, "oid", None), "files": files})
    log.info("post: published increment(s) %s to datasets/%s (%d file(s))", pending, cfg.repo,
             len(files))


def step(cfg: PostConfig, ledger: Ledger, tokenizer: Any, final: bool = False) -> None:
    """One wake: form an increment of what completed, then run every stage on what it lacks."""
    form_increment(cfg.out, ledger, final)
    incs = ledger.increments()
    for n in incs:
        clean_step(cfg, ledger, n)
        if "chunk" in cfg.stages:
            chunk_step(cfg, ledger, n, tokenizer)
    if "upload" in cfg.stages:
        pending = [n for n in incs if ledger.record("upload", n) is None]
        if pending:
            upload_step(cfg, ledger, pending)


def write_report(cfg: PostConfig, ledger: Ledger) -> clean_stage.CleanReport:
    """clean/report.json: the increments' reports added up."""
    total = clean_stage.CleanReport()
    for n in ledger.increments():
        rec = ledger.record("clean", n)
        if rec is not None:
            total.add(clean_stage.CleanReport(**rec["report"]))
    clean_stage.write_report(OutputDir(cfg.out), total)
    return total


# --- the background process ----------------------------------------------------------------------

def _loop(cfg: PostConfig) -> int:
    """The background process's body: a step every cfg.every_s until SIGTERM (then it ends
    after the step it is in). A step that fails is logged and tried again at the next wake."""
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the job's to handle
    ledger = Ledger(cfg.out)
    tokenizer = chunk_stage.default_tokenizer()
    while not stop["now"]:
        t0 = time.monotonic()
        try:
            step(cfg, ledger, tokenizer)
        except Exception as e:  # noqa: BLE001 -- a Hub outage or a full disk must not end the job
            log.warning("post: step failed (%s: %s); trying again in %.0f s", type(e).__name__,
                        e, cfg.every_s)
        while not stop["now"] and time.monotonic() - t0 < cfg.every_s:
            time.sleep(min(0.2, cfg.every_s))
    return 0


def _die_with_parent(parent: int) -> None:
    """The job's rank 0 may be SIGKILLed: this process must not outlive it and write on its own.
    Set here, not in a preexec_fn (rank 0 has threads, and a fork runs no Python safely then);
    the parent check covers a parent that died before the prctl."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        raise SystemExit(0)
    os.nice(10)  # OCR first: the post stages take what the ranks leave of the CPU


class Background:
    """The background process of one job (rank 0 starts it after the plan, stops it at the end)."""

    def __init__(self, cfg: PostConfig) -> None:
        cmd = [sys.executable, "-m", "nougat_dist.stages.overlap", str(cfg.out),
               "--post", ",".join(cfg.stages), "--every", str(cfg.every_s),
               "--memory-budget", str(cfg.memory_budget), "--parent", str(os.getpid())]
        if cfg.repo:
            cmd += ["--repo", cfg.repo]
        path = OutputDir(cfg.out).post_log
        path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # a log file, not a terminal
        with open(path, "ab") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        log.info("post stages run beside OCR (pid %d, every %.1f s; log %s)", self.proc.pid,
                 cfg.every_s, path)

    def stop(self) -> None:
        """Ask it to end after its current step; kill it if that takes over STOP_WAIT_S (every
        stage resumes where it was, so a kill loses only the step's work)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(job: Any, is_main: bool) -> Background | None:
    """Rank 0 of a job with --overlap-post: start the background process (None otherwise)."""
    if not (is_main and job.overlap_post and job.post):
        return None
    return Background(from_job(job))


def from_job(job: Any) -> PostConfig:
    """The post stages of a job's Config."""
    return PostConfig(Path(job.output), parse_stages(job.post), job.post_repo, job.post_every,
                      job.finalize_memory)


def after_job(job: Any) -> None:
    """The end of a complete job (rank 0, after finalize): the post stages of --post. With
    --overlap-post (or increments already published) the last increment, then the full upload;
    else clean, chunk and upload over the whole output."""
    if not job.post:
        return
    cfg = from_job(job)
    t0 = time.monotonic()
    ledger = Ledger(cfg.out)
    if job.overlap_post or ledger.increments():
        step(cfg, ledger, chunk_stage.default_tokenizer(), final=True)
        write_report(cfg, ledger)
    else:
        clean_stage.clean(cfg.out, memory_budget=cfg.memory_budget)
        if "chunk" in cfg.stages:
            chunk_stage.chunk(cfg.out)
    if "upload" in cfg.stages:
        from nougat_dist.stages import upload as up

        up.upload(cfg.out, cfg.repo, echo=log.info)
    log.info("post stages %s done in %.1f s", ",".join(cfg.stages), time.monotonic() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m nougat_dist.stages.overlap OUT ...`: the background process (see Background)."""
    p = argparse.ArgumentParser(description="post stages beside a running job (started by rank 0)")
    p.add_argument("output", type=Path)
    p.add_argument("--post", required=True)
    p.add_argument("--repo", default="")
    p.add_argument("--every", type=float, default=30.0)
    p.add_argument("--memory-budget", type=int, default=DEFAULT_MEMORY_BUDGET)
    p.add_argument("--parent", type=int, required=True, help="the pid of the job's rank 0")
    args = p.parse_args(argv)
    _die_with_parent(args.parent)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s post %(levelname)s %(message)s")
    return _loop(PostConfig(args.output, parse_stages(args.post), args.repo, args.every,
                            args.memory_budget))


if __name__ == "__main__":
    sys.exit(main())
