"""`nougat-dist slurm-script`: print the Slurm batch script that ships with the package.

The script (slurm/ocr.sbatch in the repo, nougat_dist/data/ocr.sbatch in the wheel) runs the
launcher from a clone when NOUGAT_DIST_DIR holds launch.py, else the installed package. Printed from
an install, its default PYTHON is the interpreter that has nougat-dist, so
`nougat-dist slurm-script > ocr.sbatch && sbatch ocr.sbatch` works without a clone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import resources

log = logging.getLogger(__name__)

# The line of the script that picks its Python when neither PYTHON nor a repo .venv is set.
_DEFAULT_PYTHON = "else PYTHON=python3; fi"


def script_text(python: str = sys.executable) -> str:
    """The batch script, with `python` as its fallback interpreter."""
    text = resources.files("nougat_dist").joinpath("data/ocr.sbatch").read_text(encoding="utf-8")
    if _DEFAULT_PYTHON not in text:
        raise RuntimeError("ocr.sbatch no longer has its default-PYTHON line; update slurm_script.py")
    return text.replace(_DEFAULT_PYTHON, f"else PYTHON={python}; fi", 1)


def run_slurm_script(argv: list[str]) -> int:
    """Print the script to stdout (redirect it into a file and sbatch that)."""
    parser = argparse.ArgumentParser(
        prog="nougat-dist slurm-script",
        description="Print the Slurm batch script: nougat-dist slurm-script > ocr.sbatch; then set "
                    "INPUT, OUTPUT (and CHECKPOINT) and sbatch it. See the comments at its top.")
    parser.add_argument("--python", default=sys.executable,
                        help="Interpreter the script runs when PYTHON is not set (default: this one).")
    args = parser.parse_args(argv)
    sys.stdout.write(script_text(args.python))
    return 0
