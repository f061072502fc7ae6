"""Entry point: `python launch.py ...` (one process) or `torchrun --nproc_per_node=N launch.py ...`.

`python launch.py --help` explains every flag."""

import sys

from nougat_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
