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
import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from nougat_dist.store.chunks import PAGES_SCHEMA, atomic_write_text
from nougat_dist.store.finalize import (DEFAULT_MEMORY_BUDGET, pages_per_bucket, parse_size,
                                        sorted_by_buckets)
from nougat_dist.store.index import add_allow_partial, chunk_paths, require_finished
from nougat_dist.store.layout import CHUNKS_DIR, CLEAN_DIR, CLEAN_REPORT_FILE, OutputDir  # noqa: F401
from nougat_dist.store.shards import (ShardWriter, clear_scratch, group_starts, scratch_dir,
                                      shard_paths, whole_groups)

log = logging.getLogger(__name__)

REPORT_FILE = CLEAN_REPORT_FILE

CLEAN_PAGES_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("member", pa.string()),
    pa.field("page", pa.int32(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),  # of text, the page dedup key
])

CLEAN_DOCUMENTS_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("member", pa.string()),
    pa.field("pages", pa.list_(pa.int32()), nullable=False),  # kept page numbers
    pa.field("text", pa.string(), nullable=False),  # kept pages joined with a blank line
])

DROPPED_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("page", pa.int32()),  # null: the whole document
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
])

CHUNKS_SCHEMA = pa.schema([
    pa.field("chunk_id", pa.string(), nullable=False),  # "<doc_id>-<chunk_index>"
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("member", pa.string()),
    pa.field("chunk_index", pa.int32(), nullable=False),
    pa.field("page_start", pa.int32(), nullable=False),
    pa.field("page_end", pa.int32(), nullable=False),
    pa.field("char_start", pa.int64(), nullable=False),  # in the clean document's text
    pa.field("char_end", pa.int64(), nullable=False),
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
])

PAGE_SEPARATOR = "\n\n"
_MISSING_RE = re.compile(r"\[MISSING_PAGE_[A-Z]+(?::\d+)?\]")
_EMPTY_HEADING_RE = re.compile(r"^#{1,6}[ \t]*$", re.MULTILINE)
_SPACES_RE = re.compile(r"[ \t\u00a0\u2007\u202f]+")
_WORD_RE = re.compile(r"\w+")


# --- clean ---------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CleanOptions:
    """Thresholds of the clean stage (flag = field name with dashes)."""

    min_chars: int = 50
    """Pages with fewer characters after cleaning are dropped (too_short)."""
    min_alpha_fraction: float = 0.3
    """Pages whose letters are fewer than this fraction of non-space characters are dropped."""
    min_unique_word_fraction: float = 0.2
    """Pages of >= 50 words with fewer distinct words than this fraction are dropped (loops)."""
    max_line_repeats: int = 3
    """A line repeated more often than this in a row keeps only its first copy."""
    boilerplate_min_fraction: float = 0.5
    """A short line on at least this fraction of a document's pages is removed as header/footer."""
    boilerplate_min_pages: int = 4
    """Only documents with at least this many ok pages are searched for headers/footers."""
    boilerplate_max_chars: int = 80
    """Longer lines are never treated as headers/footers."""

    def __post_init__(self) -> None:
        for name in ("min_alpha_fraction", "min_unique_word_fraction", "boilerplate_min_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be within [0, 1]")
        if self.max_line_repeats < 1:
            raise ValueError("--max-line-repeats must be >= 1")


def normalise(text: str) -> str:
    """Steps 2-3: markers out, whitespace and empty headings normalised."""
    text = _MISSING_RE.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES_RE.sub(" ", text)
    text = _EMPTY_HEADING_RE.sub("", text)
    text = "\n".join(line.strip(" ") for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def collapse_repeats(text: str, max_repeats: int) -> tuple[str, int]:
    """Keep the first copy of a non-blank line repeated more than max_repeats times in a row.
    Returns the text and the number of lines removed."""
    out: list[str] = []
    removed = 0
    run_line, run = None, 0
    for line in text.split("\n"):
        if line and line == run_line:
            run += 1
        else:
            run_line, run = line, 1
        out.append(line)
        if run == max_repeats + 1:
            # The run just became too long: it is junk, so drop all but its first copy.
            del out[-max_repeats:]
            removed += max_repeats
        elif run > max_repeats + 1:
            out.pop()
            removed += 1
    return "\n".join(out), removed


def boilerplate_lines(pages: Sequence[str], opts: CleanOptions) -> set[str]:
    """Short lines that occur on at least boilerplate_min_fraction of the pages of one document."""
    if len(pages) < opts.boilerplate_min_pages:
        return set()
    seen: Counter[str] = Counter()
    for text in pages:
        seen.update({ln for ln in text.split("\n") if ln and len(ln) <= opts.boilerplate_max_chars})
    need = opts.boilerplate_min_fraction * len(pages)
    return {ln for ln, n in seen.items() if n >= need}


def quality_problem(text: str, opts: CleanOptions) -> tuple[str, str] | None:
    """(reason, detail) when a cleaned page is below the quality bar, else None."""
    if len(text) < opts.min_chars:
        return "too_short", f"{len(text)} chars < {opts.min_chars}"
    non_space = [c for c in text if not c.isspace()]
    alpha = sum(c.isalpha() for c in non_space) / max(1, len(non_space))
    if alpha < opts.min_alpha_fraction:
        return "low_alpha", f"letters {alpha:.2f} of non-space chars < {opts.min_alpha_fraction}"
    words = _WORD_RE.findall(text.lower())
    if len(words) >= 50:
        unique = len(set(words)) / len(words)
        if unique < opts.min_unique_word_fraction:
            return "repetitive", f"distinct words {unique:.2f} < {opts.min_unique_word_fraction}"
    return None


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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


def _documents(out_dir: Path) -> list[Path]:
    paths = shard_paths(OutputDir(out_dir).documents)
    if not paths:
        raise FileNotFoundError(f"{OutputDir(out_dir).documents} not found: clean needs a finished "
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
# unordered; sorted by document, then page, one bucket at a time (finalize.sorted_by_buckets).
_CLEAN_INPUT_SQL = """
SELECT d.bucket, d.ord, d.doc_id, d.source, d.member, p.page, p.status, p.text
FROM cdocs d LEFT JOIN (SELECT doc_id, page, status, text FROM read_parquet($pages)) p USING (doc_id)
"""

# Pass 2: the dedup of step 6 as two spilling group-bys. A document is a duplicate when an earlier
# document with kept pages has the same joined text; a page of the others is a duplicate when an
# earlier (document, page) of them has the same text.
_CLEAN_DEDUP_SQL = """
WITH g AS (SELECT * FROM read_parquet($good)),
ds AS (SELECT * FROM read_parquet($docs)),
first_doc AS (
    SELECT doc_sha, arg_min(doc_id, ord) AS first_doc, min(ord) AS first_ord
    FROM ds WHERE doc_sha IS NOT NULL GROUP BY doc_sha),
info AS (
    SELECT ds.ord, ds.doc_id, ds.doc_sha,
           CASE WHEN f.first_ord < ds.ord THEN f.first_doc END AS dup_of
    FROM ds LEFT JOIN first_doc f USING (doc_sha)),
kept AS (
    SELECT g.sha, g.doc_id, g.page, g.ord * 4294967296 + g.page AS pos
    FROM g JOIN info USING (ord) WHERE info.dup_of IS NULL),
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
_DOC_SHA_SCHEMA = pa.schema([("ord", pa.int64()), ("doc_id", pa.string()), ("doc_sha", pa.string())])


def _columns(table: pa.Table, names: Sequence[str]) -> list[list]:
    return [table.column(n).to_pylist() for n in names]


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


def _clean_document(pages: Sequence[int | None], statuses: Sequence[str], texts: Sequence[str],
                    doc_id: str, opts: CleanOptions, report: CleanReport, removed: Counter[str],
                    drop: _Drops) -> list[tuple[int, str]]:
    """Steps 1-5 on one document's pages (in page order): the (page, text) it keeps."""
    kept: list[tuple[int, str]] = []
    for page, status, raw in zip(pages, statuses, texts):
        if page is None:
            continue  # a document without committed pages
        report.pages_in += 1
        if status != "ok":
            drop(doc_id, page, f"status:{status}")
            continue
        removed["missing_page_markers"] += len(_MISSING_RE.findall(raw))
        text, n = collapse_repeats(normalise(raw), opts.max_line_repeats)
        removed["repeated_lines"] += n
        kept.append((page, text))
    junk = boilerplate_lines([t for _, t in kept], opts)
    good: list[tuple[int, str]] = []
    for page, text in kept:
        if junk:
            lines = text.split("\n")
            kept_lines = [ln for ln in lines if ln not in junk]
            removed["boilerplate_lines"] += len(lines) - len(kept_lines)
            text = normalise("\n".join(kept_lines))
        problem = quality_problem(text, opts)
        if problem is not None:
            drop(doc_id, page, *problem)
        else:
            good.append((page, text))
    return good


def _pass1(con, page_paths: list[str], doc_paths: list[Path], scratch: Path, opts: CleanOptions,
           memory_budget: int, report: CleanReport, removed: Counter[str],
           drop: _Drops) -> tuple[list[Path], list[Path], int]:
    """Steps 1-5, one document at a time: the kept pages and each document's text hash."""
    good = ShardWriter(scratch / "good", _GOOD_SCHEMA, scratch / "staging")
    doc_shas = ShardWriter(scratch / "docs", _DOC_SHA_SCHEMA, scratch / "staging")
    con.execute(_CLEAN_DOCS_SQL, {"documents": [str(p) for p in doc_paths],
                                  "pages_per_bucket": pages_per_bucket(page_paths, memory_budget)}
                ).fetchall()
    n_buckets = con.execute("SELECT coalesce(max(bucket), -1) + 1 FROM cdocs").fetchall()[0][0]
    rows = sorted_by_buckets(con, _CLEAN_INPUT_SQL, {"pages": page_paths}, scratch / "pass1", n_buckets)
    for table in whole_groups(rows, "ord"):
        ords, doc_ids, sources, members, pages, statuses, texts = _columns(
            table, ["ord", "doc_id", "source", "member", "page", "status", "text"])
        starts = group_starts(table, "ord")
        good_rows: list[dict] = []
        for a, b in zip(starts, [*starts[1:], len(ords)]):
            doc_id = doc_ids[a]
            report.documents_in += 1
            doc_good = _clean_document(pages[a:b], statuses[a:b], texts[a:b], doc_id, opts, report,
                                       removed, drop)
            good_rows += [{"ord": ords[a], "doc_id": doc_id, "source": sources[a],
                           "member": members[a], "page": p, "text": t, "sha": _sha(t)}
                          for p, t in doc_good]
            doc_shas.write(pa.Table.from_pylist(
                [{"ord": ords[a], "doc_id": doc_id,
                  "doc_sha": _sha(PAGE_SEPARATOR.join(t for _, t in doc_good)) if doc_good else None}],
                schema=_DOC_SHA_SCHEMA))
        good.write(pa.Table.from_pylist(good_rows, schema=_GOOD_SCHEMA))
    return good.close(), doc_shas.close(), n_buckets


def _pass2(con, good_paths: list[Path], doc_sha_paths: list[Path], n_buckets: int, scratch: Path,
           layout: OutputDir, report: CleanReport, drop: _Drops) -> None:
    """Step 6 (dedup), then clean/pages/ and clean/documents/, in document order."""
    out_pages = ShardWriter(layout.clean_pages, CLEAN_PAGES_SCHEMA, scratch)
    out_docs = ShardWriter(layout.clean_documents, CLEAN_DOCUMENTS_SCHEMA, scratch)
    rows = sorted_by_buckets(con, _CLEAN_DEDUP_SQL, {"good": [str(p) for p in good_paths],
                                                     "docs": [str(p) for p in doc_sha_paths]},
                             scratch / "pass2", n_buckets)
    for table in whole_groups(rows, "ord"):
        cols = _columns(table, ["doc_id", "doc_sha", "dup_of", "source", "member", "page", "text",
                                "sha", "page_dup_doc", "page_dup_page"])
        doc_ids, doc_sha, dup_of, sources, members, pages, texts, shas, pdoc, ppage = cols
        starts = group_starts(table, "ord")
        page_rows: list[dict] = []
        doc_rows: list[dict] = []
        for a, b in zip(starts, [*starts[1:], len(doc_ids)]):
            doc_id = doc_ids[a]
            if doc_sha[a] is None:
                drop(doc_id, None, "no_pages_kept")
                continue
            if dup_of[a] is not None:
                drop(doc_id, None, "duplicate_document", f"same text as {dup_of[a]}")
                for i in range(a, b):
                    drop(doc_id, pages[i], "duplicate_document", f"same text as {dup_of[a]}")
                continue
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
                continue
            doc_rows.append({"doc_id": doc_id, "source": sources[a], "member": members[a],
                             "pages": [p for p, _ in final],
                             "text": PAGE_SEPARATOR.join(t for _, t in final)})
        out_pages.write(pa.Table.from_pylist(page_rows, schema=CLEAN_PAGES_SCHEMA))
        out_docs.write(pa.Table.from_pylist(doc_rows, schema=CLEAN_DOCUMENTS_SCHEMA))
        report.pages_kept += len(page_rows)
        report.documents_kept += len(doc_rows)
    out_pages.close()
    out_docs.close()


def clean(out_dir: Path, opts: CleanOptions = CleanOptions(),
          memory_budget: int = DEFAULT_MEMORY_BUDGET) -> CleanReport:
    """Run the clean stage on a job output dir; write clean/ and return the report.

    Streams by document (one document's pages in memory at a time); the dedup runs in DuckDB,
    which spills to OUTPUT/.scratch/ beyond its share of `memory_budget`.
    """
    from nougat_dist.store.finalize import connect

    out_dir = Path(out_dir)
    layout = OutputDir(out_dir)
    doc_paths = _documents(out_dir)
    scratch = scratch_dir(out_dir, "clean")
    report = CleanReport(options=asdict(opts))
    removed: Counter[str] = Counter()
    page_paths = [str(p) for p in chunk_paths(out_dir)]
    if not page_paths:
        page_paths = [str(scratch / "no-pages.parquet")]
        pq.write_table(PAGES_SCHEMA.empty_table(), page_paths[0])
    con = connect(scratch, memory_budget)
    drop = _Drops(ShardWriter(layout.clean_dropped, DROPPED_SCHEMA, scratch))
    try:
        good_paths, doc_sha_paths, n_buckets = _pass1(con, page_paths, doc_paths, scratch, opts,
                                                      memory_budget, report, removed, drop)
        _pass2(con, good_paths, doc_sha_paths, n_buckets, scratch, layout, report, drop)
        drop.flush()
        drop.writer.close()
    except BaseException:
        drop.writer.abort()
        raise
    finally:
        con.close()
        clear_scratch(out_dir, "clean")

    report.dropped_pages = dict(sorted(drop.pages.items()))
    report.dropped_documents = dict(sorted(drop.documents.items()))
    report.removed = dict(sorted(removed.items()))
    assert report.pages_kept + sum(drop.pages.values()) == report.pages_in, "every page is kept or dropped"
    for old in ("pages.parquet", "documents.parquet", "dropped.parquet"):  # an older release's files
        (layout.clean / old).unlink(missing_ok=True)
    atomic_write_text(json.dumps(asdict(report), indent=2, sort_keys=True) + "\n", layout.clean_report)
    return report


def _add_option_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    import dataclasses

    for f in dataclasses.fields(cls):
        doc = _field_docs(cls).get(f.name, "")
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
                            default=f.default, help=f"{doc} (default: {f.default})")


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) for --help."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)  # type: ignore[union-attr]
    return docs


def add_clean_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", type=Path, help="a finished job's output dir (pages/, documents/)")
    parser.add_argument("--memory-budget", type=parse_size, default=DEFAULT_MEMORY_BUDGET, metavar="SIZE",
                        help="memory for the sort and the dedup, e.g. 512MiB or 4GiB; beyond it work "
                             "spills to OUTPUT/.scratch/ (default: 1GiB, enough for any corpus size; "
                             "the largest document adds to the peak)")
    _add_option_flags(parser, CleanOptions)
    add_allow_partial(parser)


def run_clean(args: argparse.Namespace) -> int:
    import dataclasses

    require_finished(args.output, args.allow_partial)
    opts = CleanOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(CleanOptions)})
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
