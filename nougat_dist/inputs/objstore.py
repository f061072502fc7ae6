"""Object-store inputs: ``s3://``, ``gs://`` and every other protocol fsspec knows.

An object-store spec is a URL such as ``s3://bucket/papers/a.pdf`` or ``gs://bucket/books/x.rar``
(``#sha256=HEX`` may follow, as for HTTP). The protocol's fsspec implementation does the talking
(`s3fs` for s3://, `gcsfs` for gs://: ``pip install 'nougat-dist[s3]'`` / ``'nougat-dist[gcs]'``),
and credentials, endpoints and other options come the way those libraries read them: the cloud's
own chain (instance metadata, Workload Identity, ``AWS_*`` variables, ``~/.aws``, application
default credentials) or fsspec's ``FSSPEC_<PROTOCOL>_<OPTION>`` variables, e.g.
``FSSPEC_S3_ENDPOINT_URL=http://minio:9000`` for an S3-compatible server.

This module lists and reads; `remote.Downloader` puts the bytes into the same cache, with the same
part-file, checksum, retry and resume rules as an HTTP download.

* `expand` turns a *listing* spec into file specs: a glob (``s3://b/papers/**.pdf``; ``*`` also
  matches ``/``, as in an ``hf://`` glob) or a prefix ending in ``/`` (every file under it).
* `append_to` copies an object into a part file from the part's current length on, so a dropped
  connection or a killed run resumes where it stopped (a ranged GET, as HTTP Range).
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Any

#: Protocols other modules handle (HTTP through urllib, the Hub through its resolve URLs, local paths).
HANDLED_ELSEWHERE = frozenset({"http", "https", "hf", "file", "local"})
#: The extra that installs a protocol's implementation, for the message when it is missing.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
_PROTOCOL_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_GLOB_CHARS = set("*?[")
CHUNK_BYTES = 1 << 20


class Transient(Exception):
    """A read that failed for a reason worth retrying (connection, timeout, throttling)."""


class Permanent(OSError):
    """A read that retrying will not fix (no such object, access denied, not a file)."""


def protocol(spec: str) -> str | None:
    """The fsspec protocol of spec (``s3``, ``gs``, ...) when it names an object store, else None.

    A protocol counts when fsspec knows it (built in, or registered by an installed package), so a
    user's own fsspec filesystem works as an input too.
    """
    m = _PROTOCOL_RE.match(spec)
    if m is None:
        return None
    proto = m.group(1).lower()
    if proto in HANDLED_ELSEWHERE:
        return None
    from fsspec.registry import known_implementations, registry

    if proto in known_implementations or proto in registry:
        return proto
    return None


def is_objstore(spec: str) -> bool:
    """Whether spec is an object-store URL (see `protocol`)."""
    return protocol(spec) is not None


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for url.

    Raises ValueError saying what to install when the protocol's package is missing: a broken setup,
    caught while the inputs are read, before anything starts.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        proto = protocol(url) or url.split(":", 1)[0]
        extra = EXTRAS.get(proto)
        hint = (f"pip install 'nougat-dist[{extra}]'" if extra
                else f"install the fsspec implementation of {proto}://")
        raise ValueError(f"cannot read {url}: {e} ({hint})") from e


def check(spec: str) -> None:
    """Raise ValueError now if spec's protocol cannot be used (its package is not installed)."""
    filesystem(spec)


def is_listing(spec: str) -> bool:
    """Whether spec names many files: a glob, a prefix ending in ``/``, or a bare bucket.

    Decided from the string alone: a list file may hold a million specs, and asking the store
    which of them are folders would cost a request each.
    """
    rest = spec.split("://", 1)[1]
    return bool(_GLOB_CHARS & set(rest)) or rest.endswith("/") or "/" not in rest.strip("/")


def expand(spec: str) -> list[str]:
    """The file URLs a listing spec matches, sorted.

    One recursive listing of the longest prefix without glob characters, then fnmatch on the full
    path, so ``**.pdf`` and ``*/*.rar`` both work and the number of requests does not grow with the
    depth of the tree. Raises OSError (the store's errors) or ValueError (missing package).
    """
    fs, path = filesystem(spec)
    path = path.rstrip("/") if not _GLOB_CHARS & set(path) else path
    cut = min((path.index(c) for c in _GLOB_CHARS if c in path), default=len(path))
    base = path[:cut].rsplit("/", 1)[0] if cut < len(path) else path
    pattern = path if cut < len(path) else path + "/*"
    found = fs.find(base)
    return sorted(fs.unstrip_protocol(p) for p in found if fnmatch.fnmatchcase(p, pattern))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _classify(e: BaseException, url: str) -> Exception:
    """The store's exception as Permanent (give up now) or Transient (back off and retry)."""
    if isinstance(e, FileNotFoundError):
        return Permanent(f"not found: {url} (a folder? end it with / or give a glob)")
    if isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return Permanent(f"{type(e).__name__}: {e}: {url}")
    return Transient(f"{type(e).__name__}: {e}")


def is_store_error(e: BaseException) -> bool:
    """Whether e came from the store or its transport (worth a retry), not from a bug."""
    # fsspec implementations raise OSError for what they recognise, and their transport's own
    # exceptions (aiohttp, botocore, google-auth, requests) for the rest: both are the store's.
    # Anything else (TypeError, ...) is a bug and must not be retried into silence.
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        return True
    mod = type(e).__module__.split(".", 1)[0]
    return mod in {"aiohttp", "botocore", "aiobotocore", "google", "requests", "urllib3", "asyncio"}


def append_to(url: str, part: Path, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Copy the object at url into part, from part's current length on. Returns the object size.

    Raises Permanent for a missing or forbidden object, Transient for what retrying may fix; the
    bytes already written stay in part (flushed and fsynced) so the next attempt resumes there.
    """
    try:
        fs, path = filesystem(url)
    except ValueError as e:
        raise Permanent(str(e)) from e
    try:
        size = int(fs.size(path))
    except Exception as e:  # noqa: BLE001 - sorted by is_store_error, the rest re-raised
        if not is_store_error(e):
            raise
        raise _classify(e, url) from e
    have = _size(part)
    if have > size:  # the object was replaced by a shorter one since: start over
        have = 0
    with open(part, "r+b" if have else "wb") as out:
        out.seek(have)
        out.truncate()
        try:
            while have < size:
                end = min(size, have + chunk_bytes)
                data = fs.cat_file(path, start=have, end=end)
                if not data:
                    raise Transient(f"empty read at byte {have} of {size}")
                out.write(data)
                have += len(data)
        except Transient:
            raise
        except Exception as e:  # noqa: BLE001 - as above
            if not is_store_error(e):
                raise
            raise _classify(e, url) from e
        finally:
            # What arrived is kept for the resume, and must be on disk before a rename.
            out.flush()
            os.fsync(out.fileno())
    return size
