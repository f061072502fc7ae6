"""Logging: a file per rank under out/logs/, console output from rank 0 only."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from nougat_dist.store.layout import OutputDir

FORMAT = "%(asctime)s r{rank} %(levelname)s %(name)s: %(message)s"

# Third-party warnings that every run prints and that say nothing about the job: (category,
# message regex, module regex of the code that warns). Each names one known message from one
# module, so any other warning, from these modules too, still shows.
KNOWN_HARMLESS: tuple[tuple[type[Warning], str, str], ...] = (
    # timm/nougat script small helpers at import; nougat is used unmodified.
    (FutureWarning, r"`torch\.jit\.script` is deprecated", r"torch\.jit\._script"),
    # nougat's Swin encoder calls meshgrid without indexing=; the default is the one it needs.
    (UserWarning, r"torch\.meshgrid: in an upcoming release, it will be required to pass the "
                  r"indexing argument", r"torch\.functional"),
    # nougat's repetition check takes the variance of a one-token window on the first steps.
    (UserWarning, r"var\(\): degrees of freedom is <= 0", r"nougat\.model"),
)


def filter_known_warnings() -> None:
    """Silence KNOWN_HARMLESS (before torch and nougat are imported: some warn at import)."""
    for category, message, module in KNOWN_HARMLESS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


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
