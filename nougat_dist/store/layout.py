"""Every path of an output directory, spelled once.

Modules ask an `OutputDir` for a path instead of joining string literals, so the layout of
`--output` is readable (and changeable) in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Prefix of files being written: never read as data, deleted on the next start.
TMP_PREFIX = ".tmp-"
PAGES_DIR = "pages"
CLEAN_DIR = "clean"
CHUNKS_DIR = "chunks"
LOGS_DIR = "logs"
MANIFEST_FILE = "manifest.parquet"
DOCUMENTS_DIR = "documents"
#: Where releases before sharded outputs wrote the documents table (removed when documents/ is written).
DOCUMENTS_FILE = "documents.parquet"
SCRATCH_DIR = ".scratch"
CLEAN_REPORT_FILE = "report.json"
STATUS_FILE = "status.json"
STATS_FILE = "stats.json"
FAILURES_FILE = "failures.jsonl"
LEASE_FILE = "lease.json"
SUPERSEDED_DIR = "superseded"
POST_DIR = "post"


@dataclass(frozen=True)
class OutputDir:
    """The output directory of one job and every file in it."""

    root: Path

    def __init__(self, root: Path | str) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def pages(self) -> Path:
        """Committed page chunks (`part-*.parquet`)."""
        return self.root / PAGES_DIR

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def documents(self) -> Path:
        """One row per document: Parquet shards `train-NNNNN-of-NNNNN.parquet` (store/shards)."""
        return self.root / DOCUMENTS_DIR

    @property
    def legacy_documents(self) -> Path:
        """The single-file documents table of older releases: stale once documents/ exists."""
        return self.root / DOCUMENTS_FILE

    @property
    def scratch(self) -> Path:
        """Staging shards and spill files of finalize/clean/chunk; never read as data."""
        return self.root / SCRATCH_DIR

    @property
    def status(self) -> Path:
        """Live status, rewritten by rank 0 every few seconds."""
        return self.root / STATUS_FILE

    @property
    def stats(self) -> Path:
        """Written once at the end of a complete job."""
        return self.root / STATS_FILE

    @property
    def failures(self) -> Path:
        """Written at the end of a job with failed pages or unreadable inputs: one line each."""
        return self.root / FAILURES_FILE

    @property
    def clean(self) -> Path:
        return self.root / CLEAN_DIR

    @property
    def clean_pages(self) -> Path:
        """Sharded, like documents/."""
        return self.clean / "pages"

    @property
    def clean_documents(self) -> Path:
        return self.clean / "documents"

    @property
    def clean_dropped(self) -> Path:
        return self.clean / "dropped"

    @property
    def clean_report(self) -> Path:
        return self.clean / CLEAN_REPORT_FILE

    @property
    def chunks(self) -> Path:
        """Sharded, like documents/."""
        return self.root / CHUNKS_DIR

    @property
    def logs(self) -> Path:
        return self.root / LOGS_DIR

    @property
    def lease(self) -> Path:
        """The single-writer lease (see `nougat_dist.store.lease`)."""
        return self.root / LEASE_FILE

    @property
    def superseded(self) -> Path:
        """Rows taken out of pages/ (retried failures, another model's pages), kept for reference."""
        return self.root / SUPERSEDED_DIR

    @property
    def post(self) -> Path:
        """The ledger of the post stages run beside OCR (--overlap-post; stages/overlap.py)."""
        return self.root / POST_DIR

    def post_file(self, kind: str, increment: int, suffix: str = ".json") -> Path:
        """A ledger file of one increment: `inc` (its documents, .parquet), `clean`/`chunk`/
        `upload` (the stage finished it), `clean-state` (.parquet: texts it kept)."""
        return self.post / f"{kind}-{increment:05d}{suffix}"

    @property
    def post_log(self) -> Path:
        """The log of the post stages' background process."""
        return self.logs / "post.log"

    def published(self) -> list[Path]:
        """What --overlap-post published of complete documents: the ledger and the tables it
        adds increments to. A resume that only adds pages keeps them (a published document's
        pages do not change); a run that changes committed pages removes them with the rest."""
        return [self.post, self.clean_pages, self.clean_documents, self.clean_dropped, self.chunks]

    def rank_log(self, rank: int) -> Path:
        return self.logs / f"rank{rank}.log"

    def derived(self) -> list[Path]:
        """Everything computed from the pages, stale as soon as they change: the one list that
        invalidation (`store.index.invalidate_derived`) removes. The live status is in it because
        a finished job's says "finished"."""
        return [self.documents, self.legacy_documents, self.stats, self.status, self.failures,
                self.clean, self.chunks, self.post]
