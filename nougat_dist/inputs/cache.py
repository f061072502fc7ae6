"""The download cache on disk: where a URL's bytes live, and the part files a download (or a
dead process's download, adopted) grows before it is renamed into place."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
from pathlib import Path

from nougat_dist.inputs.specs import remote_name

log = logging.getLogger(__name__)

CACHE_ENV = "NOUGAT_DIST_CACHE"
# A part file untouched this long, written by another host, belongs to a dead download.
STALE_PART_SECONDS = 600.0
_HASH_BLOCK = 1 << 20


def cache_dir_from_env() -> Path:
    """$NOUGAT_DIST_CACHE, or ~/.cache/nougat-dist/downloads."""
    raw = os.environ.get(CACHE_ENV)
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "nougat-dist" / "downloads"


def cached_path(cache_dir: Path, url: str) -> Path:
    """Where url's bytes live once downloaded: <cache>/<2 hex>/<32 hex>-<file name>.

    The name keeps the URL's file name so archive types are still recognised by suffix.
    """
    key = hashlib.sha256(url.encode()).hexdigest()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", remote_name(url))[-120:] or "download"
    return cache_dir / key[:2] / f"{key[:32]}-{name}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())


def part_path(final: Path) -> Path:
    """This process's part file for `final`."""
    # host-pid makes the name unique across processes (and nodes sharing the cache); threads
    # of one process never download the same URL at once (the downloader's stripe lock).
    return final.with_name(f"{final.name}.{_host()}-{os.getpid()}.part")


def adopt_stale_part(final: Path, part: Path) -> None:
    """Take over the longest part file a dead process left behind, so its bytes are resumed."""
    host = _host()
    best: tuple[int, Path] | None = None
    for p in final.parent.glob(f"{final.name}.*.part"):
        if p == part:
            continue
        m = re.fullmatch(re.escape(final.name) + r"\.(.+)-(\d+)\.part", p.name)
        if m is None:
            continue
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if m.group(1) == host:
            stale = not _pid_alive(int(m.group(2)))
        else:
            stale = time.time() - st.st_mtime > STALE_PART_SECONDS
        if stale and st.st_size > file_size(part) and (best is None or st.st_size > best[0]):
            best = (st.st_size, p)
    if best is None:
        return
    try:
        # rename is atomic: if two processes race for the same stale part, one gets it and the
        # other gets FileNotFoundError and starts from what it has.
        os.replace(best[1], part)
        log.info("resuming %s from %d bytes left by an earlier run", final.name, best[0])
    except FileNotFoundError:
        pass


def file_size(path: Path) -> int:
    """Bytes in path; 0 when it does not exist (a part not started yet)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (books can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_BLOCK):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
