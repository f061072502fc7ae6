"""The wheel on its own: built from the repo, installed into a fresh venv, run from outside the repo.

The venv reuses the pinned stack of the interpreter running the tests through a .pth line (so the
test installs nothing from the network and takes seconds); nougat_dist itself comes only from the
wheel, which the test checks before it runs anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from testing import fake_model

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path, timeout: float = 300,
         extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra_env or {})
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; returns its bin dir."""
    base = tmp_path_factory.mktemp("wheel")
    # Built from a copy of what the wheel holds, so the build writes nothing into the repo.
    src = base / "src"
    shutil.copytree(ROOT / "nougat_dist", src / "nougat_dist", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "slurm", src / "slurm")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(dist), str(src)], cwd=base)
    (whl,) = dist.glob("nougat_dist-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "nougat_dist/data/ocr.sbatch" in names
    assert not any(n.startswith(("testing/", "tests/")) for n in names), "test support shipped"
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=base).stdout.strip())
    # The pinned stack, appended after the venv's own site-packages.
    (site / "pinned-stack.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q",
          str(whl)], cwd=base)
    where = _run([str(py), "-c", "import nougat_dist; print(nougat_dist.__file__)"], cwd=base)
    assert where.stdout.strip().startswith(str(site)), where.stdout
    return env_dir / "bin"


def test_wheel_commands_and_a_two_rank_job(installed: Path, sample_pdfs: list[Path],
                                           tmp_path: Path) -> None:
    exe = str(installed / "nougat-dist")
    top = _run([exe, "--help"], cwd=tmp_path).stdout
    assert top.startswith("usage: nougat-dist COMMAND")
    for name in ("run", "plan", "status", "clean", "chunk", "upload", "fetch-model", "slurm-script"):
        assert f"\n  {name} " in top, name
    run_help = _run([exe, "run", "--help"], cwd=tmp_path).stdout
    assert run_help.startswith("usage: nougat-dist run") and "(default: True)" not in run_help
    script = _run([exe, "slurm-script"], cwd=tmp_path).stdout
    assert script.startswith("#!") and f"else PYTHON={installed / 'python'}; fi" in script
    out = tmp_path / "out"
    # The fake model from a copy of the checkout's testing/ package alone: the job imports it
    # through the model hook, and nougat_dist still only from the wheel.
    support = tmp_path / "support"
    shutil.copytree(ROOT / "testing", support / "testing", ignore=shutil.ignore_patterns("__pycache__"))
    _run([str(installed / "python"), "-m", "torch.distributed.run", "--standalone",
          "--nproc_per_node=2", "--no-python", exe, "run", "--input", str(sample_pdfs[0].parent),
          "--output", str(out), "--device", "cpu", "--num-workers", "0"], cwd=tmp_path,
         extra_env={"PYTHONPATH": str(support), **fake_model.env("delay=0")})
    stats = json.loads((out / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["pages_by_status"], stats
    assert stats["versions"]["nougat-dist"] == "0.1.0"
    assert stats["versions"]["nougat-dist-commit"] is None  # installed, not a checkout
    status = _run([exe, "status", str(out)], cwd=tmp_path).stdout
    assert "finished" in status.lower(), status


def test_declared_ranges_hold_the_tested_pins() -> None:
    """pyproject's ranges admit every exact pin of requirements.txt (what the tests run)."""
    import tomllib

    from packaging.requirements import Requirement

    declared = {Requirement(r).name.lower(): Requirement(r)
                for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==")
            pins[name.strip().lower()] = ver.strip()
    assert set(declared) == set(pins), set(declared) ^ set(pins)
    for name, ver in pins.items():
        assert declared[name].specifier.contains(ver), f"{name}=={ver} outside {declared[name]}"
    assert sum("==" in str(r.specifier) for r in declared.values()) <= 2  # only the load-bearing ones
