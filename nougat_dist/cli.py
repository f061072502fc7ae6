"""The launcher's entry (`launch.py`, `nougat-dist`). Heavy imports wait until after parsing, so
`--help` and `--print-config` answer at once and work in an environment without torch."""

from __future__ import annotations

import faulthandler
import gc
import logging
import multiprocessing
import signal
import sys
from pathlib import Path

from nougat_dist.config import parse_args, to_yaml

EXIT_SETUP = 2
log = logging.getLogger("nougat_dist")


def main(argv: list[str] | None = None) -> int:
    cfg, actions = parse_args(argv)
    if actions.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from nougat_dist.alloc import keep_freed_memory

    keep_freed_memory()  # before torch and nougat load: their allocations count too
    from nougat_dist import dist as ndist
    from nougat_dist import log as nlog
    from nougat_dist.errors import SetupError
    from nougat_dist.worker import run
    from nougat_dist.ocr.model import CheckpointError

    # torch, transformers, timm and nltk leave ~500k objects that live as long as the process.
    # Frozen, the cyclic collector stops re-scanning them during the run, and at exit, where
    # collecting them cost 1.5 s per rank on this project's 2-core machine (bench/README).
    gc.freeze()
    # `kill -QUIT <pid>` prints every thread's Python stack to stderr: how to see where a stuck
    # rank (or one of its render workers, which inherit this) is waiting.
    faulthandler.register(signal.SIGQUIT, all_threads=True)
    from nougat_dist.store.attempts import AttemptRecord

    nlog.setup(None, 0)
    record: AttemptRecord | None = None
    rc: int | None = None
    reason = "error (see the rank log)"
    try:
        info = ndist.init(cfg.device, control_backend=cfg.control_backend)
        nlog.setup(Path(cfg.output), info.rank, cfg.log_level)
        if not actions.plan:
            record = AttemptRecord(Path(cfg.output), info.rank, info.world_size, str(info.device))
            if not record.begin():
                record = None
        rc = run(cfg, info, plan_only=actions.plan)
        return rc
    except (SetupError, CheckpointError, ndist.DeviceError) as e:
        # Every rank logs it (the console shows rank 0's, and every rank's before its logging
        # is set up): a device or /dev/shm error can be one rank's or one node's alone.
        log.error("%s", e)
        rc = EXIT_SETUP
        return rc
    except RuntimeError as e:
        # A broken collective (a peer node died) reads "Connection closed by peer [addr]".
        reason = f"error: {(str(e).splitlines() or [type(e).__name__])[0][:300]}"
        raise
    finally:
        if record is not None:
            record.end(rc, None if rc is not None else reason)
        ndist.teardown()
        # A render worker left alive by an unforeseen path would hang the exit (it ignores the
        # SIGTERM multiprocessing's exit handler sends before joining it): the job is over here.
        for child in multiprocessing.active_children():
            child.kill()
            child.join(5)
        gc.freeze()  # what the run allocated is freed by the exit, not by a last full collection


if __name__ == "__main__":
    sys.exit(main())
