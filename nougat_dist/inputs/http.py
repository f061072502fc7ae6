"""One HTTP(S) transfer of a download, and how its failures are told apart: `Transient` (worth
retrying: connection lost, HTTP 429/5xx, a short body) or `DownloadError` (retrying will not help).
The retry loop around it is the downloader's (remote.py)."""

from __future__ import annotations

import email.utils
import http.client
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

#: HTTP statuses worth retrying: overload and gateway hiccups. 404/403/401/410 never heal by waiting.
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
# A TLS connection cut mid-body raises SSLEOFError, not ConnectionResetError: the same event.
CONNECTION_LOST = (ConnectionError, TimeoutError, ssl.SSLEOFError, http.client.HTTPException)
_USER_AGENT = "nougat-dist/0.1 (+urllib)"


class DownloadError(OSError):
    """A remote file cannot be fetched and retrying will not help. The message says why."""


class Transient(Exception):
    """A failure worth retrying; retry_after is the server's Retry-After in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _NoAuthAcrossHosts(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but drop Authorization when the host changes.

    The Hub redirects LFS files to a CDN with a signed URL; urllib would forward the user's token
    there, which it must never see.
    """

    def redirect_request(self, req: urllib.request.Request, fp, code: int, msg: str,  # type: ignore[override]
                         headers, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def opener() -> urllib.request.OpenerDirector:
    """The opener downloads use: redirects followed, credentials kept to their own host."""
    return urllib.request.build_opener(_NoAuthAcrossHosts())


def retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes A-B/TOTAL`` or ``bytes */TOTAL``; None where unknown."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return first, total


def get_into(opener: urllib.request.OpenerDirector, url: str, part: Path, have: int,
             headers: dict[str, str], timeout: float, chunk_bytes: int) -> None:
    """One GET of url appending to part, which holds `have` bytes (a Range request from there).
    Returns when part holds the whole file; raises Transient or DownloadError otherwise."""
    resp = _open(opener, url, part, have, headers, timeout)
    if resp is None:
        return
    with resp:
        offset, total = _body_offset(resp, url, part, have)
        with open(part, "r+b" if offset else "wb") as f:
            f.seek(offset)
            f.truncate()
            try:
                while chunk := resp.read(chunk_bytes):
                    f.write(chunk)
            except CONNECTION_LOST as e:
                raise Transient(f"connection lost after {f.tell()} bytes: {e!r}") from e
            finally:
                # Whatever arrived is kept for the resume, and must be on disk before a rename.
                f.flush()
                os.fsync(f.fileno())
            size = f.tell()
    if total is not None and size < total:
        raise Transient(f"connection closed after {size} of {total} bytes")
    if total is not None and size > total:
        raise DownloadError(f"{url}: received {size} bytes, more than the {total} announced")


def _open(opener: urllib.request.OpenerDirector, url: str, part: Path, have: int,
          headers: dict[str, str], timeout: float) -> Any | None:
    """The response to the request for url from byte `have`; None when part is already whole."""
    req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT,
                                               "Accept-Encoding": "identity", **headers})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        return opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and have:
                # The part already has every byte (a run died between download and rename),
                # or is longer than the file now is: keep the first, restart the second.
                _, total = content_range(e.headers.get("Content-Range"))
                if total == have:
                    return None
                part.unlink(missing_ok=True)
                raise Transient(f"range {have}- not satisfiable; restarting from byte 0", 0.0) from e
            if e.code in TRANSIENT_STATUS:
                raise Transient(f"HTTP {e.code} {e.reason}", retry_after(e.headers.get("Retry-After"))) from e
            raise DownloadError(f"HTTP {e.code} {e.reason}: {url}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, CONNECTION_LOST):
            raise Transient(f"cannot connect: {e.reason}") from e
        raise DownloadError(f"cannot fetch {url}: {e.reason}") from e
    except CONNECTION_LOST as e:
        raise Transient(f"connection failed: {e!r}") from e


def _body_offset(resp: Any, url: str, part: Path, have: int) -> tuple[int, int | None]:
    """Where in part the response's body goes, and the file's total size if the server said."""
    if resp.status == 206:
        first, total = content_range(resp.headers.get("Content-Range"))
        if first != have:
            part.unlink(missing_ok=True)
            raise Transient(f"server answered range {have}- from byte {first}; restarting", 0.0)
        return have, total
    if resp.status == 200:
        # A fresh download, or a server that ignores Range: start over either way.
        length = resp.headers.get("Content-Length")
        return 0, int(length) if length and length.isdigit() else None
    raise DownloadError(f"unexpected HTTP {resp.status} {resp.reason}: {url}")
