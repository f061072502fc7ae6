"""What a remote input's spec string names: a URL, a Hub file or glob, or an object-store key,
glob or prefix, each optionally with ``#sha256=HEX`` (see remote.py for the forms)."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import PurePosixPath

from nougat_dist.inputs import objstore
from nougat_dist.inputs.hub import expand_hf, parse_hf

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_CHECKSUM_FRAGMENT = "#sha256="


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
