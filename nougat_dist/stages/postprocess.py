"""Post stages on a finished job's output dir: clean/filter pages, then cut token-aware chunks.

clean reads pages/ and documents/ and writes clean/pages/, clean/documents/, clean/dropped/ (one
row per dropped page or document, with the reason; all three Parquet shards as store/shards
writes them) and clean/report.json (counts by reason, thresholds used). It streams one document
at a time; the sort and the dedup run in DuckDB within --memory-budget. Steps, in order:

1. Pages whose status is not `ok` are dropped (reason `status:<status>`): failed, empty, render
   errors and unreadable documents carry no text worth keeping.
2. Nougat's `[MISSING_PAGE_...]` markers are removed from the text.
3. Whitespace is normalised: CRLF and lone CR become LF, NBSP and tabs become spaces, runs of
   spaces collapse, trailing spaces go, 3+ newlines become one blank line; markdown headings with
   no text (`#` alone, which nougat emits when a heading's text is lost) are removed.
4. Repeated-line junk: a line repeated more than `max_line_repeats` times in a row keeps its first
   copy (nougat's loops); a short line (<= `boilerplate_max_chars`) found on at least
   `boilerplate_min_fraction` of a document's pages (documents of >= `boilerplate_min_pages` pages)
   is a running header/footer and is removed from every page.
5. Quality bar, on the cleaned text: fewer than `min_chars` characters (`too_short`); letters
   under `min_alpha_fraction` of non-space characters (`low_alpha`: garbage, or pure symbols);
   for pages of >= 50 words, distinct words under `min_unique_word_fraction` of all words
   (`repetitive`).
6. Exact dedup by sha256 of cleaned text: a document whose joined text equals an earlier one's is
   dropped whole (`duplicate_document`), then a page equal to an earlier kept page anywhere in the
   dataset is dropped (`duplicate_page`). "Earlier" = order of documents/, then page.

chunk: see nougat_dist/stages/chunk.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from nougat_dist.errors import MissingInputError
from nougat_dist.stages.options import add_option_flags, options_from_args, columns as _columns
from nougat_dist.stages.text import (CHUNKS_SCHEMA, CLEAN_DOCUMENTS_SCHEMA,  # noqa: F401 (re-exported)
                                     CLEAN_PAGES_SCHEMA, DROPPED_SCHEMA, PAGE_SEPARATOR, CleanOptions,
                                     boilerplate_lines, clean_document, collapse_repeats, normalise,
                                     quality_problem, sha_text)
from nougat_dist.store.chunks import PAGES_SCHEMA, atomic_write_text
from nougat_dist.store.index import add_allow_partial, chunk_paths, require_finished
from nougat_dist.store.layout import CHUNKS_DIR, CLEAN_DIR, CLEAN_REPORT_FILE, OutputDir  # noqa: F401
from nougat_dist.store.shards import (ShardWriter, clear_scratch, group_starts, scratch_dir,
                                      shard_paths, whole_groups)
from nougat_dist.store.spill import (DEFAULT_MEMORY_BUDGET, connect, pages_per_bucket, parse_size,
                                     sorted_by_buckets)

log = logging.getLogger(__name__)

@dataclass
class CleanReport:
    """What clean kept and dropped; written as clean/report.json."""

    pages_in: int = 0
    pages_kept: int = 0
    documents_in: int = 0
    documents_kept: int = 0
    dropped_pages: dict[str, int] = field(default_factory=dict)
    dropped_documents: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=dict)  # markers / lines taken out of kept text
    options: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        why = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped_pages.items())) or "nothing"
        return (f"clean: kept {self.pages_kept}/{self.pages_in} pages, {self.documents_kept}/"
                f"{self.documents_in} documents; dropped pages: {why}")

    def add(self, other: "CleanReport") -> None:
        """Add the counts of another part of the same corpus (an increment)."""
        for name in ("pages_in", "pages_kept", "documents_in", "documents_kept"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("dropped_pages", "dropped_documents", "removed"):
            total = dict(getattr(self, name))
            for k, v in getattr(other, name).items():  # zeros kept, as one run reports them
                total[k] = total.get(k, 0) + v
            setattr(self, name, dict(sorted(total.items())))
        self.options = other.options or self.options


def _documents(out_dir: Path) -> list[Path]:
    paths = shard_paths(OutputDir(out_dir).documents)
    if not paths:
        raise MissingInputError(f"{OutputDir(out_dir).documents} not found: clean needs a finished "
                                f"job's output dir (run the job to the end, or "
                                f"`nougat-dist finalize {out_dir}`)")
    return paths


# The documents of documents/ in order, each in a bucket of consecutive documents that fits memory.
_CLEAN_DOCS_SQL = """
CREATE OR REPLACE TEMP TABLE cdocs AS
WITH d AS (
    SELECT row_number() OVER (ORDER BY filename, file_row_number) AS ord, doc_id, source, member, n_pages
    FROM read_parquet($documents, filename = true, file_row_number = true))
SELECT *, ((sum(greatest(n_pages, 1)) OVER (ORDER BY ord ROWS UNBOUNDED PRECEDING) - 1)
           // $pages_per_bucket)::INTEGER AS bucket
FROM d
"""

# Pass 1: every document's committed pages (a document without pages: one row with a null page),
# unordered; sorted by document, then page, one bucket at a time (spill.sorted_by_buckets).
_CLEAN_INPUT_SQL = """
SELECT d.bucket, d.ord, d.doc_id, d.source, d.member, p.page, p.status, p.text
FROM cdocs d LEFT JOIN ({pages}) p USING (doc_id)
"""
_PAGES_SQL = "SELECT doc_id, page, status, text FROM read_parquet($pages)"
# Before finalize, a raced steal can have committed a page twice: the first copy counts, as
# finalize keeps it (chunk order, then row order).
_FIRST_PAGES_SQL = """
SELECT doc_id, page, status, text
FROM read_parquet($pages, filename = true, file_row_number = true)
WHERE doc_id IN (SELECT doc_id FROM cdocs)
QUALIFY row_number() OVER (PARTITION BY doc_id, page ORDER BY filename, file_row_number) = 1
"""

# Pass 2: the dedup of step 6 as two spilling group-bys. A document is a duplicate when an earlier
# document with kept pages has the same joined text; a page of the others is a duplicate when an
# earlier (document, page) of them has the same text. $prior_docs and $prior_pages are what
# earlier increments kept (--overlap-post): earlier than every document here.
_CLEAN_DEDUP_SQL = """
WITH g AS (SELECT * FROM read_parquet($good)),
ds AS (SELECT * FROM read_parquet($docs)),
all_docs AS (
    SELECT ord, doc_id, doc_sha FROM ds
    UNION ALL SELECT -1::BIGINT, doc_id, doc_sha FROM read_parquet($prior_docs)),
first_doc AS (
    SELECT doc_sha, arg_min(doc_id, ord) AS first_doc, min(ord) AS first_ord
    FROM all_docs WHERE doc_sha IS NOT NULL GROUP BY doc_sha),
info AS (
    SELECT ds.ord, ds.doc_id, ds.doc_sha,
           CASE WHEN f.first_ord < ds.ord THEN f.first_doc END AS dup_of
    FROM ds LEFT JOIN first_doc f USING (doc_sha)),
kept AS (
    SELECT g.sha, g.doc_id, g.page, g.ord * 4294967296 + g.page AS pos
    FROM g JOIN info USING (ord) WHERE info.dup_of IS NULL
    UNION ALL SELECT sha256, doc_id, page, -1::BIGINT FROM read_parquet($prior_pages)),
first_page AS (
    SELECT sha, min(pos) AS first_pos, arg_min(doc_id, pos) AS first_doc, arg_min(page, pos) AS first_page
    FROM kept GROUP BY sha)
SELECT cdocs.bucket, info.ord, info.doc_id, info.doc_sha, info.dup_of, g.source, g.member, g.page,
       g.text, g.sha,
       CASE WHEN info.dup_of IS NULL AND fp.first_pos < g.ord * 4294967296 + g.page
            THEN fp.first_doc END AS page_dup_doc,
       fp.first_page AS page_dup_page
FROM info JOIN cdocs USING (ord) LEFT JOIN g USING (ord) LEFT JOIN first_page fp USING (sha)
"""

_GOOD_SCHEMA = pa.schema([("ord", pa.int64()), ("doc_id", pa.string()), ("source", pa.string()),
                          ("member", pa.string()), ("page", pa.int32()), ("text", pa.string()),
                          ("sha", pa.string())])
#: A document's text hash (null: no page kept); also the state an increment leaves for later ones.
DOC_SHA_SCHEMA = pa.schema([("ord", pa.int64()), ("doc_id", pa.string()), ("doc_sha", pa.string())])


class _Drops:
    """Every dropped page or document: a row in clean/dropped/ and a count by reason."""

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self.rows: list[dict] = []
        self.pages: Counter[str] = Counter()
        self.documents: Counter[str] = Counter()

    def __call__(self, doc_id: str, page: int | None, reason: str, detail: str | None = None) -> None:
        self.rows.append({"doc_id": doc_id, "page": page, "reason": reason, "detail": detail})
        (self.documents if page is None else self.pages)[reason] += 1
        if len(self.rows) >= 4096:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write(pa.Table.from_pylist(self.rows, schema=DROPPED_SCHEMA))
            self.rows.clear()


@dataclass
class _Run:
    """One run of the clean stage over a set of documents (all of them, or one increment)."""

    con: object
    scratch: Path
    layout: OutputDir
    opts: CleanOptions
    memory_budget: int
    drop: _Drops
    increment: int | None = None
    report: CleanReport = field(default_factory=CleanReport)
    removed: Counter[str] = field(default_factory=Counter)


def _pass1(run: _Run, page_paths: list[str], doc_paths: Sequence[Path],
           first_copy: bool) -> tuple[list[Path], list[Path], int]:
    """Steps 1-5, one document at a time: the kept pages and each document's text hash."""
    con, scratch = run.con, run.scratch
    good = ShardWriter(scratch / "good", _GOOD_SCHEMA, scratch / "staging")
    doc_shas = ShardWriter(scratch / "docs", DOC_SHA_SCHEMA, scratch / "staging")
    con.execute(_CLEAN_DOCS_SQL, {"documents": [str(p) for p in doc_paths],
                                  "pages_per_bucket": pages_per_bucket(page_paths, run.memory_budget)}
                ).fetchall()
    n_buckets = con.execute("SELECT coalesce(max(bucket), -1) + 1 FROM cdocs").fetchall()[0][0]
    sql = _CLEAN_INPUT_SQL.format(pages=_FIRST_PAGES_SQL if first_copy else _PAGES_SQL)
    rows = sorted_by_buckets(con, sql, {"pages": page_paths}, scratch / "pass1", n_buckets)
    for table in whole_groups(rows, "ord"):
        ords, doc_ids, sources, members, pages, statuses, texts = _columns(
            table, ["ord", "doc_id", "source", "member", "page", "status", "text"])
        starts = group_starts(table, "ord")
        good_rows: list[dict] = []
        for a, b in zip(starts, [*starts[1:], len(ords)]):
            doc_id = doc_ids[a]
            run.report.documents_in += 1
            run.report.pages_in += sum(p is not None for p in pages[a:b])
            doc_good = clean_document(pages[a:b], statuses[a:b], texts[a:b], doc_id, run.opts,
                                      run.removed, run.drop)
            good_rows += [{"ord": ords[a], "doc_id": doc_id, "source": sources[a],
                           "member": members[a], "page": p, "text": t, "sha": sha_text(t)}
                          for p, t in doc_good]
            doc_sha = sha_text(PAGE_SEPARATOR.join(t for _, t in doc_good)) if doc_good else None
            doc_shas.write(pa.Table.from_pylist([{"ord": ords[a], "doc_id": doc_id, "doc_sha": doc_sha}],
                                                schema=DOC_SHA_SCHEMA))
        good.write(pa.Table.from_pylist(good_rows, schema=_GOOD_SCHEMA))
    return good.close(), doc_shas.close(), n_buckets


def _final_document(cols: list[list], a: int, b: int, drop: _Drops,
                    page_rows: list[dict]) -> dict | None:
    """Step 6 for one document (rows a..b of a pass-2 group): its clean/documents row, or None
    when it is dropped; its kept pages are appended to page_rows."""
    doc_ids, doc_sha, dup_of, sources, members, pages, texts, shas, pdoc, ppage = cols
    doc_id = doc_ids[a]
    if doc_sha[a] is None:
        drop(doc_id, None, "no_pages_kept")
        return None
    if dup_of[a] is not None:
        drop(doc_id, None, "duplicate_document", f"same text as {dup_of[a]}")
        for i in range(a, b):
            drop(doc_id, pages[i], "duplicate_document", f"same text as {dup_of[a]}")
        return None
    final: list[tuple[int, str]] = []
    for i in range(a, b):
        if pdoc[i] is not None:
            drop(doc_id, pages[i], "duplicate_page", f"same text as {pdoc[i]} page {ppage[i]}")
            continue
        final.append((pages[i], texts[i]))
        page_rows.append({"doc_id": doc_id, "source": sources[i], "member": members[i],
                          "page": pages[i], "text": texts[i], "sha256": shas[i]})
    if not final:
        drop(doc_id, None, "no_pages_kept")
        return {}
    return {"doc_id": doc_id, "source": sources[a], "member": members[a],
            "pages": [p for p, _ in final], "text": PAGE_SEPARATOR.join(t for _, t in final)}


def _pass2(run: _Run, good_paths: list[Path], doc_sha_paths: list[Path], n_buckets: int,
           prior: tuple[list[str], list[str]]) -> list[dict]:
    """Step 6 (dedup), then clean/pages/ and clean/documents/, in document order. Returns the
    documents later increments deduplicate against (DOC_SHA_SCHEMA rows)."""
    scratch, layout = run.scratch, run.layout
    out_pages = ShardWriter(layout.clean_pages, CLEAN_PAGES_SCHEMA, scratch, increment=run.increment)
    out_docs = ShardWriter(layout.clean_documents, CLEAN_DOCUMENTS_SCHEMA, scratch,
                           increment=run.increment)
    params = {"good": [str(p) for p in good_paths], "docs": [str(p) for p in doc_sha_paths],
              "prior_docs": prior[0], "prior_pages": prior[1]}
    rows = sorted_by_buckets(run.con, _CLEAN_DEDUP_SQL, params, scratch / "pass2", n_buckets)
    state: list[dict] = []
    for table in whole_groups(rows, "ord"):
        cols = _columns(table, ["doc_id", "doc_sha", "dup_of", "source", "member", "page", "text",
                                "sha", "page_dup_doc", "page_dup_page"])
        starts = group_starts(table, "ord")
        page_rows: list[dict] = []
        doc_rows: list[dict] = []
        for a, b in zip(starts, [*starts[1:], len(cols[0])]):
            doc = _final_document(cols, a, b, run.drop, page_rows)
            if doc is not None:  # not a duplicate, with pages kept before the page dedup
                state.append({"ord": 0, "doc_id": cols[0][a], "doc_sha": cols[1][a]})
            if doc:
                doc_rows.append(doc)
        out_pages.write(pa.Table.from_pylist(page_rows, schema=CLEAN_PAGES_SCHEMA))
        out_docs.write(pa.Table.from_pylist(doc_rows, schema=CLEAN_DOCUMENTS_SCHEMA))
        run.report.pages_kept += len(page_rows)
        run.report.documents_kept += len(doc_rows)
    out_pages.close()
    out_docs.close()
    return state


def _empty_file(scratch: Path, name: str, schema: pa.Schema) -> str:
    path = scratch / f"{name}.parquet"
    pq.write_table(schema.empty_table(), path)
    return str(path)


def _clean_run(out_dir: Path, doc_paths: Sequence[Path], page_paths: Sequence[Path],
               opts: CleanOptions, memory_budget: int, increment: int | None,
               prior: tuple[list[Path], list[Path]]) -> tuple[CleanReport, list[dict]]:
    """Clean the documents of doc_paths (in order) against what `prior` kept: clean/ rows and
    the report of these documents, and their dedup state (see _pass2)."""
    layout = OutputDir(out_dir)
    stage = "clean" if increment is None else f"clean-{increment}"
    scratch = scratch_dir(out_dir, stage)
    pages = [str(p) for p in page_paths] or [_empty_file(scratch, "no-pages", PAGES_SCHEMA)]
    prior_s = ([str(p) for p in prior[0]] or [_empty_file(scratch, "no-docs", DOC_SHA_SCHEMA)],
               [str(p) for p in prior[1]] or [_empty_file(scratch, "no-kept", CLEAN_PAGES_SCHEMA)])
    con = connect(scratch, memory_budget)
    drop = _Drops(ShardWriter(layout.clean_dropped, DROPPED_SCHEMA, scratch, increment=increment))
    run = _Run(con, scratch, layout, opts, memory_budget, drop, increment,
               CleanReport(options=asdict(opts)))
    try:
        good_paths, doc_sha_paths, n_buckets = _pass1(run, pages, doc_paths, increment is not None)
        state = _pass2(run, good_paths, doc_sha_paths, n_buckets, prior_s)
        drop.flush()
        drop.writer.close()
    except BaseException:
        drop.writer.abort()
        raise
    finally:
        con.close()
        clear_scratch(out_dir, stage)
    report = run.report
    report.dropped_pages = dict(sorted(drop.pages.items()))
    report.dropped_documents = dict(sorted(drop.documents.items()))
    report.removed = dict(sorted(run.removed.items()))
    assert report.pages_kept + sum(drop.pages.values()) == report.pages_in, "every page is kept or dropped"
    return report, state


def clean(out_dir: Path, opts: CleanOptions = CleanOptions(),
          memory_budget: int = DEFAULT_MEMORY_BUDGET) -> CleanReport:
    """Run the clean stage on a job output dir; write clean/ and return the report.

    Streams by document (one document's pages in memory at a time); the dedup runs in DuckDB,
    which spills to OUTPUT/.scratch/ beyond its share of `memory_budget`.
    """
    out_dir = Path(out_dir)
    layout = OutputDir(out_dir)
    report, _ = _clean_run(out_dir, _documents(out_dir), chunk_paths(out_dir), opts,
                           memory_budget, None, ([], []))
    for old in ("pages.parquet", "documents.parquet", "dropped.parquet"):  # an older release's files
        (layout.clean / old).unlink(missing_ok=True)
    shutil.rmtree(layout.post, ignore_errors=True)  # whole tables replaced any increments
    write_report(layout, report)
    return report


def clean_increment(out_dir: Path, increment: int, docs_path: Path, page_paths: Sequence[Path],
                    prior: tuple[list[Path], list[Path]], opts: CleanOptions = CleanOptions(),
                    memory_budget: int = DEFAULT_MEMORY_BUDGET) -> tuple[CleanReport, list[dict]]:
    """Clean one increment's documents (docs_path: doc_id, source, member, n_pages, in order),
    adding `train-iNNNNN-*` shards to clean/pages/, clean/documents/ and clean/dropped/.

    `prior` = (the dedup state files, the clean/pages shards) of the earlier increments: a
    document or page equal to one they kept is a duplicate. The same documents in the same order
    give the same rows as `clean` over the whole output. Returns the report and the dedup state."""
    return _clean_run(Path(out_dir), [docs_path], page_paths, opts, memory_budget, increment, prior)


def write_report(layout: OutputDir, report: CleanReport) -> None:
    """clean/report.json."""
    atomic_write_text(json.dumps(asdict(report), indent=2, sort_keys=True) + "\n", layout.clean_report)


def add_clean_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", type=Path, help="a finished job's output dir (pages/, documents/)")
    parser.add_argument("--memory-budget", type=parse_size, default=DEFAULT_MEMORY_BUDGET, metavar="SIZE",
                        help="memory for the sort and the dedup, e.g. 512MiB or 4GiB; beyond it work "
                             "spills to OUTPUT/.scratch/ (default: 1GiB, enough for any corpus size; "
                             "the largest document adds to the peak)")
    add_option_flags(parser, CleanOptions)
    add_allow_partial(parser)


def run_clean(args: argparse.Namespace) -> int:
    require_finished(args.output, args.allow_partial)
    opts = options_from_args(args, CleanOptions)
    report = clean(args.output, opts, args.memory_budget)
    layout = OutputDir(args.output)
    print(report.summary())
    print(f"report: {layout.clean_report}; dropped rows: {layout.clean_dropped}/")
    return 0


def __getattr__(name: str):
    """chunk's names (chunk, chunk_document, ChunkOptions, ...), which lived here until the chunk
    stage got its own module."""
    from nougat_dist.stages import chunk as _chunk

    try:
        return getattr(_chunk, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
