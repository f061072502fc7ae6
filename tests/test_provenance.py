"""stats.json says which nougat-dist made it: the version and, from a checkout, the commit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import ROOT, run_launch
from nougat_dist.provenance import git_commit
from testing import fake_model


def test_stats_name_version_and_commit(sample_pdfs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_launch(["--input", str(sample_pdfs[0]), "--output", str(out)],
               env=fake_model.env("delay=0"))
    versions = json.loads((out / "stats.json").read_text())["versions"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert versions["nougat-dist-commit"].split("+")[0] == head
    assert "nougat-dist" in versions


def test_no_commit_outside_a_checkout(tmp_path: Path) -> None:
    assert git_commit(tmp_path / "nougat_dist") is None
