"""Where a result came from: the installed nougat-dist version and, when it runs from a git
checkout, the commit (with a `+dirty` mark when the tracked files differ from it)."""

from __future__ import annotations

import importlib.metadata as md
import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent


def git_commit(where: Path = _PACKAGE_DIR) -> str | None:
    """The commit of the checkout holding `where`, or None (an installed wheel, no git)."""
    try:
        top = subprocess.run(["git", "-C", str(where), "rev-parse", "--show-toplevel", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if top.returncode != 0:
            return None
        root, sha = top.stdout.split()
        if Path(root).resolve() != where.parent:
            return None  # a wheel installed inside some other repository's tree
        dirty = subprocess.run(["git", "-C", root, "diff", "--quiet", "HEAD", "--", "nougat_dist"],
                               capture_output=True, timeout=10).returncode != 0
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return sha + ("+dirty" if dirty else "")


def tool_provenance() -> dict[str, str | None]:
    """{'nougat-dist': version, 'nougat-dist-commit': sha or None} for stats.json."""
    try:
        version: str | None = md.version("nougat-dist")
    except md.PackageNotFoundError:
        version = None  # run from a clone that was never pip-installed
    return {"nougat-dist": version, "nougat-dist-commit": git_commit()}
