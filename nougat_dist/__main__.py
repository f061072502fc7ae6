"""`python -m nougat_dist <stage> ...`: the CPU post stages that run after the OCR job.

Each subcommand is an entry of SUBCOMMANDS: name -> (help, module, add_args, run), so adding a
stage is one module with two functions and one line here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

from nougat_dist.errors import SetupError, UsageError

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

# name -> (help, module, add_args function, run function). Modules load only for the command that
# runs, so `nougat-dist --help` needs neither pyarrow nor torch.
SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    "status": ("how a job is going (running, finished, stopped or crashed): pages done, "
               "remaining, failed, speed, ETA; --watch refreshes",
               "nougat_dist.store.status", "add_status_args", "run_status"),
    "finalize": ("(re)build documents/ and stats.json from the committed pages, without OCR: after "
                 "a job killed in its end phase, or to redo it with another --memory-budget",
                 "nougat_dist.store.finalize", "add_finalize_args", "run_finalize"),
    "clean": ("drop failed pages and MISSING_PAGE markers, normalise whitespace, remove repeated-"
              "line junk and low-quality pages, exact dedup; writes OUTPUT/clean/ and a report",
              "nougat_dist.stages.postprocess", "add_clean_args", "run_clean"),
    "chunk": ("cut OUTPUT/clean/pages/ into token-limited chunks at markdown section and "
              "paragraph boundaries; writes OUTPUT/chunks/",
              "nougat_dist.stages.chunk", "add_chunk_args", "run_chunk"),
    "upload": ("push the Parquet dataset in OUTPUT to a Hugging Face Hub dataset repo with a "
               "generated dataset card (--dry-run prints the plan)",
               "nougat_dist.stages.upload", "add_upload_args", "run_upload"),
    "selftest": ("check a node before a long job: CUDA/NCCL/bf16, /dev/shm, launcher text == stock "
                 "nougat text on a generated PDF, model-only vs pipeline pages/s, and on a GPU the "
                 "largest --batch-size a worst-case decode fits",
                 "nougat_dist.selftest", "add_selftest_args", "run_selftest"),
}


def _load(name: str) -> tuple[AddArgs, Run]:
    _, module, add_args, run = SUBCOMMANDS[name]
    mod = importlib.import_module(module)
    return getattr(mod, add_args), getattr(mod, run)


def build_parser(prog: str = "python -m nougat_dist",
                 command: str | None = None) -> argparse.ArgumentParser:
    """The stages' parser: one subparser per SUBCOMMANDS entry (only `command`'s flags loaded
    when it is given)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Post stages for a finished nougat-dist job's output dir, usually in this "
                    "order: clean, chunk, upload.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, *_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command or command is None:
            add_args, run = _load(name)
            add_args(p)
            p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m nougat_dist") -> int:
    """Run one post stage (`nougat-dist status|clean|chunk|upload ...`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(prog, command).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (UsageError, SetupError) as e:
        # Missing inputs, bad thresholds and a held lease are the user's to fix: one line, no
        # traceback. Any other error is a bug or a failure whose traceback is needed to fix it.
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
