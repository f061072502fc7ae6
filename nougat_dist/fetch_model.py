"""`nougat-dist fetch-model NAME --to DIR`: pre-fetch a Nougat checkpoint for offline nodes.

The files and URLs are nougat's own (nougat.utils.checkpoint: BASE_URL/<tag>/<file>, downloaded by
its download_as_bytes_with_progress). Added here: each file is written to a temporary name and
renamed when complete, so a re-run skips what finished and fetches the rest (resume by file);
SHA256SUMS lists what was fetched; and an unreachable network is one clean error that leaves no
empty checkpoint dir behind (nougat's own downloader leaves one, which later runs take for a
checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nougat_dist.inputs.cache import sha256_file

log = logging.getLogger(__name__)

#: The files nougat.utils.checkpoint.download_checkpoint fetches for every model tag.
FILES = ("config.json", "pytorch_model.bin", "special_tokens_map.json", "tokenizer.json",
         "tokenizer_config.json")
SUMS = "SHA256SUMS"


class FetchError(RuntimeError):
    """The checkpoint could not be fetched; the message says why."""


def fetch(model_tag: str, to: Path) -> dict[str, tuple[int, str]]:
    """Fetch `model_tag` into `to` (resuming by file); returns {file: (bytes, sha256)}."""
    import requests
    from nougat.utils import checkpoint as nck

    created = not to.exists()
    to.mkdir(parents=True, exist_ok=True)
    try:
        for name in FILES:
            target = to / name
            if target.exists():
                log.info("%s: present, kept", target)
                continue
            url = f"{nck.BASE_URL}/{model_tag}/{name}"
            data = nck.download_as_bytes_with_progress(url, name)
            if len(data) <= 15:  # nougat's own sanity bound: an error page, not a file
                raise FetchError(f"{url} returned no file ({len(data)} bytes): is {model_tag!r} a "
                                 f"nougat model tag (0.1.0-small, 0.1.0-base)?")
            part = to / f".{name}.part"
            part.write_bytes(data)
            part.replace(target)
    except requests.RequestException as e:
        raise FetchError(f"cannot download {model_tag} from {nck.BASE_URL}: "
                         f"{type(e).__name__} (offline? fetch on a node with internet, then copy "
                         f"or mount the dir and pass --checkpoint)") from e
    finally:
        if created and not any(p for p in to.iterdir() if not p.name.startswith(".")):
            for p in to.iterdir():
                p.unlink()
            to.rmdir()
    sums = {name: ((to / name).stat().st_size, sha256_file(to / name)) for name in FILES}
    (to / SUMS).write_text("".join(f"{digest}  {name}\n" for name, (_, digest) in sums.items()))
    return sums


def run_fetch_model(argv: list[str]) -> int:
    """The `fetch-model` command: fetch, then print one line per file (size, sha256)."""
    parser = argparse.ArgumentParser(
        prog="nougat-dist fetch-model",
        description="Download a Nougat checkpoint with nougat's own URLs into DIR (shared storage "
                    "for offline nodes). Re-run to resume; prints and writes SHA256SUMS. Then: "
                    "nougat-dist run --checkpoint DIR ...")
    parser.add_argument("model", metavar="NAME", help="Model tag: 0.1.0-small or 0.1.0-base.")
    parser.add_argument("--to", required=True, type=Path, metavar="DIR", help="Checkpoint dir.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        sums = fetch(args.model, args.to)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, (size, digest) in sums.items():
        print(f"{digest}  {size:>12}  {name}")
    print(f"checkpoint {args.model} in {args.to} ({args.to / SUMS}); use --checkpoint {args.to}")
    return 0
