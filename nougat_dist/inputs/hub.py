"""Hugging Face Hub inputs: ``hf://`` specs, their globs pinned to a commit, and the resolve URL
a file is downloaded from (by the same downloader as plain URLs, see remote.py)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from nougat_dist.inputs.http import DownloadError


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


def hf_resolve(spec: str) -> tuple[str, dict[str, str]]:
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
