"""Find the documents a job should read, and open their bytes.

Archives (.rar, .zip, .tar, .tar.gz, .tgz) given directly, found in directories or listed in list
files expand into one Source per PDF member; see `archives` for how members are read and how a
password is given (env NOUGAT_DIST_ARCHIVE_PASSWORD).
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import archives

log = logging.getLogger(__name__)
LIST_SUFFIXES = (".txt", ".lst", ".list")
#: Archive members that are documents (tests widen it to read other archives' text members).
MEMBER_SUFFIXES: tuple[str, ...] = (".pdf",)
_GLOB_CHARS = set("*?[")


class InputError(ValueError):
    """An input given on the command line cannot be used; nothing has started yet."""


@dataclass(frozen=True, order=True)
class Source:
    """One document: a file, or a member of an archive file.

    member is the archive-internal name; "" (archives.WHOLE_ARCHIVE) stands for an archive that
    could not be listed, so that its reason still reaches the manifest as an error row.
    """

    source: str
    member: str | None = None

    @property
    def name(self) -> str:
        return self.member or self.source


def _is_pdf_name(p: str | Path) -> bool:
    return str(p).lower().endswith(".pdf")


def _expand_archive(path: Path) -> list[Source]:
    """One Source per PDF member; an unlistable archive becomes one error Source."""
    if archives.is_later_volume(path):
        # rarfile reads later volumes through the first one; listing them too would repeat
        # (or fail on) every member that spans volumes.
        log.info("skipping %s: a later volume of a multi-volume RAR (read via its first volume)", path)
        return []
    try:
        members = archives.list_members(path, MEMBER_SUFFIXES)
    except archives.ArchiveError as e:
        log.warning("cannot list archive %s: %s", path, e)
        return [Source(str(path), archives.WHOLE_ARCHIVE)]
    if not members:
        log.warning("archive %s holds no PDF", path)
    return [Source(str(path), m) for m in members]


def _file_sources(path: Path) -> list[Source]:
    """A PDF (or any file given by name) is one Source; an archive expands into its PDFs."""
    if archives.archive_kind(path) is not None and path.is_file():
        return _expand_archive(path)
    return [Source(str(path))]


def _walk_dir(root: Path) -> list[Source]:
    found: list[Source] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for f in sorted(filenames):
            if _is_pdf_name(f):
                found.append(Source(str(Path(dirpath) / f)))
            elif archives.archive_kind(f) is not None:
                found.extend(_expand_archive(Path(dirpath) / f))
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
        # A missing entry stays a plain Source, so it becomes a "file not found" error row.
        out.extend(_file_sources(p if p.is_absolute() else base / p))
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
                sources.extend(_file_sources(p))
        elif _GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                missing.append(f"{raw} (glob matched nothing)")
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    sources.extend(_walk_dir(mp))
                elif mp.is_file():
                    sources.extend(_file_sources(mp))
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
    """The document's bytes. Raises OSError (FileNotFoundError, archives.ArchiveError) when they
    cannot be read; an archive member is read into memory, never extracted to disk."""
    if src.member is not None:
        return archives.read_member(src.source, src.member)
    with open(src.source, "rb") as f:
        return f.read()
