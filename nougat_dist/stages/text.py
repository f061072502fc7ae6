"""The clean stage's rules for one document's text (steps 1-5 of stages/postprocess.py), and the
schemas of the tables the post stages write."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import pyarrow as pa

from nougat_dist.errors import UsageError
from nougat_dist.flags import option

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


@dataclass(frozen=True, kw_only=True)
class CleanOptions:
    """Thresholds of the clean stage (flag = field name with dashes)."""

    min_chars: int = option(50,
        "Pages with fewer characters after cleaning are dropped (too_short).")
    min_alpha_fraction: float = option(0.3,
        "Pages whose letters are fewer than this fraction of non-space characters are dropped.")
    min_unique_word_fraction: float = option(0.2,
        "Pages of >= 50 words with fewer distinct words than this fraction are dropped (loops).")
    max_line_repeats: int = option(3,
        "A line repeated more often than this in a row keeps only its first copy.")
    boilerplate_min_fraction: float = option(0.5,
        "A short line on at least this fraction of a document's pages is removed as "
        "header/footer.")
    boilerplate_min_pages: int = option(4,
        "Only documents with at least this many ok pages are searched for headers/footers.")
    boilerplate_max_chars: int = option(80, "Longer lines are never treated as headers/footers.")

    def __post_init__(self) -> None:
        for name in ("min_alpha_fraction", "min_unique_word_fraction", "boilerplate_min_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UsageError(f"--{name.replace('_', '-')} must be within [0, 1]")
        if self.max_line_repeats < 1:
            raise UsageError("--max-line-repeats must be >= 1")


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


def sha_text(text: str) -> str:
    """The dedup key of a cleaned text."""
    return hashlib.sha256(text.encode()).hexdigest()


def clean_document(pages: Sequence[int | None], statuses: Sequence[str], texts: Sequence[str],
                   doc_id: str, opts: CleanOptions, removed: Counter[str],
                   drop: Callable[..., None]) -> list[tuple[int, str]]:
    """Steps 1-5 on one document's pages (in page order): the (page, text) it keeps."""
    kept: list[tuple[int, str]] = []
    for page, status, raw in zip(pages, statuses, texts):
        if page is None:
            continue  # a document without committed pages
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
