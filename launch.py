"""Entry point: `python launch.py ...` (one process) or `torchrun --nproc_per_node=N launch.py ...`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from nougat_dist import dist as ndist
from nougat_dist import log as nlog
from nougat_dist.config import parse_args
from nougat_dist.job import SetupError, run
from nougat_dist.runner import CheckpointError

EXIT_SETUP = 2
log = logging.getLogger("launch")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    rank = 0
    try:
        info = ndist.init(cfg.device)
        rank = info.rank
        nlog.setup(Path(cfg.output), info.rank, cfg.log_level)
        return run(cfg, info)
    except (SetupError, CheckpointError, ndist.DeviceError) as e:
        if rank == 0:
            log.error("%s", e)
        return EXIT_SETUP
    finally:
        ndist.teardown()


if __name__ == "__main__":
    nlog.setup(None, 0)
    sys.exit(main())
