"""Job configuration: one dataclass, mapped onto argparse flags (and YAML keys of the same name)."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

DEFAULT_MODEL_TAG = "0.1.0-small"


class ConfigError(ValueError):
    """A configuration the job cannot run with; the message says what to change."""


@dataclass(kw_only=True)
class Config:
    """Everything a run needs. Field docstrings double as `--help` text (see `FIELD_HELP`)."""

    input: list[str] = field(default_factory=list)
    output: str = ""
    checkpoint: str | None = None
    model: str = DEFAULT_MODEL_TAG
    batch_size: int = 0
    num_workers: int = 2
    prefetch_factor: int = 2
    render_timeout: float = 120.0
    full_precision: bool = False
    markdown: bool = True
    skipping: bool = True
    device: str = "auto"
    unit_pages: int = 16
    steal: bool = True
    commit_pages: int = 256
    commit_seconds: float = 60.0
    rebuild_manifest: bool = False
    log_level: str = "INFO"
    test_fake_model: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise ConfigError(f"--batch-size must be >= 0 (0 = automatic), got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ConfigError(f"--prefetch-factor must be >= 1, got {self.prefetch_factor}")
        if self.render_timeout <= 0:
            raise ConfigError(f"--render-timeout must be > 0 seconds, got {self.render_timeout}")
        if self.unit_pages < 1:
            raise ConfigError(f"--unit-pages must be >= 1, got {self.unit_pages}")
        if self.commit_pages < 1:
            raise ConfigError(f"--commit-pages must be >= 1, got {self.commit_pages}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"--device must be auto, cuda or cpu, got {self.device!r}")


FIELD_HELP: dict[str, str] = {
    "input": "PDF files, directories (searched recursively for *.pdf), glob patterns, or list files "
    "(.txt/.lst: one path per line). Give as many as you like.",
    "output": "Output directory. Holds manifest.parquet (the resume checkpoint), pages/ (one Parquet "
    "row per page, committed in chunks), documents.parquet, stats.json and logs/. Run the same "
    "command again to resume.",
    "checkpoint": "Nougat checkpoint directory. If it does not exist, nougat's own downloader fetches "
    "--model into it (needs internet). Default: $NOUGAT_CHECKPOINT or torch hub's nougat-<model> dir.",
    "model": "Nougat model tag to download when no checkpoint is present (as the nougat CLI's --model).",
    "batch_size": "Pages per model.inference call on each rank. 0 = automatic: nougat's rule on GPU "
    "(0.3 per GB of memory), 4 on CPU.",
    "num_workers": "DataLoader worker processes per rank that render pages ahead of the model "
    "(0 = render in the main process).",
    "prefetch_factor": "Batches each DataLoader worker prepares ahead.",
    "render_timeout": "Seconds one page may take to render. A page that hangs or crashes the "
    "renderer (hostile PDFs can do both) becomes a render_error row; the job goes on. Needs "
    "--num-workers >= 1.",
    "full_precision": "Run the model in float32 instead of bfloat16 (same meaning as the nougat CLI).",
    "markdown": "Apply nougat's markdown_compatible postprocessing (default on; --no-markdown as the CLI).",
    "skipping": "Apply nougat's failure-detection heuristic (default on; --no-skipping as the CLI).",
    "device": "auto (cuda:LOCAL_RANK when a GPU is visible, else CPU), cuda, or cpu.",
    "unit_pages": "Largest work unit, in pages. Long documents are split into units of at most this "
    "many pages so that one book can be spread over several ranks.",
    "steal": "Let idle ranks take queued units from the most loaded rank (--no-steal: static split).",
    "commit_pages": "Commit a Parquet chunk once this many pages of complete units are buffered.",
    "commit_seconds": "Also commit at least this often (seconds), so a crash loses little work.",
    "rebuild_manifest": "Rebuild out/manifest.parquet when the inputs changed since it was written "
    "(otherwise that is an error, so a resumed run never mixes two different input sets).",
    "log_level": "Console and log-file level (DEBUG, INFO, WARNING).",
    "test_fake_model": argparse.SUPPRESS,  # testing only: see runner.FakeModel
}

_NEGATED = {"markdown": "--no-markdown", "skipping": "--no-skipping", "steal": "--no-steal"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    """The launcher's argument parser: one flag per Config field."""
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Run the unmodified Nougat OCR model over many PDFs on every GPU (or CPU) of a "
        "torchrun / Slurm job and write a Parquet dataset. Resumable: run the same command again.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = Config()
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        help_text = FIELD_HELP[f.name]
        if f.name == "input":
            parser.add_argument("--input", "-i", nargs="+", default=[], help=help_text)
        elif f.name in _NEGATED:
            parser.add_argument(_NEGATED[f.name], dest=f.name, action="store_false", help=help_text)
        elif isinstance(default, bool):
            parser.add_argument(_flag(f.name), dest=f.name, action="store_true", help=help_text)
        else:
            kind: Any = type(default) if default is not None else str
            parser.add_argument(_flag(f.name), dest=f.name, type=kind, default=default, help=help_text)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse command-line flags into a validated Config (exits with a usage message on error)."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if not ns.input:
        parser.error("--input is required: give PDF files, directories, globs or list files")
    if not ns.output:
        parser.error("--output is required: the directory that will hold the dataset")
    try:
        return Config(**vars(ns))
    except ConfigError as e:
        parser.error(str(e))
    raise AssertionError("unreachable")


def output_path(cfg: Config) -> Path:
    return Path(cfg.output)
