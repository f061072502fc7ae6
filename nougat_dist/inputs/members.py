"""Which archive members are read: judged by their headers, before a byte is decompressed.

A member that is a link, device or FIFO, a nested archive, or one whose declared uncompressed
size is above ``--max-member-bytes`` is listed (so it becomes an error row with the reason) but
never read. The declared size is what the readers trust: zipfile stops at it (and fails the CRC
past it) and tarfile reads exactly that many bytes, so a header that lies cannot make them read
more.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile

MAX_MEMBER_ENV = "NOUGAT_DIST_MAX_MEMBER_BYTES"
#: A member is read into memory by the rank that hashes it and by each render worker that opens
#: it; 512 MiB keeps three copies of the largest member inside a 24 GiB node's share per rank
#: (3 GiB for each of 8 ranks, about 1 GiB of it taken by the model and the render workers).
DEFAULT_MAX_MEMBER_BYTES = 512 * 2**20
_ARCHIVE_ENDINGS = (".rar", ".zip", ".tar", ".tar.gz", ".tgz")


def set_max_member_bytes(limit: int) -> None:
    """Set the member size cap for this process and its children (render workers, any start
    method), as the archive password is passed."""
    os.environ[MAX_MEMBER_ENV] = str(int(limit))


def max_member_bytes() -> int:
    """The member size cap in bytes: $NOUGAT_DIST_MAX_MEMBER_BYTES, else the default."""
    raw = os.environ.get(MAX_MEMBER_ENV)
    return int(raw) if raw else DEFAULT_MAX_MEMBER_BYTES


def listed(name: str, suffixes: tuple[str, ...]) -> bool:
    """Members that become rows: documents by suffix, and nested archives (as error rows)."""
    low = name.lower()
    return low.endswith(tuple(s.lower() for s in suffixes)) or low.endswith(_ARCHIVE_ENDINGS)


def problem(member: str, size: int, kind: str | None = None) -> str | None:
    """Why a member must not be read (a phrase that follows its name), or None to read it."""
    if kind is not None:
        return f"is a {kind}, not a regular file: not read"
    if member.lower().endswith(_ARCHIVE_ENDINGS):
        return "is a nested archive: not opened (extract it and give it as an input)"
    limit = max_member_bytes()
    if size > limit:
        return f"is {size} bytes uncompressed, above --max-member-bytes {limit}: not read"
    return None


def zip_kind(info: zipfile.ZipInfo) -> str | None:
    """'symlink', 'device', ... for a ZIP member made on Unix from a non-regular file, else None."""
    mode = info.external_attr >> 16
    # Writers often store permission bits only (no file type): that is a regular file.
    if info.create_system != 3 or not stat.S_IFMT(mode) or stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "device"),
                       (stat.S_ISBLK, "device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def tar_kind(info: tarfile.TarInfo) -> str | None:
    """'link', 'FIFO', 'device', ... for a TAR member that is not a regular file, else None."""
    if info.isfile():
        return None
    if info.issym() or info.islnk():
        return "link"
    if info.isfifo():
        return "FIFO"
    if info.ischr() or info.isblk():
        return "device"
    return "special file"
