"""Upload a job's Parquet dataset to a Hugging Face Hub dataset repo, with a generated card.

Files go up with huggingface_hub's `upload_large_folder`: many shards in as many commits as it
takes, every failed step (HTTP 429 and 5xx included) retried, progress kept under
OUTPUT/.cache/huggingface/ so that the same command after a crash sends only what the repo does
not have yet. The card (README.md, built with `DatasetCardData`) is written into OUTPUT and goes
up with the data; its configs point at the shard globs. The token comes from huggingface_hub's
usual places (HF_TOKEN, `huggingface-cli login`) or `--token-env NAME`; it is passed to the API
only and never printed.

Note: the `source` columns hold each document's path relative to the input it was found under
(absolute with --absolute-source); page rows committed by a release before that keep the path
they were written with: check them before a public push. stats.json itself stays local: the repo
gets run_stats.json, the same figures without local paths and host names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from nougat_dist.errors import MissingInputError, UsageError
from nougat_dist.store.finalize import status_counts
from nougat_dist.store.index import chunk_paths, committed_models
from nougat_dist.store.layout import CLEAN_REPORT_FILE, DOCUMENTS_DIR, OutputDir
from nougat_dist.store.shards import shard_glob
from nougat_dist.stages.text import CHUNKS_SCHEMA, CLEAN_DOCUMENTS_SCHEMA, CLEAN_PAGES_SCHEMA
from nougat_dist.store.layout import CHUNKS_DIR, CLEAN_DIR
from nougat_dist.store.chunks import DOCUMENTS_SCHEMA, PAGES_DIR, PAGES_SCHEMA, TMP_PREFIX
from nougat_dist.store.index import add_allow_partial, require_finished

log = logging.getLogger(__name__)

CARD_FILE = "README.md"


@dataclass(frozen=True)
class Config:
    """One dataset config of the card: a name, its files (globs, relative) and its schema."""

    name: str
    pattern: str
    schema: pa.Schema
    description: str


CONFIGS = (
    Config("chunks", shard_glob(CHUNKS_DIR), CHUNKS_SCHEMA,
           "token-limited chunks of the cleaned documents, for pretraining or RAG"),
    Config("documents", shard_glob(DOCUMENTS_DIR), DOCUMENTS_SCHEMA, "one row per document, raw Nougat text"),
    Config("pages", f"{PAGES_DIR}/part-*.parquet", PAGES_SCHEMA,
           "one row per page as Nougat wrote it, failures included"),
    Config("clean_documents", shard_glob(f"{CLEAN_DIR}/documents"), CLEAN_DOCUMENTS_SCHEMA,
           "documents after clean/filter/dedup"),
    Config("clean_pages", shard_glob(f"{CLEAN_DIR}/pages"), CLEAN_PAGES_SCHEMA, "pages after clean/filter/dedup"),
)
# Side files uploaded as they are (reports a reader of the dataset may want).
#: stats.json as the repo gets it (written by `upload`): the job's figures, versions, run ids and
#: settings, without what only means something on the machine that ran it.
PUBLIC_STATS_FILE = "run_stats.json"
#: Settings that name local paths: the inputs and output are dropped, a checkpoint keeps its name.
_LOCAL_SETTINGS = ("input", "output")
EXTRA_FILES = (PUBLIC_STATS_FILE, f"{CLEAN_DIR}/{CLEAN_REPORT_FILE}", shard_glob(f"{CLEAN_DIR}/dropped"))


@dataclass(frozen=True)
class PlannedFile:
    """A local file and where it goes in the repo."""

    local: Path
    path_in_repo: str
    size: int


def public_stats(out_dir: Path) -> str | None:
    """run_stats.json's text: stats.json without local paths (--input, --output, the checkpoint's
    folder) and host names (per rank, per attempt); None before the job has finished."""
    path = OutputDir(out_dir).stats
    if not path.is_file():
        return None
    stats = json.loads(path.read_text(encoding="utf-8"))
    settings = stats.get("config") or {}
    for key in _LOCAL_SETTINGS:
        settings.pop(key, None)
    if settings.get("checkpoint"):
        settings["checkpoint"] = Path(settings["checkpoint"]).name
    for rank in stats.get("per_rank") or []:
        rank.pop("host", None)
    for attempt in stats.get("attempts") or []:
        attempt.pop("hosts", None)
    return json.dumps(stats, indent=2, sort_keys=True) + "\n"


def write_public_stats(out_dir: Path) -> None:
    """OUTPUT/run_stats.json from stats.json, rewritten only when it changed (a new mtime makes
    upload_large_folder send it again)."""
    from nougat_dist.store.chunks import atomic_write_text

    text = public_stats(out_dir)
    path = out_dir / PUBLIC_STATS_FILE
    if text is not None and (not path.is_file() or path.read_text(encoding="utf-8") != text):
        atomic_write_text(text, path)


def planned_files(out_dir: Path) -> list[PlannedFile]:
    """Every file to upload, data first, in a stable order (manifest, stats.json and logs stay
    local; run_stats.json goes instead of stats.json)."""
    names: list[str] = []
    for cfg in CONFIGS:
        names += sorted(str(p.relative_to(out_dir)) for p in out_dir.glob(cfg.pattern)
                        if not p.name.startswith(TMP_PREFIX))
    for pattern in EXTRA_FILES:
        names += sorted(str(p.relative_to(out_dir)) for p in out_dir.glob(pattern) if p.is_file())
    if not any(n.endswith(".parquet") for n in names):
        raise MissingInputError(f"{out_dir}: no Parquet output to upload (pages/, documents/, "
                                f"chunks/): run the job (and clean/chunk) first")
    return [PlannedFile(out_dir / n, n, (out_dir / n).stat().st_size) for n in names]


def _rows(paths: Sequence[Path]) -> int:
    return sum(pq.read_metadata(p).num_rows for p in paths)


def _schema_table(schema: pa.Schema) -> str:
    lines = ["| column | type |", "| --- | --- |"]
    # Types in backticks: `list<item: string>` would otherwise render as an HTML tag.
    lines += [f"| {f.name} | `{f.type}`{'' if f.nullable else ' (not null)'} |" for f in schema]
    return "\n".join(lines)


def dataset_card(out_dir: Path, repo_id: str, only: Sequence[str] | None = None) -> str:
    """The README.md for the dataset repo: YAML configs for the Parquet files present, stats,
    schemas and how the data was made. Depends only on the files, so it is reproducible.
    `only`: the configs to list (while a job publishes increments, the ones it has sent)."""
    present = [(cfg, sorted(p for p in out_dir.glob(cfg.pattern) if not p.name.startswith(TMP_PREFIX)))
               for cfg in CONFIGS if only is None or cfg.name in only]
    present = [(cfg, paths) for cfg, paths in present if paths]
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        configs=[{"config_name": cfg.name, "data_files": [{"split": "train", "path": cfg.pattern}],
                  **({"default": True} if i == 0 else {})} for i, (cfg, _) in enumerate(present)],
        tags=["ocr", "nougat"])
    yaml = ["---", data.to_yaml(), "---", ""]

    stats = ["| config | rows | files |", "| --- | --- | --- |"]
    stats += [f"| {cfg.name} | {_rows(paths)} | {len(paths)} |" for cfg, paths in present]
    body = [f"# {repo_id}", "",
            "Text of PDF documents transcribed to Markdown by Meta's Nougat OCR model "
            "(unmodified), run with nougat-dist.", "", "## Contents", ""]
    body += [f"- `{cfg.name}` ({cfg.pattern}): {cfg.description}" for cfg, _ in present]
    body += ["", "## Statistics", ""] + stats
    if chunk_paths(out_dir):  # counted one chunk at a time
        counts = status_counts(out_dir)
        body += ["", "Pages by status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + "."]
        models = sorted(committed_models(out_dir))
        body += ["", "Model: " + "; ".join(f"`{m}` ({d})" for m, d in models) + "."]
    report = out_dir / CLEAN_DIR / CLEAN_REPORT_FILE
    if report.is_file():
        rep = json.loads(report.read_text())
        dropped = ", ".join(f"{k} {v}" for k, v in rep.get("dropped_pages", {}).items()) or "none"
        body += ["", f"Clean: kept {rep['pages_kept']} of {rep['pages_in']} pages; dropped: {dropped}."]
    body += ["", "## How it was made", "",
             "1. PDFs (loose files and members of RAR/ZIP/TAR archives) were deduplicated by the "
             "sha256 of their bytes (`doc_id`).",
             "2. Every page was rendered at 96 dpi and transcribed by Nougat, with the stock CLI's "
             "preprocessing and markdown postprocessing; pages that failed are rows with a status.",
             "3. `python -m nougat_dist clean` dropped failed pages, Nougat's MISSING_PAGE markers, "
             "repeated lines, running headers/footers, low-quality and duplicate pages "
             "(see clean/report.json and clean/dropped/).",
             "4. `python -m nougat_dist chunk` cut token-limited chunks at markdown boundaries.",
             "", "## Schema"]
    for cfg, _ in present:
        body += ["", f"### {cfg.name}", "", _schema_table(cfg.schema)]
    return str(DatasetCard("\n".join(yaml + body) + "\n"))


def describe_plan(repo_id: str, files: Sequence[PlannedFile], card: str) -> str:
    """What an upload sends, as text (what --dry-run prints)."""
    lines = [f"create_repo {repo_id} (repo_type=dataset, exist_ok=True)",
             f"upload_large_folder: {len(files) + 1} file(s), "
             f"{sum(f.size for f in files) + len(card.encode())} bytes, in as many commits as it takes"]
    lines += [f"  add {f.path_in_repo} <- {f.local} ({f.size} bytes)" for f in files]
    lines.append(f"  add {CARD_FILE} <- generated dataset card "
                 f"({len(card.encode())} bytes, sha256 {hashlib.sha256(card.encode()).hexdigest()[:16]})")
    return "\n".join(lines)


def upload_patterns() -> list[str]:
    """What upload_large_folder may take from OUTPUT: the configs' globs, the side files, the card
    (globs, not one pattern per file: its filter matches every file against every pattern)."""
    return [cfg.pattern for cfg in CONFIGS] + list(EXTRA_FILES) + [CARD_FILE]


def upload(out_dir: Path, repo_id: str, *, api: Any = None, token: str | None = None,
           private: bool = False, dry_run: bool = False, num_workers: int | None = None,
           echo: Callable[[str], None] = print) -> None:
    """Upload out_dir to the dataset repo_id with huggingface_hub's upload_large_folder.

    The card is written to OUTPUT/README.md first, so the folder is exactly what the repo gets.
    upload_large_folder hashes, pre-uploads and commits files in batches, retries what fails
    (HTTP 429/5xx included) and records its progress under OUTPUT/.cache/huggingface/, so the same
    command after a crash sends only what is not committed yet.
    """
    write_public_stats(out_dir)  # a local file; the dry run lists it too
    files = planned_files(out_dir)
    card = dataset_card(out_dir, repo_id)
    if dry_run:
        echo(describe_plan(repo_id, files, card))
        echo(f"--- {CARD_FILE} ---")
        echo(card)
        return
    from huggingface_hub import HfApi

    from nougat_dist.store.chunks import atomic_write_text

    card_path = out_dir / CARD_FILE
    # Rewritten only when it changed: a new mtime makes upload_large_folder send it again.
    if not card_path.is_file() or card_path.read_text(encoding="utf-8") != card:
        atomic_write_text(card, card_path)
    api = api if api is not None else HfApi(token=token)
    api.upload_large_folder(repo_id=repo_id, folder_path=out_dir, repo_type="dataset",
                            private=private, allow_patterns=upload_patterns(),
                            num_workers=num_workers, print_report=False)
    stale = remove_stale(api, repo_id, files)
    echo(f"uploaded {len(files) + 1} file(s) to datasets/{repo_id}"
         + (f"; removed {len(stale)} data file(s) the output no longer has" if stale else ""))


def remove_stale(api: Any, repo_id: str, files: Sequence[PlannedFile]) -> list[str]:
    """Delete the repo's files under the dataset's globs that the output no longer has (one
    commit): shards renamed by a later clean/chunk (train-00000-of-00002 after -of-00001, or
    whole tables after increments), or chunks rewritten away. Left there, the card's globs would
    read their rows twice."""
    from fnmatch import fnmatch

    from huggingface_hub import CommitOperationDelete

    info = api.repo_info(repo_id, repo_type="dataset", revision="main")
    local = {f.path_in_repo for f in files}
    globs = [p for p in upload_patterns() if "*" in p]
    stale = sorted(s.rfilename for s in (info.siblings or [])
                   if s.rfilename not in local and any(fnmatch(s.rfilename, g) for g in globs))
    if stale:
        api.create_commit(repo_id, [CommitOperationDelete(path_in_repo=f) for f in stale],
                          repo_type="dataset", commit_message="nougat-dist: remove replaced shards")
    return stale


def add_upload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", type=Path, help="the job output dir (after clean and chunk, ideally)")
    parser.add_argument("repo_id", help="the Hub dataset repo, e.g. my-org/papers-ocr (created if missing)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the files it would send and the dataset card; contact nothing")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="upload threads (default: huggingface_hub's, all cores but 2, at least 2)")
    parser.add_argument("--token-env", default=None,
                        help="name of an environment variable holding the Hub token (default: "
                             "huggingface_hub's HF_TOKEN or saved login); the token is never printed")
    add_allow_partial(parser)


def run_upload(args: argparse.Namespace) -> int:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as e:
        raise UsageError(f"{args.repo_id}: not a Hub repo id (ORG/NAME): {e}") from None
    require_finished(args.output, args.allow_partial)
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise UsageError(f"--token-env {args.token_env}: that environment variable is empty or unset")
    upload(args.output, args.repo_id, token=token, private=args.private, dry_run=args.dry_run,
           num_workers=args.num_workers)
    return 0
