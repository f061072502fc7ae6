"""How a document's `source` is named in the dataset: relative to the input it was found under
(see `sources.Source.stored_source`), so that an uploaded dataset holds no local paths."""

from __future__ import annotations

import os
import posixpath
import urllib.parse

from nougat_dist.inputs import remote

GLOB_CHARS = set("*?[")


def remote_path(url: str) -> str:
    """The path part of a remote spec: a Hub repo's file path, a bucket's key, a URL's path."""
    if remote.is_hf(url):
        return remote.parse_hf(url).path
    if "://" in url and not remote.is_url(url):  # s3://bucket/key and the like
        return url.split("://", 1)[1].partition("/")[2]
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path).lstrip("/")


def relative(path: str, root: str | None, local: bool = False) -> str:
    """path from root when it lies under it, else its last component (never a path upwards)."""
    flavor = os.path if local else posixpath
    if root is not None:
        base = os.path.abspath(root) if local else root.strip("/")
        rel = flavor.relpath(path, base) if base or local else path
        if rel != ".." and not rel.startswith(".." + flavor.sep):
            return rel
    return flavor.basename(path)


def root_of(pattern: str, local: bool) -> str:
    """The folder a file, glob or prefix names: everything before the component holding the
    first glob character (a prefix ending in / is its own folder)."""
    cut = min((pattern.find(c) for c in GLOB_CHARS if c in pattern), default=len(pattern))
    head = pattern[:cut]
    if not local:
        return head[:head.rfind("/") + 1]
    return head if cut < len(pattern) and head.endswith(os.sep) else os.path.dirname(head) or "."
