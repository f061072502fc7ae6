"""Find the documents a job should read, and open their bytes."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

LIST_SUFFIXES = (".txt", ".lst", ".list")
_GLOB_CHARS = set("*?[")


class InputError(ValueError):
    """An input given on the command line cannot be used; nothing has started yet."""


@dataclass(frozen=True, order=True)
class Source:
    """One document: a file, or (later) a member of an archive file."""

    source: str
    member: str | None = None

    @property
    def name(self) -> str:
        return self.member or self.source


def _is_pdf_name(p: str | Path) -> bool:
    return str(p).lower().endswith(".pdf")


def _walk_dir(root: Path) -> list[Source]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        found.extend(Source(str(Path(dirpath) / f)) for f in sorted(filenames) if _is_pdf_name(f))
    return found


def _read_list_file(path: Path) -> list[Source]:
    base = path.parent
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        # Relative entries are relative to the list file, so a list travels with its folder.
        out.append(Source(str(p if p.is_absolute() else base / p)))
    return out


def discover(inputs: Iterable[str]) -> list[Source]:
    """Expand command-line inputs into documents, in a stable order, without duplicates.

    Paths given directly must exist (a typo is an error before any work starts); entries of list
    files that do not exist are kept and become error rows, since one stale line in a list of a
    million files should not stop the job.
    """
    sources: list[Source] = []
    missing: list[str] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            sources.extend(_walk_dir(p))
        elif p.is_file():
            if p.suffix.lower() in LIST_SUFFIXES:
                sources.extend(_read_list_file(p))
            else:
                sources.append(Source(str(p)))
        elif _GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                missing.append(f"{raw} (glob matched nothing)")
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    sources.extend(_walk_dir(mp))
                elif mp.is_file():
                    sources.append(Source(str(mp)))
        else:
            missing.append(raw)
    if missing:
        raise InputError("input not found: " + ", ".join(missing)
                         + " — check the path, or put paths that may be missing in a list file")
    seen: set[Source] = set()
    unique = []
    for s in sources:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def read_bytes(src: Source) -> bytes:
    """The document's bytes. Raises OSError (e.g. FileNotFoundError) when it cannot be read."""
    if src.member is not None:
        raise NotImplementedError("archive members are not supported yet")
    with open(src.source, "rb") as f:
        return f.read()
