"""The Dockerfile: passes an offline linter, and its pins are the project's pins.

No Docker engine runs on the project's machines, so the image is never built here; these checks
are what can be verified without one. The linter (npm `dockerfilelint`) is installed into a cache
directory on first use; if that fails the test fails (it is never silently skipped).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LINTER = "dockerfilelint"
LINTER_VERSION = "1.8.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nougat-dist" / "npm"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, ver = line.split("==", 1)
            pins[_norm(name)] = ver.strip()
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip().lower())


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


@pytest.fixture(scope="module")
def linter() -> Path:
    found = shutil.which(LINTER)
    if found:
        return Path(found)
    exe = CACHE / "node_modules" / ".bin" / LINTER
    if not exe.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(f"{LINTER} is not installed and npm is missing: install Node.js/npm "
                        f"(Debian: apt-get install npm) or `npm install -g {LINTER}`")
        CACHE.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([npm, "install", "--prefix", str(CACHE), "--no-audit", "--no-fund",
                               f"{LINTER}@{LINTER_VERSION}"], capture_output=True, text=True, timeout=240)
        if proc.returncode != 0 or not exe.exists():
            pytest.fail(f"npm install {LINTER}@{LINTER_VERSION} failed ({proc.returncode}):\n"
                        f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return exe


def _lint(linter: Path, target: Path) -> list[dict]:
    proc = subprocess.run([str(linter), "-j", str(target)], capture_output=True, text=True, timeout=60)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise AssertionError(f"{LINTER} gave no JSON ({proc.returncode}): {proc.stdout}{proc.stderr}") from e
    return [issue for f in report["files"] for issue in f["issues"]]


@pytest.mark.timeout(300)  # includes the first npm install
def test_linter_available(linter: Path) -> None:
    assert linter.exists()


@pytest.mark.timeout(60)
def test_dockerfile_passes_linter(linter: Path, tmp_path: Path) -> None:
    issues = _lint(linter, DOCKERFILE)
    assert not issues, "\n".join(f"line {i['line']}: {i['title']}: {i['content']}" for i in issues)
    # The linter does report problems (so a clean result means something).
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install unrar\n")
    titles = {i["title"] for i in _lint(linter, bad)}
    assert "Base Image Latest Tag" in titles, titles


@pytest.mark.timeout(60)
def test_pins_match_requirements() -> None:
    req = _pins(ROOT / "requirements.txt")
    text = DOCKERFILE.read_text()
    ins = _instructions()
    # The base image's torch is the pinned torch.
    base = [arg for word, arg in ins if word == "FROM"]
    assert len(base) == 1, base
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-runtime(@sha256:[0-9a-f]{64})?", base[0])
    assert m, f"base image is not a pinned PyTorch CUDA runtime tag: {base[0]}"
    assert m.group(1) == req["torch"], f"base image torch {m.group(1)} != requirements.txt torch=={req['torch']}"
    # Any version the Dockerfile names itself agrees with requirements.txt.
    for name, ver in re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][A-Za-z0-9.+\-]*)", text):
        assert _norm(name) in req, f"Dockerfile pins {name}=={ver}, which requirements.txt does not"
        assert req[_norm(name)] == ver, f"Dockerfile pins {name}=={ver}, requirements.txt {req[_norm(name)]}"
    # Python packages come from the pinned files, not from ad-hoc installs.
    pip_runs = [arg for word, arg in ins if word == "RUN" and "pip install" in arg
                and "--no-deps /app" not in arg]
    assert len(pip_runs) == 1, pip_runs
    assert "-r requirements.txt" in pip_runs[0] and "constraints" in pip_runs[0], pip_runs[0]
    # The freeze and the requirements agree where both pin a package.
    freeze = _pins(ROOT / "constraints.txt")
    for name, ver in req.items():
        if name in freeze:
            assert freeze[name] == ver, f"constraints.txt {name}=={freeze[name]} != requirements.txt {ver}"
    assert "sys.version_info[:2] == (3, 11)" in text


@pytest.mark.timeout(60)
def test_dockerfile_shape() -> None:
    ins = _instructions()
    runs = [arg for word, arg in ins if word == "RUN"]
    apt = [r for r in runs if "apt-get" in r]
    assert len(apt) == 1, f"one apt layer expected, got {len(apt)}"
    # RAR comes from the unrar2-cffi wheel, not from a system package.
    assert not re.search(r"\bun(rar|ar)\b", apt[0]), apt[0]
    assert "rm -rf /var/lib/apt/lists" in apt[0]
    assert any("nltk.downloader" in r and "words" in r for r in runs)
    users = [arg for word, arg in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    # The smoke step imports the heavy stack itself (--help alone imports neither torch nor nougat).
    smoke = runs[-1]
    for module in ("torch", "nougat", "unrar.cffi", "nougat_dist.worker"):
        assert re.search(rf"import .*\b{re.escape(module)}\b", smoke), (module, smoke)
    assert "nougat-dist --help" in smoke
    assert any("pip install --no-deps /app" in r for r in runs), "the console script is not installed"
    assert [arg for word, arg in ins if word == "ENTRYPOINT"] == ['["nougat-dist"]']
    assert ins[-1] == ("CMD", '["--help"]')
    assert any(word == "ARG" and arg.startswith("NOUGAT_MODEL=") for word, arg in ins)
    assert "--ipc=host" in DOCKERFILE.read_text()
    assert not any("git clone" in r for r in runs)


@pytest.mark.timeout(60)
def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for pattern in (".git", ".venv", "tests"):
        assert pattern in patterns, f".dockerignore should exclude {pattern}"
    for word, arg in _instructions():
        if word != "COPY":
            continue
        sources = arg.split()[:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src} does not exist"
            hit = [p for p in patterns if fnmatch.fnmatch(src, p) or fnmatch.fnmatch(src, p.lstrip("*/"))]
            assert not hit, f"COPY {src} is excluded by .dockerignore {hit}"
