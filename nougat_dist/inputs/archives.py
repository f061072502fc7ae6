"""PDFs inside archives (.rar, .zip, .tar, .tar.gz, .tgz): list members, read one into memory.

Members are never extracted to the filesystem: ZIP and TAR members are read through the standard
library straight into memory. RAR headers are parsed by `rarfile` (pure Python); members are
decompressed in memory by `unrar2-cffi`, a wheel that bundles RARLAB's UnRAR library, so no system
package is needed. Without that package rarfile's system tool (`unrar`, or Debian's `unar`) is the
fallback; the few code paths where rarfile then writes a temporary archive are pointed at a private
temp dir that is always removed.

Passwords come from the environment variable ``NOUGAT_DIST_ARCHIVE_PASSWORD`` (or
:func:`set_password`, which also sets it, so DataLoader workers started with any method see it).
One password is tried for every encrypted archive of a job.

Every failure to read a member raises :class:`ArchiveError`, a subclass of ``OSError``, so the
manifest records it as an error row ("cannot read file: ...") and the job goes on.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import tempfile
import threading
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from nougat_dist.inputs import members

log = logging.getLogger(__name__)

PASSWORD_ENV = "NOUGAT_DIST_ARCHIVE_PASSWORD"
ARCHIVE_SUFFIXES = (".rar", ".zip", ".tar", ".tar.gz", ".tgz")
#: The member name of a Source that stands for an archive that could not even be listed.
WHOLE_ARCHIVE = ""

_PART_RE = re.compile(r"\.part(\d+)\.rar$", re.IGNORECASE)
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
# rarfile's tool selection and HACK_TMP_DIR are module globals; one reader at a time per process.
_RAR_LOCK = threading.Lock()


class ArchiveError(OSError):
    """An archive, or one of its members, cannot be read. The message says why and what to do."""


class UnsafeMemberError(ArchiveError):
    """A member name that would escape an extraction dir (absolute, `..`, drive letter)."""


class ArchivePasswordError(ArchiveError):
    """A member (or the archive's headers) is encrypted and no working password was given."""


class BackendError(ArchiveError):
    """The RAR backend tool is missing or could not decompress the member."""


def _one_line(e: BaseException) -> str:
    # tarfile lists every compression it tried on separate lines; an error row is one line.
    return " ".join(str(e).split())


def set_password(password: str | None) -> None:
    """Set (or clear, with None) the archive password for this process and its children."""
    if password is None:
        os.environ.pop(PASSWORD_ENV, None)
    else:
        os.environ[PASSWORD_ENV] = password


def get_password() -> str | None:
    """The archive password, or None when none is configured (an empty value counts as none)."""
    return os.environ.get(PASSWORD_ENV) or None


class RefusedMemberError(ArchiveError):
    """A member refused by its header: a link, device or nested archive, or above the size cap."""


def _check_member(path: Path, member: str, size: int, kind: str | None = None) -> None:
    problem = members.problem(member, size, kind)
    if problem:
        raise RefusedMemberError(f"member {member!r} in {path} {problem}")


def archive_kind(path: str | Path) -> str | None:
    """'rar', 'zip' or 'tar' by file name, or None for a file that is not an archive we open."""
    name = str(path).lower()
    if name.endswith(".rar"):
        return "rar"
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    return None


def is_later_volume(path: str | Path) -> bool:
    """A second or later volume of a multi-volume RAR (name.partN.rar with N > 1).

    Old-style volumes (.r00, .r01, ...) never end in .rar, so they are not archives here at all;
    rarfile finds every later volume itself when it opens the first one.
    """
    m = _PART_RE.search(str(path))
    return m is not None and int(m.group(1)) > 1


def is_safe_member(name: str) -> bool:
    """Whether a member name stays inside the dir it would be extracted to.

    Backslashes count as separators too: archives made on Windows use them, and a name like
    ``..\\evil.pdf`` escapes there even if it does not on POSIX.
    """
    if not name or "\x00" in name:
        return False
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE_RE.match(norm):
        return False
    return ".." not in PurePosixPath(norm).parts


# --- listing -------------------------------------------------------------------------------------

def list_members(path: str | Path, suffixes: tuple[str, ...] = (".pdf",)) -> list[str]:
    """Names of the members whose names end in one of suffixes (case-insensitive), and of nested
    archives, in archive order. Unsafe names, links, devices and nested archives are listed too,
    so that reading them gives visible error rows instead of documents that silently vanish.

    Raises ArchiveError when the archive itself cannot be read.
    """
    kind = archive_kind(path)
    if kind == "zip":
        names = _zip_names(Path(path))
    elif kind == "tar":
        names = _tar_names(Path(path))
    elif kind == "rar":
        names = _rar_names(Path(path))
    else:
        raise ArchiveError(f"{path}: not an archive type we read ({', '.join(ARCHIVE_SUFFIXES)})")
    return [n for n in names if members.listed(n, suffixes)]


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [i.filename for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as e:
        raise ArchiveError(f"damaged or not a ZIP archive: {path} ({_one_line(e)})") from e


def _tar_names(path: Path) -> list[str]:
    try:
        with tarfile.open(path) as tf:
            return [m.name for m in tf.getmembers() if not m.isdir()]
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"damaged or not a TAR archive: {path} ({_one_line(e)})") from e


#: The in-process RAR backend: the `unrar2-cffi` wheel bundles RARLAB's UnRAR library, so no system
#: package is needed and every RAR variant (rar3/rar5, solid, volumes, passwords) decompresses.
CFFI_BACKEND = "unrar2-cffi"


def _cffi_rarfile():  # -> module unrar.cffi.rarfile, or None
    try:
        from unrar.cffi import rarfile as cffi_rarfile
    except ImportError:
        return None
    return cffi_rarfile


def rar_backend() -> str:
    """The name of what decompresses RAR members: 'unrar2-cffi' when that package is installed,
    else the system tool rarfile runs ('unrar', 'unar', ...)."""
    if _cffi_rarfile() is not None:
        return CFFI_BACKEND
    import rarfile

    try:
        setup = rarfile.tool_setup()
    except rarfile.RarCannotExec as e:
        raise BackendError(f"no RAR backend found: pip install {CFFI_BACKEND} (bundles the UnRAR "
                           f"library), or install the system tool `unrar`") from e
    return str(getattr(rarfile, setup.setup["open_cmd"][0]))


def _open_rar(path: Path):  # -> rarfile.RarFile
    import rarfile

    pwd = get_password()
    try:
        rf = rarfile.RarFile(str(path))
        if pwd is not None:
            # setpassword re-parses the headers, so header-encrypted archives list too.
            rf.setpassword(pwd)
        return rf
    except rarfile.NeedFirstVolume as e:
        raise ArchiveError(f"{path} is a later volume of a multi-volume RAR: open the first "
                           f"volume (.part1.rar or .rar) instead") from e
    except rarfile.PasswordRequired as e:
        raise ArchivePasswordError(f"RAR headers are encrypted: set {PASSWORD_ENV} to list {path}") from e
    except rarfile.NoCrypto as e:
        # rarfile decrypts headers itself (no tool involved) and needs `cryptography` for it.
        if get_password() is None:
            raise ArchivePasswordError(
                f"RAR headers are encrypted: set {PASSWORD_ENV} to list {path} (and install the "
                f"Python package `cryptography`, which rarfile needs to decrypt headers)") from e
        raise ArchiveError(f"RAR headers are encrypted: decrypting them needs the Python package "
                           f"`cryptography` (pip install cryptography): {path}") from e
    except rarfile.Error as e:
        raise ArchiveError(f"damaged or not a RAR archive: {path} ({type(e).__name__}: {e})") from e


def _rar_names(path: Path) -> list[str]:
    with _open_rar(path) as rf:
        infos = rf.infolist()
        if not infos and rf.needs_password():
            # Without the password rarfile cannot parse encrypted headers and lists nothing;
            # an empty listing would silently drop the archive's documents.
            raise ArchivePasswordError(f"RAR headers are encrypted: set {PASSWORD_ENV} to list {path}")
        return [i.filename for i in infos if not i.is_dir()]


# --- reading -------------------------------------------------------------------------------------

def read_member(path: str | Path, member: str) -> bytes:
    """The bytes of one member, read into memory. Raises ArchiveError (an OSError) on failure;
    FileNotFoundError when the archive itself is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"archive not found: {path}")
    if member == WHOLE_ARCHIVE:
        # discover() stands an unlistable archive in as one document; reading it again gives the
        # same reason as listing did.
        list_members(path)
        raise ArchiveError(f"{path}: archive has no member to read")
    if not is_safe_member(member):
        raise UnsafeMemberError(f"unsafe member path {member!r} in {path} (absolute, '..' or drive "
                                f"letter): not extracted")
    kind = archive_kind(path)
    if kind == "zip":
        return _read_zip(path, member)
    if kind == "tar":
        return _read_tar(path, member)
    if kind == "rar":
        return _read_rar(path, member)
    raise ArchiveError(f"{path}: not an archive type we read ({', '.join(ARCHIVE_SUFFIXES)})")


def _read_zip(path: Path, member: str) -> bytes:
    pwd = get_password()
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(member)
            _check_member(path, member, info.file_size, members.zip_kind(info))
            return zf.read(info, pwd=pwd.encode() if pwd is not None else None)
    except KeyError as e:
        raise ArchiveError(f"member {member!r} not found in {path}") from e
    except RuntimeError as e:
        # zipfile signals both "password required" and "bad password" with RuntimeError.
        if "password" in str(e).lower():
            hint = "wrong password" if pwd is not None else f"encrypted: set {PASSWORD_ENV}"
            raise ArchivePasswordError(f"ZIP member {member!r} in {path}: {hint}") from e
        raise ArchiveError(f"cannot read ZIP member {member!r} in {path}: {e}") from e
    except NotImplementedError as e:
        raise ArchiveError(f"ZIP member {member!r} in {path} uses an unsupported method "
                           f"(e.g. AES encryption): {e}") from e
    except (zipfile.BadZipFile, EOFError, ValueError, zlib.error) as e:
        raise ArchiveError(f"damaged ZIP member {member!r} in {path}: {_one_line(e)}") from e


def _read_tar(path: Path, member: str) -> bytes:
    try:
        with tarfile.open(path) as tf:
            info = tf.getmember(member)
            _check_member(path, member, info.size, members.tar_kind(info))
            f = tf.extractfile(info)
            assert f is not None  # isfile() members always have a file object
            return f.read()
    except KeyError as e:
        raise ArchiveError(f"member {member!r} not found in {path}") from e
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise ArchiveError(f"damaged TAR archive {path} reading {member!r}: {_one_line(e)}") from e


def _read_rar(path: Path, member: str) -> bytes:
    import rarfile

    pwd = get_password()
    # Headers are parsed by rarfile (pure Python: volumes, header encryption, redirections); only
    # the decompression goes to the backend.
    with _open_rar(path) as rf:
        try:
            info = rf.getinfo(member)
        except rarfile.NoRarEntry as e:
            raise ArchiveError(f"member {member!r} not found in {path}") from e
        redir = info.file_redir
        if redir and redir[0] == rarfile.RAR5_XREDIR_FILE_COPY:
            # A RAR5 deduplicated member is a reference to an earlier one; UnRAR's in-memory read
            # returns no bytes for it, so read the member it points to.
            info = rf.getinfo(redir[2])
        _check_member(path, member, info.file_size, "symlink" if info.is_symlink() else None)
        encrypted = info.needs_password()
        if encrypted and pwd is None:
            raise ArchivePasswordError(f"RAR member {member!r} in {path} is encrypted: set {PASSWORD_ENV}")
        if _cffi_rarfile() is not None:
            return _read_rar_cffi(path, info.filename, member, pwd, encrypted)
    with _RAR_LOCK, tempfile.TemporaryDirectory(prefix="nougat-dist-rar-") as tmp:
        # rarfile writes a temporary copy of the archive for some members (its "hack" path);
        # keep that inside our temp dir, which is removed whatever happens.
        saved, rarfile.HACK_TMP_DIR = rarfile.HACK_TMP_DIR, tmp
        try:
            return _read_rar_tool(path, member, pwd, encrypted)
        finally:
            rarfile.HACK_TMP_DIR = saved


def _read_rar_cffi(path: Path, name: str, member: str, pwd: str | None, encrypted: bool) -> bytes:
    cffi_rarfile = _cffi_rarfile()
    assert cffi_rarfile is not None
    from unrar.cffi.unrarlib import BadRarFile, BadRarPassword

    try:
        return cffi_rarfile.RarFile(str(path), pwd=pwd).read(name)
    except KeyError as e:
        raise ArchiveError(f"member {member!r} not found in {path} (by the UnRAR library)") from e
    except BadRarPassword as e:
        raise ArchivePasswordError(f"cannot decrypt RAR member {member!r} in {path}: wrong password "
                                   f"or damaged data ({e})") from e
    except (cffi_rarfile.RarFileError, BadRarFile, UnicodeEncodeError) as e:
        if encrypted:
            raise ArchivePasswordError(
                f"cannot decrypt RAR member {member!r} in {path}: wrong password or damaged data "
                f"({type(e).__name__}: {e})") from e
        raise BackendError(f"RAR backend `{CFFI_BACKEND}` could not decompress {member!r} in {path}: "
                           f"archive damaged ({type(e).__name__}: {e})") from e


def _read_rar_tool(path: Path, member: str, pwd: str | None, encrypted: bool) -> bytes:
    import rarfile

    with _open_rar(path) as rf:
        info = rf.getinfo(member)
        try:
            return rf.read(info)
        except rarfile.PasswordRequired as e:
            raise ArchivePasswordError(f"RAR member {member!r} in {path} is encrypted: set {PASSWORD_ENV}") from e
        except rarfile.RarCannotExec as e:
            raise BackendError(f"no RAR backend found to decompress {member!r} in {path}: "
                               f"pip install {CFFI_BACKEND}, or install the system tool `unrar`") from e
        except rarfile.RarWrongPassword as e:
            raise ArchivePasswordError(f"wrong password for RAR member {member!r} in {path}") from e
        except (rarfile.Error, OSError) as e:
            if encrypted:
                raise ArchivePasswordError(
                    f"cannot decrypt RAR member {member!r} in {path}: wrong password or damaged "
                    f"data ({type(e).__name__}: {e})") from e
            backend = rar_backend()
            hint = ("; `unar` cannot read some RAR5 (e.g. solid) archives: "
                    f"pip install {CFFI_BACKEND} reads every RAR" if backend != "unrar" else "")
            raise BackendError(f"RAR backend `{backend}` could not decompress {member!r} in {path}: "
                               f"archive damaged or unsupported by this backend "
                               f"({type(e).__name__}: {e}){hint}") from e
