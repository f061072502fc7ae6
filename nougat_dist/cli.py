"""The command line: `nougat-dist COMMAND ...` (the console script) and the launcher behind
`nougat-dist run` / `launch.py`.

`nougat-dist run ...` is the OCR job (under torchrun: `torchrun --no-python nougat-dist run ...`);
`plan` is `run --plan`; the other commands are the stages of __main__.SUBCOMMANDS plus
`slurm-script`. Heavy imports wait until after parsing, so `--help` and `--print-config` answer at
once and work in an environment without torch.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import logging
import multiprocessing
import signal
import sys
from pathlib import Path
from typing import Any

from nougat_dist.config import Config, parse_args, to_yaml

EXIT_SETUP = 2
log = logging.getLogger("nougat_dist")


PROG = "nougat-dist"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The OCR job (launch.py, `nougat-dist run`): parse the flags and run this rank."""
    cfg, actions = parse_args(argv, prog=prog)
    if actions.print_config:
        print(to_yaml(cfg), end="")
        return 0
    _prepare_process(cfg)
    return _run_rank(cfg, plan_only=actions.plan)


def _prepare_process(cfg: Config) -> None:
    """What must happen before torch and nougat load, and what the whole process keeps."""
    from nougat_dist.log import filter_known_warnings

    filter_known_warnings()  # before the imports below: torch and nougat warn while importing
    from nougat_dist.alloc import keep_freed_memory

    keep_freed_memory()  # before torch and nougat load: their allocations count too
    from nougat_dist.inputs.members import set_max_member_bytes
    from nougat_dist.ocr.raster import set_max_page_pixels

    set_max_member_bytes(cfg.max_member_bytes)
    set_max_page_pixels(cfg.max_page_pixels)
    importlib.import_module("nougat_dist.worker")  # torch, transformers, timm, nltk: then freeze

    # torch, transformers, timm and nltk leave ~500k objects that live as long as the process.
    # Frozen, the cyclic collector stops re-scanning them during the run, and at exit, where
    # collecting them cost 1.5 s per rank on this project's 2-core machine.
    gc.freeze()
    # `kill -QUIT <pid>` prints every thread's Python stack to stderr: how to see where a stuck
    # rank (or one of its render workers, which inherit this) is waiting.
    faulthandler.register(signal.SIGQUIT, all_threads=True)


def _run_rank(cfg: Config, plan_only: bool) -> int:
    """Join the job, set up the output (a bucket's staging dir) and the log, run this rank's part,
    and end it: the attempt record, the bucket push, the process group, leftover workers."""
    from nougat_dist import dist as ndist
    from nougat_dist import log as nlog
    from nougat_dist.errors import SetupError
    from nougat_dist.ocr.model import CheckpointError
    from nougat_dist.store.attempts import AttemptRecord, begin_when_leased
    from nougat_dist.store.bucket import BucketSync, is_bucket
    from nougat_dist.worker import run

    nlog.setup(None, 0)
    end = _RankEnd(cfg)
    try:
        info = end.info = ndist.init(cfg.device, control_backend=cfg.control_backend,
                                     timeout_s=ndist.collective_timeout_s(
                                         cfg.collective_timeout, cfg.render_timeout,
                                         cfg.num_workers, cfg.batch_size))
        if is_bucket(cfg.output):
            # The job writes a node-local staging dir; BucketSync keeps the bucket in step.
            end.sync = BucketSync(cfg.output)
            end.sync.start(rank=info.rank, local_rank=info.local_rank,
                           barrier=lambda: _barrier(info), read_only=plan_only)
            cfg.output = str(end.sync.local)
        # A plan writes nothing into the output dir, not even a log.
        nlog.setup(None if plan_only else Path(cfg.output), info.rank, cfg.log_level)
        if not plan_only:
            end.record = AttemptRecord(Path(cfg.output), info.rank, info.world_size, str(info.device))
            begin_when_leased(end.record)
        end.rc = run(cfg, info, plan_only=plan_only)
    except (SetupError, CheckpointError, ndist.DeviceError) as e:
        # Every rank logs it (the console shows rank 0's, and every rank's before its logging
        # is set up): a device or /dev/shm error can be one rank's or one node's alone.
        log.error("%s", e)
        end.rc = EXIT_SETUP
    except Exception as e:
        if isinstance(e, RuntimeError):
            # A broken collective (a peer node died) reads "Connection closed by peer [addr]".
            end.reason = f"error: {(str(e).splitlines() or [type(e).__name__])[0][:300]}"
        # The traceback goes to the rank log (DEBUG: the console shows INFO and up, and gets the
        # traceback from the interpreter as the exception leaves the process).
        log.debug("this rank failed", exc_info=True)
        raise
    finally:
        pushed = end.close()
    if not pushed and end.rc == 0:
        return 1  # complete here, but not in the bucket: not a success
    return end.rc


class _RankEnd:
    """What a rank must do on its way out, however it ends."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.info: Any = None
        self.sync: Any = None  # BucketSync of a bucket output
        self.record: Any = None  # AttemptRecord, once the lease is ours
        self.rc: int | None = None
        self.reason = "error (see the rank log)"

    def close(self) -> bool:
        """Record the attempt's end, push a bucket output, leave the process group and stop any
        render worker left alive. Returns False if the push failed."""
        from nougat_dist import dist as ndist
        from nougat_dist.store.layout import OutputDir

        if self.record is not None:
            self.record.end(self.rc, None if self.rc is not None else self.reason)
        pushed = True
        if self.sync is not None:
            try:
                done = self.rc == 0 and OutputDir(self.cfg.output).stats.exists()
                self.sync.close(rank=self.info.rank, complete=done)
            except OSError as e:
                pushed = False
                log.error("could not push the output to %s: %s; run the same command again to "
                          "push it", self.sync.url, e)
        ndist.teardown()
        # A render worker left alive by an unforeseen path would hang the exit (it ignores the
        # SIGTERM multiprocessing's exit handler sends before joining it): the job is over here.
        for child in multiprocessing.active_children():
            child.kill()
            child.join(5)
        gc.freeze()  # what the run allocated is freed by the exit, not by a last full collection
        return pushed


def _barrier(info) -> None:
    if info.distributed:
        import torch.distributed as dist

        dist.barrier(group=info.control_group)


def _usage() -> str:
    from nougat_dist.__main__ import SUBCOMMANDS

    rows = [("run", "OCR PDFs into a Parquet dataset (under torchrun: torchrun --no-python "
                    "nougat-dist run ...); --help lists every flag"),
            ("plan", "build the manifest and print documents, pages, the split over ranks and a "
                     "wall-time estimate, without OCR (run --plan)")]
    rows += [(name, entry[0]) for name, entry in SUBCOMMANDS.items()]
    rows.append(("fetch-model", "download a checkpoint into a dir for offline nodes (resumes; "
                                "prints SHA256SUMS): fetch-model 0.1.0-small --to DIR"))
    rows.append(("slurm-script", "print the Slurm batch script (nougat-dist slurm-script > ocr.sbatch)"))
    width = max(len(n) for n, _ in rows)
    lines = [f"usage: {PROG} COMMAND [ARGS...]   ({PROG} COMMAND --help for each)", "",
             "Run the unmodified Nougat OCR model over many PDFs on every GPU (or CPU) of a box or "
             "a Slurm job, resumably, into a Parquet dataset.", "", "commands:"]
    lines += [f"  {n:<{width}}  {h}" for n, h in rows]
    return "\n".join(lines) + "\n"


def entry(argv: list[str] | None = None) -> int:
    """`nougat-dist COMMAND ...`, the console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "run":
        return main(rest, prog=f"{PROG} run")
    if command == "plan":
        return main(["--plan", *rest], prog=f"{PROG} plan")
    if command.startswith("-"):
        # `nougat-dist --input ... --output ...`, as launch.py takes them: still the job.
        return main(args, prog=PROG)
    if command == "fetch-model":
        from nougat_dist.fetch_model import run_fetch_model

        return run_fetch_model(rest)
    if command == "slurm-script":
        from nougat_dist.slurm_script import run_slurm_script

        return run_slurm_script(rest)
    from nougat_dist.__main__ import SUBCOMMANDS
    from nougat_dist.__main__ import main as stage_main

    if command in SUBCOMMANDS:
        return stage_main(args, prog=PROG)
    print(f"{PROG}: unknown command {command!r}\n\n{_usage()}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
