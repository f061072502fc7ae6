"""Upload a job's Parquet dataset to a Hugging Face Hub dataset repo, with a generated card.

Files go up with `HfApi.create_commit` and `CommitOperationAdd`, in batches of at most
`--files-per-commit` files, the dataset card (README.md) in the last commit so the repo shows a
card only once its data is there. A commit that fails with HTTP 429 or 5xx is retried with
exponential backoff (honouring Retry-After); any other error stops the upload at once, since
retrying a 401 or 404 cannot help. The token comes from huggingface_hub's usual places (HF_TOKEN,
`huggingface-cli login`) or `--token-env NAME`; it is passed to the API only and never printed.

Note: the `source` columns hold the input paths or URIs as the job saw them; check them before
pushing to a public repo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from nougat_dist.store.finalize import status_counts
from nougat_dist.store.index import chunk_paths, committed_models
from nougat_dist.store.layout import CLEAN_REPORT_FILE, DOCUMENTS_DIR
from nougat_dist.store.shards import shard_glob
from nougat_dist.stages.postprocess import CHUNKS_DIR, CHUNKS_SCHEMA, CLEAN_DIR, CLEAN_DOCUMENTS_SCHEMA, CLEAN_PAGES_SCHEMA
from nougat_dist.store.chunks import DOCUMENTS_SCHEMA, PAGES_DIR, PAGES_SCHEMA, TMP_PREFIX

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


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
EXTRA_FILES = ("stats.json", f"{CLEAN_DIR}/{CLEAN_REPORT_FILE}", shard_glob(f"{CLEAN_DIR}/dropped"))


@dataclass(frozen=True)
class PlannedFile:
    """A local file and where it goes in the repo."""

    local: Path
    path_in_repo: str
    size: int


def planned_files(out_dir: Path) -> list[PlannedFile]:
    """Every file to upload, data first, in a stable order (manifest and logs stay local)."""
    names: list[str] = []
    for cfg in CONFIGS:
        names += sorted(str(p.relative_to(out_dir)) for p in out_dir.glob(cfg.pattern)
                        if not p.name.startswith(TMP_PREFIX))
    for pattern in EXTRA_FILES:
        names += sorted(str(p.relative_to(out_dir)) for p in out_dir.glob(pattern) if p.is_file())
    if not any(n.endswith(".parquet") for n in names):
        raise FileNotFoundError(f"{out_dir}: no Parquet output to upload (pages/, documents/, "
                                f"chunks/): run the job (and clean/chunk) first")
    return [PlannedFile(out_dir / n, n, (out_dir / n).stat().st_size) for n in names]


def _rows(paths: Sequence[Path]) -> int:
    return sum(pq.read_metadata(p).num_rows for p in paths)


def _schema_table(schema: pa.Schema) -> str:
    lines = ["| column | type |", "| --- | --- |"]
    # Types in backticks: `list<item: string>` would otherwise render as an HTML tag.
    lines += [f"| {f.name} | `{f.type}`{'' if f.nullable else ' (not null)'} |" for f in schema]
    return "\n".join(lines)


def dataset_card(out_dir: Path, repo_id: str) -> str:
    """The README.md for the dataset repo: YAML configs for the Parquet files present, stats,
    schemas and how the data was made. Depends only on the files, so it is reproducible."""
    present = [(cfg, sorted(p for p in out_dir.glob(cfg.pattern) if not p.name.startswith(TMP_PREFIX)))
               for cfg in CONFIGS]
    present = [(cfg, paths) for cfg, paths in present if paths]
    yaml = ["---", "configs:"]
    for i, (cfg, _) in enumerate(present):
        yaml += [f"- config_name: {cfg.name}", "  data_files:", "  - split: train", f"    path: {cfg.pattern}"]
        if i == 0:
            yaml.append("  default: true")
    yaml += ["tags:", "- ocr", "- nougat", "---", ""]

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
    return "\n".join(yaml + body) + "\n"


def plan_commits(files: Sequence[PlannedFile], files_per_commit: int) -> list[list[PlannedFile]]:
    """Batches of at most files_per_commit files, in order."""
    return [list(files[i:i + files_per_commit]) for i in range(0, len(files), files_per_commit)]


def describe_plan(repo_id: str, batches: Sequence[Sequence[PlannedFile]], card: str) -> str:
    """The exact operations an upload performs, as text (what --dry-run prints)."""
    lines = [f"create_repo {repo_id} (repo_type=dataset, exist_ok=True)"]
    for i, batch in enumerate(batches):
        lines.append(f"commit {i + 1}/{len(batches)}: {len(batch) + (i == len(batches) - 1)} operation(s)")
        lines += [f"  add {f.path_in_repo} <- {f.local} ({f.size} bytes)" for f in batch]
        if i == len(batches) - 1:
            lines.append(f"  add {CARD_FILE} <- generated dataset card "
                         f"({len(card.encode())} bytes, sha256 {hashlib.sha256(card.encode()).hexdigest()[:16]})")
    return "\n".join(lines)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def with_retries(call: Callable[[], Any], *, what: str, retries: int = 6, base_delay: float = 2.0,
                 max_delay: float = 120.0, sleep: Callable[[float], None] = time.sleep) -> Any:
    """Run call(); on HTTP 429/5xx wait and retry (Retry-After, else base_delay·2^attempt)."""
    from huggingface_hub.utils import HfHubHTTPError

    for attempt in range(retries + 1):
        try:
            return call()
        except HfHubHTTPError as e:
            status = _status(e)
            if status not in RETRY_STATUSES or attempt == retries:
                raise
            retry_after = getattr(e.response, "headers", {}).get("Retry-After")
            delay = min(max_delay, float(retry_after) if retry_after and retry_after.isdigit()
                        else base_delay * 2 ** attempt)
            log.warning("%s: HTTP %s, retry %d/%d in %.0f s", what, status, attempt + 1, retries, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def upload(out_dir: Path, repo_id: str, *, api: Any = None, token: str | None = None,
           private: bool = False, files_per_commit: int = 100, dry_run: bool = False,
           retries: int = 6, sleep: Callable[[float], None] = time.sleep,
           echo: Callable[[str], None] = print) -> list[Any]:
    """Upload out_dir to the dataset repo_id; returns the commit infos (none on a dry run)."""
    if files_per_commit < 1:
        raise ValueError("--files-per-commit must be >= 1")
    files = planned_files(out_dir)
    card = dataset_card(out_dir, repo_id)
    batches = plan_commits(files, files_per_commit)
    if dry_run:
        echo(describe_plan(repo_id, batches, card))
        echo(f"--- {CARD_FILE} ---")
        echo(card)
        return []
    from huggingface_hub import CommitOperationAdd, HfApi

    api = api if api is not None else HfApi(token=token)
    with_retries(lambda: api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True),
                 what="create_repo", retries=retries, sleep=sleep)
    infos = []
    for i, batch in enumerate(batches):
        ops = [CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local)) for f in batch]
        if i == len(batches) - 1:
            ops.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card.encode()))
        message = f"nougat-dist upload {i + 1}/{len(batches)}"
        info = with_retries(lambda: api.create_commit(repo_id, ops, commit_message=message, repo_type="dataset"),
                            what=f"commit {i + 1}/{len(batches)}", retries=retries, sleep=sleep)
        echo(f"committed {i + 1}/{len(batches)}: {len(ops)} file(s)")
        infos.append(info)
    return infos


def add_upload_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", type=Path, help="the job output dir (after clean and chunk, ideally)")
    parser.add_argument("repo_id", help="the Hub dataset repo, e.g. my-org/papers-ocr (created if missing)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the exact operations and the dataset card; contact nothing")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--files-per-commit", type=int, default=100,
                        help="files per Hub commit; large datasets go up in several commits (default: 100)")
    parser.add_argument("--retries", type=int, default=6,
                        help="retries of a call that failed with HTTP 429 or 5xx (default: 6)")
    parser.add_argument("--token-env", default=None,
                        help="name of an environment variable holding the Hub token (default: "
                             "huggingface_hub's HF_TOKEN or saved login); the token is never printed")


def run_upload(args: argparse.Namespace) -> int:
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise SystemExit(f"--token-env {args.token_env}: that environment variable is empty or unset")
    upload(args.output, args.repo_id, token=token, private=args.private, dry_run=args.dry_run,
           files_per_commit=args.files_per_commit, retries=args.retries)
    return 0
