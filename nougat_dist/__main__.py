"""`python -m nougat_dist <stage> ...`: the CPU post stages that run after the OCR job.

Each subcommand is an entry of SUBCOMMANDS: name -> (help, add_args, run), so adding a stage is
one module with two functions and one line here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from nougat_dist.stages.postprocess import add_chunk_args, add_clean_args, run_chunk, run_clean
from nougat_dist.store.status import add_status_args, run_status
from nougat_dist.stages.upload import add_upload_args, run_upload

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

SUBCOMMANDS: dict[str, tuple[str, AddArgs, Run]] = {
    "status": ("how a job is going (running, finished, stopped or crashed): pages done, "
               "remaining, failed, speed, ETA; --watch refreshes", add_status_args, run_status),
    "clean": ("drop failed pages and MISSING_PAGE markers, normalise whitespace, remove repeated-"
              "line junk and low-quality pages, exact dedup; writes OUTPUT/clean/ and a report",
              add_clean_args, run_clean),
    "chunk": ("cut OUTPUT/clean/pages.parquet into token-limited chunks at markdown section and "
              "paragraph boundaries; writes OUTPUT/chunks/", add_chunk_args, run_chunk),
    "upload": ("push the Parquet dataset in OUTPUT to a Hugging Face Hub dataset repo with a "
               "generated dataset card (--dry-run prints the plan)", add_upload_args, run_upload),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nougat_dist",
        description="Post stages for a finished nougat-dist job's output dir, usually in this "
                    "order: clean, chunk, upload.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, run) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as e:
        # Missing inputs and bad thresholds are the user's to fix: one line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
