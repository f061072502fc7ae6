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
* A dropped connection resumes with an HTTP Range request (a ranged object read) from the part's
  length; the part of a process that died is adopted by the next one, so a killed run resumes big
  downloads too.
* Only transient failures are retried, with exponential backoff that honours Retry-After:
  connection reset/refused/timeout and HTTP 429, 500, 502, 503, 504. Anything else (404, 403, a
  checksum or size mismatch) raises `DownloadError` at once. It is an OSError, so the manifest
  turns it into an error row ("cannot read file: HTTP 404 Not Found: <url>") and the job goes on.

This module is the downloader (locks, retries, verification, the rename); specs.py and hub.py
read the specs, cache.py lays out the cache and its part files, http.py does one HTTP transfer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from nougat_dist.inputs import objstore
from nougat_dist.inputs.cache import (CACHE_ENV, STALE_PART_SECONDS, adopt_stale_part,
                                      cache_dir_from_env, cached_path, file_size, part_path,
                                      sha256_file)
from nougat_dist.inputs.http import TRANSIENT_STATUS, DownloadError, Transient, get_into, opener
from nougat_dist.inputs.hub import HfRef, expand_hf, hf_resolve, parse_hf
from nougat_dist.inputs.specs import (check, expand, is_hf, is_listing, is_remote, is_url,
                                      remote_name, split_checksum, with_checksum)
from nougat_dist.store.chunks import fsync_dir

# A remote input is named, then fetched: sources.py, manifest.py and the tests read the spec
# functions, the cache's and the Hub's names here, beside the downloader.
__all__ = ["CACHE_ENV", "CHUNK_BYTES", "STALE_PART_SECONDS", "TRANSIENT_STATUS", "WORKERS_ENV",
           "DownloadError", "Downloader", "HfRef", "cache_dir_from_env", "check", "default",
           "expand", "expand_hf", "fetch", "is_hf", "is_listing", "is_remote", "is_url",
           "parse_hf", "remote_name", "sha256_file", "split_checksum", "with_checksum",
           "workers_from_env"]

log = logging.getLogger(__name__)

WORKERS_ENV = "NOUGAT_DIST_DOWNLOAD_WORKERS"
DEFAULT_WORKERS = 4
CHUNK_BYTES = 1 << 20
# Locks are striped by URL hash instead of kept per URL: a job may see millions of URLs, and a
# rare collision only costs some parallelism.
_N_STRIPES = 256


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
        self._opener = opener()

    def cached_path(self, url: str) -> Path:
        """Where url's bytes live once downloaded (see cache.cached_path)."""
        return cached_path(self.cache_dir, url)

    def fetch(self, spec: str) -> Path:
        """A local path holding the complete, verified bytes of spec; downloads on a cache miss.

        Raises DownloadError when the file cannot be fetched (permanent HTTP errors, checksum or
        size mismatch, transient errors that outlasted the retries).
        """
        url, sha = split_checksum(spec)
        headers: dict[str, str] = {}
        if is_hf(url):
            url, headers = hf_resolve(url)
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
        return part_path(final)

    def _download(self, url: str, final: Path, sha: str | None, headers: dict[str, str]) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        part = self._part_path(final)
        adopt_stale_part(final, part)
        failures = 0
        while True:
            before = file_size(part)
            try:
                self._attempt(url, part, headers)
                break
            except Transient as t:
                # Progress resets the count: only attempts that got nowhere use up retries.
                failures = 1 if file_size(part) > before else failures + 1
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
        if not objstore.is_objstore(url):
            get_into(self._opener, url, part, file_size(part), headers, self.timeout, CHUNK_BYTES)
            return
        try:
            objstore.append_to(url, part, CHUNK_BYTES)
        except objstore.Transient as e:
            raise Transient(str(e)) from e
        except objstore.Permanent as e:
            raise DownloadError(f"{url}: {e}") from e


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
