"""Remote inputs: HTTP(S) URLs, Hugging Face Hub files and object stores, downloaded into a local cache.

A remote input is named by a *spec* string, which is also its `Source.source`:

* ``https://host/path/paper.pdf`` (or ``http://``), optionally ``...#sha256=HEX`` to verify it;
* ``hf://datasets/OWNER/REPO@REV/path/in/repo`` or ``hf://OWNER/REPO@REV/path`` (a model repo):
  one file of a Hub repo. `expand_hf` turns a glob spec into these, pinned to a commit.
* ``s3://bucket/key``, ``gs://bucket/key`` or any other fsspec protocol (see `objstore`), also
  with ``#sha256=HEX``; `expand` turns a glob or a ``.../`` prefix into these.

`Downloader.fetch` returns the path of a complete, verified local copy:

* The cache dir is ``$NOUGAT_DIST_CACHE`` (default ``~/.cache/nougat-dist/downloads``); a file is
  cached under the sha256 of its URL, so every later read (manifest, render workers, a resumed run)
  reuses it without touching the network.
* Bytes go to ``<cached>.<host>-<pid>.part`` first and are renamed into place with `os.replace`
  only after the size (Content-Length / Content-Range) and the optional sha256 check out, so the
  cache never holds a partial or corrupt file, and two processes fetching the same URL at once
  each write their own part and the second rename replaces identical bytes.
* A dropped connection resumes with an HTTP Range request (a ranged object read) from the part's length; the part of a
  process that died is adopted by the next one, so a killed run resumes big downloads too.
* Only transient failures are retried, with exponential backoff that honours Retry-After:
  connection reset/refused/timeout and HTTP 429, 500, 502, 503, 504. Anything else (404, 403, a
  checksum or size mismatch) raises `DownloadError` at once. It is an OSError, so the manifest
  turns it into an error row ("cannot read file: HTTP 404 Not Found: <url>") and the job goes on.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from nougat_dist.inputs import objstore
from nougat_dist.store.chunks import fsync_dir

log = logging.getLogger(__name__)

CACHE_ENV = "NOUGAT_DIST_CACHE"
WORKERS_ENV = "NOUGAT_DIST_DOWNLOAD_WORKERS"
DEFAULT_WORKERS = 4
#: HTTP statuses worth retrying: overload and gateway hiccups. 404/403/401/410 never heal by waiting.
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
CHUNK_BYTES = 1 << 20
# A part file untouched this long, written by another host, belongs to a dead download.
STALE_PART_SECONDS = 600.0
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_CHECKSUM_FRAGMENT = "#sha256="
_USER_AGENT = "nougat-dist/0.1 (+urllib)"
# Locks are striped by URL hash instead of kept per URL: a job may see millions of URLs, and a
# rare collision only costs some parallelism.
_N_STRIPES = 256
# A TLS connection cut mid-body raises SSLEOFError, not ConnectionResetError: the same event.
_CONNECTION_LOST = (ConnectionError, TimeoutError, ssl.SSLEOFError, http.client.HTTPException)


class DownloadError(OSError):
    """A remote file cannot be fetched and retrying will not help. The message says why."""


class _Transient(Exception):
    """A failure worth retrying; retry_after is the server's Retry-After in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- specs ---------------------------------------------------------------------------------------

def is_url(spec: str) -> bool:
    """An http:// or https:// spec."""
    return spec.lower().startswith(("http://", "https://"))


def is_hf(spec: str) -> bool:
    """An hf:// spec (a Hugging Face Hub repo file or glob)."""
    return spec.lower().startswith("hf://")


def is_remote(spec: str) -> bool:
    """Whether a source string names a remote file rather than a local path."""
    return is_url(spec) or is_hf(spec) or objstore.is_objstore(spec)


def is_listing(spec: str) -> bool:
    """Whether a remote spec names many files (an hf:// or object-store glob or prefix) that
    `expand` lists, rather than one file."""
    if is_hf(spec):
        # A bare repo (no path) counts as a glob over all of it.
        return bool(set("*?[") & set(parse_hf(spec).path or "*"))
    return objstore.is_objstore(spec) and objstore.is_listing(spec)


def expand(spec: str) -> list[str]:
    """The file specs a listing spec matches (`expand_hf` for the Hub, `objstore.expand` else).

    Raises OSError (store, Hub or network errors) or ValueError (malformed spec, missing package).
    """
    return expand_hf(spec) if is_hf(spec) else objstore.expand(spec)


def check(spec: str) -> None:
    """Raise ValueError now if spec cannot be fetched by anything installed (an object-store
    protocol whose package is missing): a setup error, not an error row per document."""
    if objstore.is_objstore(spec):
        objstore.check(split_checksum(spec)[0])


def split_checksum(spec: str) -> tuple[str, str | None]:
    """``URL#sha256=HEX`` → (URL, lower-case HEX); other specs → (spec, None).

    Raises ValueError for a malformed checksum, so a typo is caught when the input is read.
    """
    i = spec.find(_CHECKSUM_FRAGMENT)
    if i < 0:
        return spec, None
    url, sha = spec[:i], spec[i + len(_CHECKSUM_FRAGMENT):]
    if not _SHA256_RE.match(sha):
        raise ValueError(f"not a sha256 (64 hex digits) in {spec!r}")
    return url, sha.lower()


def with_checksum(url: str, sha256: str | None) -> str:
    """The spec that downloads url and verifies it against sha256 (if given)."""
    if sha256 is None:
        return url
    if not _SHA256_RE.match(sha256):
        raise ValueError(f"not a sha256 (64 hex digits): {sha256!r}")
    return f"{url}{_CHECKSUM_FRAGMENT}{sha256.lower()}"


def remote_name(spec: str) -> str:
    """The file name a spec ends in (for telling PDFs from archives), without query or checksum."""
    url, _ = split_checksum(spec)
    if is_hf(url):
        return PurePosixPath(parse_hf(url).path).name
    if objstore.is_objstore(url):
        # Object keys are not percent-encoded: a key may hold '%' or '?' literally.
        return PurePosixPath(url.split("://", 1)[1]).name
    path = urllib.parse.urlsplit(url).path
    return urllib.parse.unquote(PurePosixPath(path).name)


@dataclass(frozen=True)
class HfRef:
    """A parsed hf:// spec. path is a glob before `expand_hf`, a file path after."""

    repo_type: str  # "dataset" | "model" | "space"
    repo_id: str
    revision: str | None
    path: str

    def spec(self, path: str, revision: str | None) -> str:
        prefix = {"dataset": "datasets/", "space": "spaces/"}.get(self.repo_type, "")
        rev = f"@{revision}" if revision else ""
        return f"hf://{prefix}{self.repo_id}{rev}/{path}"


def parse_hf(spec: str) -> HfRef:
    """Parse ``hf://[datasets/|spaces/]OWNER/REPO[@REV][/PATH-OR-GLOB]``.

    Raises ValueError with the expected form when the spec is malformed.
    """
    parts = spec[len("hf://"):].split("/")
    repo_type = "model"
    if parts and parts[0] in ("datasets", "spaces", "models"):
        repo_type = {"datasets": "dataset", "spaces": "space", "models": "model"}[parts.pop(0)]
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ValueError(f"expected hf://datasets/OWNER/REPO[@REV]/GLOB or hf://OWNER/REPO[@REV]/GLOB, "
                         f"got {spec!r}")
    repo, _, revision = parts[1].partition("@")
    return HfRef(repo_type, f"{parts[0]}/{repo}", revision or None, "/".join(parts[2:]))


def expand_hf(spec: str) -> list[str]:
    """The file specs of a Hub repo matching a glob, pinned to the commit the revision points at.

    Pinning means every rank, every render worker and a resumed run read the same bytes even if
    the repo gets new commits meanwhile. The glob is matched with fnmatch against paths in the
    repo (``*`` crosses folders); an empty glob matches every file. Raises OSError (Hub or network
    errors from huggingface_hub) or ValueError (a malformed spec or repo id).
    """
    import fnmatch

    import huggingface_hub

    ref = parse_hf(spec)
    info = huggingface_hub.repo_info(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision)
    commit = getattr(info, "sha", None) or ref.revision
    files = huggingface_hub.list_repo_files(ref.repo_id, repo_type=ref.repo_type, revision=commit)
    pattern = ref.path or "*"
    return [ref.spec(f, commit) for f in sorted(files) if fnmatch.fnmatchcase(f, pattern)]


def _hf_resolve(spec: str) -> tuple[str, dict[str, str]]:
    """The resolve URL of one Hub file, and the auth header for the Hub host (if a token is set).

    Hub files go through the same downloader as plain URLs, so they get the same cache, resume and
    retry rules; the endpoint is read at call time so HF_ENDPOINT (a mirror) is honoured.
    """
    import huggingface_hub
    from huggingface_hub import constants

    ref = parse_hf(spec)
    if not ref.path or set("*?[") & set(ref.path):
        raise DownloadError(f"{spec}: not a single Hub file (expand the glob with expand_hf first)")
    prefix = {"dataset": "datasets/", "space": "spaces/"}.get(ref.repo_type, "")
    rev = urllib.parse.quote(ref.revision or "main", safe="")
    url = f"{constants.ENDPOINT.rstrip('/')}/{prefix}{ref.repo_id}/resolve/{rev}/{urllib.parse.quote(ref.path)}"
    token = huggingface_hub.get_token()
    return url, ({"Authorization": f"Bearer {token}"} if token else {})


# --- configuration from the environment ----------------------------------------------------------

def cache_dir_from_env() -> Path:
    """$NOUGAT_DIST_CACHE, or ~/.cache/nougat-dist/downloads."""
    raw = os.environ.get(CACHE_ENV)
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "nougat-dist" / "downloads"


def workers_from_env() -> int:
    """$NOUGAT_DIST_DOWNLOAD_WORKERS (default 4): how many downloads run at once per process."""
    raw = os.environ.get(WORKERS_ENV, "")
    if not raw:
        return DEFAULT_WORKERS
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{WORKERS_ENV} must be a positive integer, got {raw!r}")
    return n


# --- HTTP helpers --------------------------------------------------------------------------------

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


def _retry_after(value: str | None) -> float | None:
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


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes A-B/TOTAL`` or ``bytes */TOTAL``; None where unknown."""
    m = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    first = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return first, total


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (books can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
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


# --- the downloader ------------------------------------------------------------------------------

@dataclass
class Downloader:
    """Fetches remote specs into cache_dir. Thread-safe; one instance per process is enough.

    retries counts consecutive attempts that made no progress, so a server that drops a long
    download every few hundred MB still finishes it; the delay doubles from backoff up to max_delay
    (a Retry-After header replaces it, capped at max_delay).
    """

    cache_dir: Path
    retries: int = 5
    backoff: float = 1.0
    max_delay: float = 120.0
    timeout: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    _stripes: list[threading.Lock] = field(
        default_factory=lambda: [threading.Lock() for _ in range(_N_STRIPES)], init=False, repr=False)
    # Failures of this process, by spec (permanent ones, and transient ones that used up their
    # retries): the manifest reads a document again after prefetch failed on it, and must get the
    # same error without another round of requests and backoff.
    _failed: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _failed_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        self._opener = urllib.request.build_opener(_NoAuthAcrossHosts())

    def cached_path(self, url: str) -> Path:
        """Where url's bytes live once downloaded: <cache>/<2 hex>/<32 hex>-<file name>.

        The name keeps the URL's file name so archive types are still recognised by suffix.
        """
        key = hashlib.sha256(url.encode()).hexdigest()
        name = re.sub(r"[^A-Za-z0-9._-]", "_", remote_name(url))[-120:] or "download"
        return self.cache_dir / key[:2] / f"{key[:32]}-{name}"

    def fetch(self, spec: str) -> Path:
        """A local path holding the complete, verified bytes of spec; downloads on a cache miss.

        Raises DownloadError when the file cannot be fetched (permanent HTTP errors, checksum or
        size mismatch, transient errors that outlasted the retries).
        """
        url, sha = split_checksum(spec)
        headers: dict[str, str] = {}
        if is_hf(url):
            url, headers = _hf_resolve(url)
        elif not is_url(url) and not objstore.is_objstore(url):
            raise DownloadError(f"not a remote spec: {spec!r}")
        with self._failed_lock:
            failed = self._failed.get(spec)
        if failed is not None:
            raise DownloadError(failed)
        final = self.cached_path(url)
        key = int(final.name[:8], 16) % _N_STRIPES
        # Threads of one process wait for each other instead of downloading the same file twice.
        with self._stripes[key]:
            if final.exists():
                if sha is None or sha256_file(final) == sha:
                    return final
                # Cached from a spec without (or with another) checksum: the URL's content may
                # have changed since, so fetch it again and let the check decide.
                log.warning("cached %s does not match sha256 %s: downloading it again", url, sha)
            try:
                self._download(url, final, sha, headers)
            except DownloadError as e:
                with self._failed_lock:
                    self._failed[spec] = str(e)
                raise
        return final

    def fetch_many(self, specs: Iterable[str], workers: int | None = None) -> dict[str, Path | DownloadError]:
        """Fetch specs in parallel (at most `workers` at once, default $NOUGAT_DIST_DOWNLOAD_WORKERS).

        Failures are returned, not raised: one dead link must not stop the others.
        """
        unique = list(dict.fromkeys(specs))
        if not unique:
            return {}
        n = min(workers or workers_from_env(), len(unique))

        def one(spec: str) -> Path | DownloadError:
            try:
                return self.fetch(spec)
            except DownloadError as e:
                return e

        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="download") as pool:
            results = dict(zip(unique, pool.map(one, unique)))
        failed = sum(isinstance(r, DownloadError) for r in results.values())
        log.info("downloads: %d files ready, %d failed, %.1f s with %d workers",
                 len(unique) - failed, failed, time.monotonic() - t0, n)
        return results

    # --- one file --------------------------------------------------------------------------------

    def _part_path(self, final: Path) -> Path:
        # host-pid makes the name unique across processes (and nodes sharing the cache); threads
        # of one process never download the same URL at once (stripe lock).
        host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
        return final.with_name(f"{final.name}.{host}-{os.getpid()}.part")

    def _adopt_stale_part(self, final: Path, part: Path) -> None:
        """Take over the longest part file a dead process left behind, so its bytes are resumed."""
        host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
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
            if stale and st.st_size > _size(part) and (best is None or st.st_size > best[0]):
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

    def _download(self, url: str, final: Path, sha: str | None, headers: dict[str, str]) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        part = self._part_path(final)
        self._adopt_stale_part(final, part)
        failures = 0
        while True:
            before = _size(part)
            try:
                self._attempt(url, part, headers)
                break
            except _Transient as t:
                # Progress resets the count: only attempts that got nowhere use up retries.
                failures = 1 if _size(part) > before else failures + 1
                if failures > self.retries:
                    # The part stays: its bytes are good, and the next run adopts and resumes it.
                    log.warning("%s: giving up after %d retries: %s", url, self.retries, t)
                    raise DownloadError(f"{url}: gave up after {self.retries} retries: {t}") from t
                delay = t.retry_after if t.retry_after is not None else self.backoff * 2 ** (failures - 1)
                delay = min(delay, self.max_delay)
                log.warning("%s: %s; retry %d/%d in %.1f s", url, t, failures, self.retries, delay)
                self.sleep(delay)
            except DownloadError:
                # A permanent failure leaves nothing behind: the file is gone or the bytes are wrong.
                part.unlink(missing_ok=True)
                raise
        if sha is not None:
            got = sha256_file(part)
            if got != sha:
                part.unlink(missing_ok=True)
                raise DownloadError(f"sha256 mismatch for {url}: expected {sha}, got {got} (download discarded)")
        os.replace(part, final)
        fsync_dir(final.parent)

    def _attempt(self, url: str, part: Path, headers: dict[str, str]) -> None:
        """One HTTP request (or object read), appending to part. Returns when part holds the
        whole file."""
        if objstore.is_objstore(url):
            try:
                objstore.append_to(url, part, CHUNK_BYTES)
            except objstore.Transient as e:
                raise _Transient(str(e)) from e
            except objstore.Permanent as e:
                raise DownloadError(f"{url}: {e}") from e
            return
        have = _size(part)
        req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT,
                                                   "Accept-Encoding": "identity", **headers})
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            resp = self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            with e:
                if e.code == 416 and have:
                    # The part already has every byte (a run died between download and rename),
                    # or is longer than the file now is: keep the first, restart the second.
                    _, total = _content_range(e.headers.get("Content-Range"))
                    if total == have:
                        return
                    part.unlink(missing_ok=True)
                    raise _Transient(f"range {have}- not satisfiable; restarting from byte 0", 0.0) from e
                if e.code in TRANSIENT_STATUS:
                    raise _Transient(f"HTTP {e.code} {e.reason}", _retry_after(e.headers.get("Retry-After"))) from e
                raise DownloadError(f"HTTP {e.code} {e.reason}: {url}") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, _CONNECTION_LOST):
                raise _Transient(f"cannot connect: {e.reason}") from e
            raise DownloadError(f"cannot fetch {url}: {e.reason}") from e
        except _CONNECTION_LOST as e:
            raise _Transient(f"connection failed: {e!r}") from e

        with resp:
            if resp.status == 206:
                first, total = _content_range(resp.headers.get("Content-Range"))
                if first != have:
                    part.unlink(missing_ok=True)
                    raise _Transient(f"server answered range {have}- from byte {first}; restarting", 0.0)
                offset = have
            elif resp.status == 200:
                # A fresh download, or a server that ignores Range: start over either way.
                offset = 0
                length = resp.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
            else:
                raise DownloadError(f"unexpected HTTP {resp.status} {resp.reason}: {url}")
            with open(part, "r+b" if offset else "wb") as f:
                f.seek(offset)
                f.truncate()
                try:
                    while chunk := resp.read(CHUNK_BYTES):
                        f.write(chunk)
                except _CONNECTION_LOST as e:
                    raise _Transient(f"connection lost after {f.tell()} bytes: {e!r}") from e
                finally:
                    # Whatever arrived is kept for the resume, and must be on disk before a rename.
                    f.flush()
                    os.fsync(f.fileno())
                size = f.tell()
        if total is not None and size < total:
            raise _Transient(f"connection closed after {size} of {total} bytes")
        if total is not None and size > total:
            raise DownloadError(f"{url}: received {size} bytes, more than the {total} announced")


_default: Downloader | None = None
_default_lock = threading.Lock()


def default() -> Downloader:
    """This process's downloader for the cache dir in the environment (re-read on every call, so
    tests and subprocesses that change $NOUGAT_DIST_CACHE get their own)."""
    global _default
    cache = cache_dir_from_env()
    with _default_lock:
        if _default is None or _default.cache_dir != cache:
            _default = Downloader(cache)
        return _default


def fetch(spec: str) -> Path:
    """`Downloader.fetch` with the default downloader."""
    return default().fetch(spec)
