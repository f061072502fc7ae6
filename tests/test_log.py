"""A run's console holds only the project's own lines: the known third-party warnings are
filtered, precisely (an unknown warning from the same modules still shows)."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

from conftest import run_launch
from nougat_dist import log as nlog

# What the console may hold: our log lines (level first), tqdm's progress bar, blank lines.
OWN = re.compile(r"^(INFO|WARNING|ERROR|DEBUG) |^OCR[: ]|^\s*$")


def test_console_holds_only_project_lines(tiny_checkpoint: Path, sample_pdfs: list[Path],
                                          tmp_path: Path) -> None:
    proc = run_launch(["--input", str(sample_pdfs[0]), "--output", str(tmp_path / "out"),
                       "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                       "--num-workers", "0"], nproc=2,
                      env={"OMP_NUM_THREADS": "1"})  # else torchrun prints its own banner
    lines = [ln for ln in re.split(r"[\r\n]", proc.stderr + proc.stdout) if ln.strip()]
    foreign = [ln for ln in lines if not OWN.match(ln)]
    assert not foreign, "\n".join(foreign)
    assert not any("Warning" in ln for ln in lines), proc.stderr
    assert any(ln.startswith("INFO ") for ln in lines)  # the console did show the run


def test_filters_are_precise() -> None:
    """Without the filters these messages show (the trial proves they are real); with them, only
    the known message from its module is silenced."""
    code = ("import warnings, sys; from nougat_dist import log; "
            "sys.argv[1:] and log.filter_known_warnings(); import torch; "
            "torch.meshgrid(torch.arange(2), torch.arange(2)); "
            "warnings.warn_explicit('torch.meshgrid: in an upcoming release, it will be required "
            "to pass the indexing argument', UserWarning, 'elsewhere.py', 1, module='elsewhere')")
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    filtered = subprocess.run([sys.executable, "-c", code, "on"], capture_output=True, text=True,
                              timeout=120)
    assert plain.stderr.count("torch.meshgrid: in an upcoming release") == 2, plain.stderr
    assert filtered.stderr.count("torch.meshgrid: in an upcoming release") == 1, filtered.stderr
    assert "elsewhere.py" in filtered.stderr  # the same text from another module still shows
    with warnings.catch_warnings():
        nlog.filter_known_warnings()
        assert all(f[0] == "ignore" and f[1] is not None and f[3] is not None
                   for f in warnings.filters[:len(nlog.KNOWN_HARMLESS)])  # message and module set
