"""The chunk stage: cut a cleaned output's pages into token-aware chunks.

chunk reads clean/pages/ one document at a time and writes chunks/train-00000-of-0000N.parquet
shards (or, while the job runs with --overlap-post, one increment at a time). Each document's
cleaned pages are joined with a blank line and tokenized once; a chunk holds at most `max_tokens`
tokens and ends before the last markdown heading in its last three quarters, else at the best
break point in its second half: a paragraph start, then a line start, else any token. The next
chunk starts `overlap` tokens before the previous one ended (at the heading itself when it ended
before one). Each chunk keeps doc_id, source, member, its page span and char span.

The default tokenizer is built in code, offline and deterministically, with the `tokenizers`
library: a vocabulary-free word-level model over a Whitespace + single-digit pre-tokenizer, so one
token = one word, one run of punctuation or one digit (a subword BPE splits rare words further,
so its counts are higher). For exact counts for a given model pass `--tokenizer` with its
tokenizer.json (e.g. the Nougat checkpoint's).
"""

from __future__ import annotations

import argparse
import bisect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from nougat_dist.errors import MissingInputError, UsageError
from nougat_dist.flags import option
from nougat_dist.stages.options import add_option_flags, options_from_args, columns as _columns
from nougat_dist.stages.text import CHUNKS_SCHEMA, PAGE_SEPARATOR
from nougat_dist.store.index import add_allow_partial, require_finished
from nougat_dist.store.layout import CHUNKS_DIR, OutputDir
from nougat_dist.store.shards import (ShardWriter, clear_scratch, group_starts, iter_batches,
                                      scratch_dir, shard_paths, whole_groups)

log = logging.getLogger(__name__)


def default_tokenizer():  # -> tokenizers.Tokenizer
    """The offline default: words, punctuation runs and single digits are one token each."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    return tok


def load_tokenizer(path: str | Path | None):  # -> tokenizers.Tokenizer
    """A tokenizer.json file (e.g. the Nougat checkpoint's), or the default when path is None."""
    if path is None:
        return default_tokenizer()
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise MissingInputError(f"--tokenizer {path}: no tokenizer.json there")
    return Tokenizer.from_file(str(p))


@dataclass(frozen=True, kw_only=True)
class ChunkOptions:
    """Chunk sizes (flag = field name with dashes)."""

    max_tokens: int = option(512, "Most tokens in one chunk.")
    overlap: int = option(64,
        "Tokens each chunk repeats from the end of the previous chunk of the same document (must "
        "be below half of max_tokens).")
    rows_per_file: int = option(100_000,
        "Most chunks per Parquet shard in chunks/ (a shard also ends at 256 MB).")

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise UsageError("--max-tokens must be >= 2")
        if not 0 <= self.overlap < self.max_tokens // 2:
            raise UsageError("--overlap must be >= 0 and below half of --max-tokens, so every "
                             "chunk moves forward")


# Break-point priorities: a chunk prefers to end right before a heading, then a paragraph...
_HEADING, _PARAGRAPH, _LINE, _TOKEN = 3, 2, 1, 0


def _break_priorities(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """For each token, how good a place it is to start a chunk, from the whitespace between the
    previous token with content and this one's first non-space character. Works whether the
    tokenizer drops whitespace (the default) or makes tokens of it (byte-level BPE)."""
    prio = []
    last_end = 0
    for i, (start, end) in enumerate(offsets):
        piece = text[start:end]
        content = len(piece) - len(piece.lstrip())
        if content == len(piece):
            prio.append(_TOKEN)  # whitespace-only token: never start a chunk with it
            continue
        c = start + content
        newlines = text.count("\n", last_end, c)
        if i == 0 or last_end == 0:
            prio.append(_HEADING)
        elif newlines >= 2:
            prio.append(_HEADING if text.startswith("#", c) else _PARAGRAPH)
        elif newlines == 1:
            prio.append(_LINE)
        else:
            prio.append(_TOKEN)
        last_end = end
    return prio


def chunk_spans(prio: Sequence[int], max_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Token index ranges [start, end) of the chunks of one document.

    prio[i] says how good it is to end a chunk right before token i. A chunk ends before the
    latest heading in its last three quarters if there is one (a section start is worth a chunk
    only a quarter full), else at the highest-priority break in its second half (the latest among
    equals). Either way it holds tokens beyond the overlap, so every chunk moves forward. The next
    chunk starts `overlap` tokens back, except at a heading, where it starts at the heading.
    """
    n = len(prio)
    spans: list[tuple[int, int]] = []
    start = 0
    while start < n:
        limit = start + max_tokens
        if limit >= n:
            spans.append((start, n))
            break
        lo = start + max(overlap + 1, max_tokens // 4)
        headings = [i for i in range(lo, limit + 1) if prio[i] == _HEADING]
        if headings:
            best = headings[-1]
        else:
            best = max(range(start + max(overlap + 1, max_tokens // 2), limit + 1), key=lambda i: (prio[i], i))
        spans.append((start, best))
        # A new section starts clean: repeating the end of the previous one adds nothing.
        start = best if prio[best] == _HEADING else best - overlap
    return spans


def chunk_document(doc_id: str, source: str, member: str | None, pages: Sequence[tuple[int, str]],
                   tokenizer, opts: ChunkOptions) -> list[dict]:
    """The chunks of one clean document (pages = (page number, text) in order)."""
    text = PAGE_SEPARATOR.join(t for _, t in pages)
    page_starts, pos = [], 0
    for _, t in pages:
        page_starts.append(pos)
        pos += len(t) + len(PAGE_SEPARATOR)
    offsets = tokenizer.encode(text, add_special_tokens=False).offsets
    # Tokenizers may emit zero-width tokens (special/added tokens); they cannot carry a break.
    offsets = [(s, e) for s, e in offsets if e > s]
    rows = []
    for i, (s, e) in enumerate(chunk_spans(_break_priorities(text, offsets), opts.max_tokens, opts.overlap)):
        c0, c1 = offsets[s][0], offsets[e - 1][1]
        # Whitespace at either end (byte-level tokenizers make tokens of it) is not content.
        piece = text[c0:c1]
        c0 += len(piece) - len(piece.lstrip())
        c1 -= len(piece) - len(piece.rstrip())
        rows.append({
            "chunk_id": f"{doc_id}-{i}", "doc_id": doc_id, "source": source, "member": member,
            "chunk_index": i,
            "page_start": pages[bisect.bisect_right(page_starts, c0) - 1][0],
            "page_end": pages[bisect.bisect_right(page_starts, c1 - 1) - 1][0],
            "char_start": c0, "char_end": c1, "n_tokens": e - s, "text": text[c0:c1],
        })
    return rows


def _chunk_into(writer: ShardWriter, batches: Iterator[pa.RecordBatch], tokenizer,
                opts: ChunkOptions) -> dict:
    """Chunk a stream of clean pages (documents contiguous, as clean writes them) into writer."""
    n_docs = n_chunks = n_tokens = 0
    rows: list[dict] = []
    for table in whole_groups(_with_doc_ord(batches), "ord"):
        doc_ids, sources, members, pages, texts = _columns(
            table, ["doc_id", "source", "member", "page", "text"])
        starts = group_starts(table, "ord")
        for a, b in zip(starts, [*starts[1:], len(doc_ids)]):
            got = sorted(zip(pages[a:b], texts[a:b]), key=lambda r: r[0])
            made = chunk_document(doc_ids[a], sources[a], members[a], got, tokenizer, opts)
            n_docs += 1
            n_chunks += len(made)
            n_tokens += sum(c["n_tokens"] for c in made)
            rows += made
        if len(rows) >= 4096:
            writer.write(pa.Table.from_pylist(rows, schema=CHUNKS_SCHEMA))
            rows = []
    writer.write(pa.Table.from_pylist(rows, schema=CHUNKS_SCHEMA))
    return {"documents": n_docs, "chunks": n_chunks, "tokens": n_tokens}


_COLUMNS = ["doc_id", "source", "member", "page", "text"]


def chunk(out_dir: Path, opts: ChunkOptions = ChunkOptions(), tokenizer_path: str | None = None) -> dict:
    """Run the chunk stage on a cleaned output dir; write chunks/ and return counts.

    Streams clean/pages/ (written in document order, then page order) one document at a time.
    """
    out_dir = Path(out_dir)
    layout = OutputDir(out_dir)
    if not shard_paths(layout.clean_pages):
        raise MissingInputError(f"{layout.clean_pages} not found: run `nougat-dist clean {out_dir}` first")
    tokenizer = load_tokenizer(tokenizer_path)
    scratch = scratch_dir(out_dir, "chunk")
    try:
        with ShardWriter(layout.chunks, CHUNKS_SCHEMA, scratch, max_shard_rows=opts.rows_per_file) as writer:
            stats = _chunk_into(writer, iter_batches(layout.clean_pages, _COLUMNS), tokenizer, opts)
        n_files = len(shard_paths(layout.chunks))
    finally:
        clear_scratch(out_dir, "chunk")
    return {**stats, "files": n_files,
            "tokenizer": str(tokenizer_path) if tokenizer_path else "default (words/punctuation/digits)"}


def chunk_increment(out_dir: Path, increment: int, clean_pages: Sequence[Path],
                    opts: ChunkOptions = ChunkOptions(), tokenizer: object = None) -> dict:
    """Chunk one increment's clean/pages/ shards into `train-iNNNNN-*` shards of chunks/."""
    out_dir = Path(out_dir)
    stage = f"chunk-{increment}"
    scratch = scratch_dir(out_dir, stage)

    def batches() -> Iterator[pa.RecordBatch]:
        for path in clean_pages:
            with pq.ParquetFile(path) as f:
                yield from f.iter_batches(batch_size=4096, columns=_COLUMNS)

    try:
        with ShardWriter(OutputDir(out_dir).chunks, CHUNKS_SCHEMA, scratch,
                         max_shard_rows=opts.rows_per_file, increment=increment) as writer:
            stats = _chunk_into(writer, batches(), tokenizer or default_tokenizer(), opts)
    finally:
        clear_scratch(out_dir, stage)
    return stats


def _with_doc_ord(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Number the documents of a stream whose documents are contiguous (clean/pages/), so that
    whole_groups can cut it by document."""
    import numpy as np

    ord_, last = -1, None
    for batch in batches:
        ids = batch.column("doc_id").to_pylist()
        out = np.empty(len(ids), dtype=np.int64)
        for i, doc_id in enumerate(ids):
            if doc_id != last:
                ord_, last = ord_ + 1, doc_id
            out[i] = ord_
        yield batch.append_column("ord", pa.array(out))


# --- command line --------------------------------------------------------------------------------

def add_chunk_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", type=Path, help="an output dir that `clean` has run on")
    parser.add_argument("--tokenizer", default=None,
                        help="a tokenizer.json (or a dir holding one, e.g. the Nougat checkpoint) to "
                             "count tokens with; default: a built-in word/punctuation/digit "
                             "tokenizer that needs no download")
    add_option_flags(parser, ChunkOptions)
    add_allow_partial(parser)


def run_chunk(args: argparse.Namespace) -> int:
    require_finished(args.output, args.allow_partial)
    opts = options_from_args(args, ChunkOptions)
    stats = chunk(args.output, opts, args.tokenizer)
    print(f"chunk: {stats['chunks']} chunks ({stats['tokens']} tokens, tokenizer {stats['tokenizer']}) "
          f"from {stats['documents']} documents in {stats['files']} file(s) under {args.output / CHUNKS_DIR}")
    return 0

