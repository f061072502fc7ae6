"""Find the documents a job should read, and open their bytes.

Archives (.rar, .zip, .tar, .tar.gz, .tgz) given directly, found in directories or listed in list
files expand into one Source per PDF member; see `archives` for how members are read and how a
password is given (env NOUGAT_DIST_ARCHIVE_PASSWORD).

Remote inputs (see `download`): an http(s):// URL, an ``hf://`` Hub glob, or such lines in a list
file (``URL`` or ``URL SHA256`` per line; ``.urls`` files are list files too). A remote document's
Source.source is its spec, and its bytes are downloaded into the cache the first time they are
read, so the ranks that inspect a share of the documents also download that share. Remote
archives are the exception: rank 0 downloads them while discovering, because listing their
members needs their bytes.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from nougat_dist.inputs import archives, naming
from nougat_dist.inputs import remote as download

log = logging.getLogger(__name__)
LIST_SUFFIXES = (".txt", ".lst", ".list", ".urls")
#: Archive members that are documents (tests widen it to read other archives' text members).
MEMBER_SUFFIXES: tuple[str, ...] = (".pdf",)
_GLOB_CHARS = naming.GLOB_CHARS


class InputError(ValueError):
    """An input given on the command line cannot be used; nothing has started yet."""


@dataclass(frozen=True, order=True)
class Source:
    """One document: a file, or a member of an archive file.

    source is where it is read (a path as found, or a remote spec); member is the
    archive-internal name; "" (archives.WHOLE_ARCHIVE) stands for an archive that could not be
    listed, so that its reason still reaches the manifest as an error row. root is the input it
    was found under (see `stored_source`); it is not part of a Source's identity.
    """

    source: str
    member: str | None = None
    root: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.member or self.source

    def stored_source(self, absolute: bool = False) -> str:
        """The `source` the dataset stores: relative to the input it was found under, so that
        an upload does not carry local paths (a directory given: the path inside it; a file, a
        glob or a list file: the path from its folder; a URL, an hf:// or bucket listing: the
        path after its prefix, without query or checksum). absolute: the absolute local path,
        or the URL, instead."""
        if download.is_remote(self.source):
            url = download.split_checksum(self.source)[0]
            return printable_name(url if absolute else naming.relative(naming.remote_path(url), self.root))
        if absolute:
            return printable_name(os.path.abspath(self.source))
        return printable_name(naming.relative(os.path.abspath(self.source), self.root, local=True))


def _rooted(sources: list[Source], root: str | None) -> list[Source]:
    return [dataclasses.replace(s, root=root) for s in sources]


def is_utf8(name: str | None) -> bool:
    """Whether a name can be stored as text. A file name whose bytes are not UTF-8 reaches Python
    with surrogate escapes (PEP 383), which Parquet strings cannot hold."""
    if name is None:
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_name(name: str) -> str:
    """The name as valid text: each byte that is not UTF-8 becomes a literal backslash escape
    (``caf\\xe9.pdf``). This is how such a name is stored and shown; it cannot be opened by it."""
    if is_utf8(name):
        return name
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def shown_name(src: Source) -> tuple[str, str | None]:
    """(location, member) as the manifest stores them (see `printable_name`)."""
    return (printable_name(src.source),
            None if src.member is None else printable_name(src.member))


def file_stamp(src: Source) -> tuple[int, int] | None:
    """(size, mtime_ns) of the local file holding the document (the archive, for a member), or
    None (remote, missing, unreadable)."""
    if download.is_remote(src.source):
        return None
    try:
        st = os.stat(src.source)
    except (OSError, ValueError):
        return None
    return st.st_size, st.st_mtime_ns


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
    """PDFs and archives under root. Symlinked directories are followed (corpora are often
    assembled from links), each real directory once, so a link loop ends the descent."""
    found: list[Source] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            log.warning("not descending into %s again: a symlink loop or a second link to it", dirpath)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        for f in sorted(filenames):
            if _is_pdf_name(f):
                found.append(Source(str(Path(dirpath) / f)))
            elif archives.archive_kind(f) is not None:
                found.extend(_expand_archive(Path(dirpath) / f))
    return found


def _remote_spec(line: str, where: str) -> str:
    """A list-file line ``URL`` or ``URL SHA256`` as a download spec."""
    parts = line.split()
    try:
        download.check(parts[0] if parts else line)  # a missing s3fs/gcsfs: fail now, not per row
        if len(parts) == 1:
            download.split_checksum(parts[0])  # validates a #sha256= fragment
            return parts[0]
        if len(parts) == 2:
            return download.with_checksum(parts[0], parts[1])
    except ValueError as e:
        raise InputError(f"{where}: {e}") from e
    raise InputError(f"{where}: expected 'URL' or 'URL SHA256', got {line!r}")


def _read_list_file(path: Path) -> list[Source]:
    base = path.parent
    items: list[Path | str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if download.is_remote(line):
            items.append(_remote_spec(line, f"{path}:{lineno}"))
            continue
        p = Path(line)
        # Relative entries are relative to the list file, so a list travels with its folder.
        # A missing entry stays a plain Source, so it becomes a "file not found" error row.
        items.append(p if p.is_absolute() else base / p)
    _download_archives([i for i in items if isinstance(i, str)])
    out = []
    for item in items:
        # Named from the list's folder (an entry outside it: by its file name).
        out.extend(_rooted(_remote_sources(item), _remote_root(item)) if isinstance(item, str)
                   else _rooted(_file_sources(item), str(base)))
    return out


def _remote_root(spec: str) -> str:
    """The prefix a remote input's sources are named from (see `Source.stored_source`)."""
    return naming.root_of(naming.remote_path(download.split_checksum(spec)[0]), local=False)


def _is_hf_glob(spec: str) -> bool:
    # An hf:// or object-store (s3://, gs://, ...) glob or prefix: listed by download.expand.
    return download.is_listing(spec)


def _download_archives(specs: list[str]) -> None:
    """Download the remote archives among specs in parallel (their members must be listed now).

    Failures are not raised here: `_remote_sources` gets the same error from the downloader's
    memory of failures and turns the archive into an error row.
    """
    wanted = [s for s in specs
              if not _is_hf_glob(s) and archives.archive_kind(download.remote_name(s)) is not None]
    if wanted:
        download.default().fetch_many(wanted)


def _remote_sources(spec: str) -> list[Source]:
    """One remote file as Sources: itself, or one per PDF member of a remote archive."""
    if _is_hf_glob(spec):
        return _hf_sources(spec)
    name = download.remote_name(spec)
    if archives.archive_kind(name) is None:
        return [Source(spec)]
    if archives.is_later_volume(name):
        # Cached files are named by URL hash, so rarfile could not find the other volumes anyway.
        log.warning("skipping %s: a later volume of a multi-volume RAR (remote multi-volume RAR "
                    "is not supported: download the volumes and give the first one)", spec)
        return []
    try:
        local = download.fetch(spec)
        members = archives.list_members(local, MEMBER_SUFFIXES)
    except (download.DownloadError, archives.ArchiveError) as e:
        log.warning("cannot list remote archive %s: %s", spec, e)
        return [Source(spec, archives.WHOLE_ARCHIVE)]
    if not members:
        log.warning("archive %s holds no PDF", spec)
    return [Source(spec, m) for m in members]


def _hf_sources(spec: str) -> list[Source]:
    """The PDFs and archives of a Hub repo matching the spec's glob, like walking a directory."""
    try:
        files = download.expand(spec)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot list {spec}: {e}") from e
    files = [f for f in files if _is_pdf_name(download.remote_name(f))
             or archives.archive_kind(download.remote_name(f)) is not None]
    if not files:
        raise InputError(f"{spec}: no PDF or archive matches the glob")
    _download_archives(files)
    out: list[Source] = []
    for f in files:
        out.extend(_remote_sources(f))
    return out


def discover(inputs: Iterable[str]) -> list[Source]:
    """Expand command-line inputs into documents, in a stable order, without duplicates.

    Paths given directly must exist (a typo is an error before any work starts); entries of list
    files that do not exist are kept and become error rows, since one stale line in a list of a
    million files should not stop the job.
    """
    inputs = list(inputs)  # iterated twice: archives are downloaded first, in parallel
    sources: list[Source] = []
    missing: list[str] = []
    _download_archives([_remote_spec(r, "--input") for r in inputs if download.is_remote(r)])
    for raw in inputs:
        if download.is_remote(raw):
            # Remote inputs are not checked for existence here: a dead link becomes an error row
            # when the document is read, like a stale line of a list file.
            spec = _remote_spec(raw, "--input")
            sources.extend(_rooted(_remote_sources(spec), _remote_root(spec)))
            continue
        found = _local_sources(raw)
        if found is None:
            missing.append(f"{raw} (glob matched nothing)" if _GLOB_CHARS & set(raw) else raw)
        else:
            sources.extend(found)
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


def _local_sources(raw: str) -> list[Source] | None:
    """The sources of one local --input, each with its root; None when it names nothing."""
    p = Path(raw)
    if p.is_dir():
        return _rooted(_walk_dir(p), raw)
    if p.is_file():
        found = _read_list_file(p) if p.suffix.lower() in LIST_SUFFIXES else _file_sources(p)
        return found if p.suffix.lower() in LIST_SUFFIXES else _rooted(found, naming.root_of(raw, True))
    if p.exists() and not _GLOB_CHARS & set(raw):
        return [Source(raw, root=naming.root_of(raw, True))]  # a FIFO or device: an error row says why
    if not _GLOB_CHARS & set(raw):
        return None
    matches = sorted(glob.glob(raw, recursive=True))
    if not matches:
        return None
    found = []
    for m in matches:
        mp = Path(m)
        if mp.is_dir():
            found.extend(_walk_dir(mp))
        elif mp.is_file():
            found.extend(_file_sources(mp))
    return _rooted(found, naming.root_of(raw, True))


def read_bytes(src: Source) -> bytes:
    """The document's bytes. Raises OSError (FileNotFoundError, archives.ArchiveError,
    download.DownloadError) when they cannot be read; an archive member is read into memory, never
    extracted to disk; a remote file is downloaded into the cache once and read from there."""
    path: str | Path = src.source
    if download.is_remote(src.source):
        path = download.fetch(src.source)
    if src.member is not None:
        return archives.read_member(path, src.member)
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(f"not a regular file ({_kind(mode)}): {path}")
        os.set_blocking(fd, True)
        return f.read()


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "directory" if stat.S_ISDIR(mode) else "special file"


def pdf_input(src: Source) -> str | bytes:
    """What to hand pypdfium2.PdfDocument: a local path when there is one (pdfium then reads pages
    lazily instead of holding a whole book in memory), else the bytes (archive members)."""
    if src.member is not None:
        return read_bytes(src)
    if download.is_remote(src.source):
        return str(download.fetch(src.source))
    return src.source


def prefetch(sources: Sequence[Source], workers: int | None = None) -> int:
    """Download the remote files among sources in parallel before they are inspected one by one.

    workers defaults to $NOUGAT_DIST_DOWNLOAD_WORKERS (4). Failures are left for `read_bytes` to
    report (the downloader remembers them, so they are not requested again). Returns how many
    remote files were fetched or found in the cache.
    """
    specs = [s.source for s in sources if download.is_remote(s.source)]
    results = download.default().fetch_many(specs, workers)
    return sum(not isinstance(r, download.DownloadError) for r in results.values())
