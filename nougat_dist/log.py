"""Logging: a file per rank under out/logs/, console output from rank 0 only."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from nougat_dist.store.layout import OutputDir

FORMAT = "%(asctime)s r{rank} %(levelname)s %(name)s: %(message)s"


def setup(out_dir: Path | None, rank: int, level: str = "INFO") -> None:
    """Route every logger (ours, nougat's, torch's) to this rank's file and, on rank 0, the console."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG)
    fmt = logging.Formatter(FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    if out_dir is not None:
        try:
            layout = OutputDir(out_dir)
            layout.logs.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(layout.rank_log(rank), encoding="utf-8")
        except OSError:
            pass  # an unwritable output dir is reported by the job's own check, on the console
        else:
            fh.setLevel(logging.DEBUG)
            fh.setFormatter(fmt)
            root.addHandler(fh)
    if rank == 0:
        ch = logging.StreamHandler(sys.stderr)
        ch.setLevel(getattr(logging, level.upper(), logging.INFO))
        ch.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        root.addHandler(ch)
    logging.captureWarnings(True)
    for noisy in ("PIL", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
