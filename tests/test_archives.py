"""Archive input: PDFs in ZIP/TAR/RAR become documents with the same doc_ids as loose files.

RAR members are decompressed by unrar2-cffi (bundled UnRAR library): no system tool is needed.
RAR test archives come from the rarfile 4.5 sdist on PyPI (rar3/rar5, solid, multi-volume,
password, header-password), downloaded once into the user's cache dir. Their members are text
files with known contents, so they test the archive layer with `.txt` as the member suffix. PDFs
in RAR use a RAR5 archive this file writes itself (stored members, format per the public RAR5
technote): real `rar` is non-free and cannot be installed here.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import run_launch
from testing import fake_model
from nougat_dist.inputs import archives
from nougat_dist.inputs import sources
from nougat_dist.store.manifest import build_entries, inspect, unique_docs
from nougat_dist.inputs.sources import Source, discover, read_bytes

RARFILE_SDIST = "rarfile-4.5.tar.gz"
RARFILE_SDIST_SHA256 = "7425d0afa180f0092db903abb1526a130b36858980aad90b3694f48e41420155"
# Contents of the sdist's test members, known without any RAR reader.
STEST = "".join(f"{i:03d}\n" for i in range(512)).encode()
BIGFILE = "".join(f"{i:>40}\n" for i in range(1, 5001)).encode()


# --- helpers -------------------------------------------------------------------------------------

def _vint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _rar5_block(body: bytes) -> bytes:
    size = _vint(len(body))
    return struct.pack("<I", zlib.crc32(size + body)) + size + body


def write_rar5_stored(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A RAR5 archive with stored (uncompressed) members: main header, file headers, end header."""
    parts = [b"Rar!\x1a\x07\x01\x00", _rar5_block(_vint(1) + _vint(0) + _vint(0))]
    for name, data in members:
        nb = name.encode()
        # file flags 0x4 = CRC32 present; compression info 0 = store; host OS 1 = Unix
        fields = (_vint(0x0004) + _vint(len(data)) + _vint(0o644) + struct.pack("<I", zlib.crc32(data))
                  + _vint(0) + _vint(1) + _vint(len(nb)) + nb)
        parts += [_rar5_block(_vint(2) + _vint(0x0002) + _vint(len(data)) + fields), data]
    parts.append(_rar5_block(_vint(5) + _vint(0) + _vint(0)))
    path.write_bytes(b"".join(parts))
    return path


def write_zip(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(("gz", "tgz")) else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nougat-dist-tests"


@pytest.fixture(scope="session")
def rar_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rarfile sdist's test/files dir (downloaded once per machine, verified by sha256)."""
    cache = _cache_dir()
    sdist = cache / RARFILE_SDIST
    if not sdist.exists() or hashlib.sha256(sdist.read_bytes()).hexdigest() != RARFILE_SDIST_SHA256:
        cache.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "rarfile==4.5", "--no-binary",
                               ":all:", "--no-deps", "--no-build-isolation", "-d", str(cache)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0 or not sdist.exists():
            pytest.fail(f"cannot download the rarfile sdist from PyPI (the RAR tests need it):\n"
                        f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    assert digest == RARFILE_SDIST_SHA256, f"{sdist} has sha256 {digest}"
    out = tmp_path_factory.mktemp("rarfile-sdist")
    with tarfile.open(sdist) as tf:
        tf.extractall(out, filter="data")
    return out / "rarfile-4.5" / "test" / "files"


@pytest.fixture(autouse=True)
def _no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(archives.PASSWORD_ENV, raising=False)


@pytest.fixture()
def pdf_bytes(sample_pdfs: list[Path]) -> list[bytes]:
    return [p.read_bytes() for p in sample_pdfs]


# --- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,safe", [
    ("a.pdf", True), ("dir/sub/a.pdf", True), ("./a.pdf", True), ("a..b.pdf", True),
    ("../a.pdf", False), ("dir/../../a.pdf", False), ("/etc/a.pdf", False), ("C:/a.pdf", False),
    ("c:a.pdf", False), ("..\\a.pdf", False), ("\\\\server\\a.pdf", False), ("", False),
])
def test_is_safe_member(name: str, safe: bool) -> None:
    assert archives.is_safe_member(name) is safe


@pytest.mark.parametrize("name,later", [
    ("x.rar", False), ("x.part1.rar", False), ("x.part01.rar", False), ("x.part2.rar", True),
    ("x.PART10.RAR", True), ("x.r00", False), ("part2.rar", False),
])
def test_is_later_volume(name: str, later: bool) -> None:
    assert archives.is_later_volume(name) is later


# --- PDFs in archives ----------------------------------------------------------------------------

def test_archived_pdfs_get_loose_file_doc_ids(tmp_path: Path, sample_pdfs: list[Path],
                                              pdf_bytes: list[bytes]) -> None:
    """ZIP, TAR, TAR.GZ and RAR members hash to the same doc_ids as the loose files; the same PDF
    in several archives is one document; unsafe names are error rows, never read."""
    members = [(f"papers/{p.name}", b) for p, b in zip(sample_pdfs, pdf_bytes)]
    inbox = tmp_path / "inbox"
    (inbox / "nested").mkdir(parents=True)
    write_zip(inbox / "a.zip", members + [("notes.txt", b"not a pdf"), ("../escape.pdf", pdf_bytes[0])])
    write_tar(inbox / "nested" / "b.tar.gz", members[:2])
    write_tar(inbox / "c.tar", members[2:])
    write_rar5_stored(inbox / "d.rar", members + [("/abs/evil.pdf", pdf_bytes[1])])

    found = discover([str(inbox)])
    assert [(Path(s.source).name, s.member) for s in found] == [
        ("a.zip", "papers/" + sample_pdfs[0].name), ("a.zip", "papers/" + sample_pdfs[1].name),
        ("a.zip", "papers/" + sample_pdfs[2].name), ("a.zip", "../escape.pdf"),
        ("c.tar", "papers/" + sample_pdfs[2].name),
        ("d.rar", "papers/" + sample_pdfs[0].name), ("d.rar", "papers/" + sample_pdfs[1].name),
        ("d.rar", "papers/" + sample_pdfs[2].name), ("d.rar", "/abs/evil.pdf"),
        ("b.tar.gz", "papers/" + sample_pdfs[0].name), ("b.tar.gz", "papers/" + sample_pdfs[1].name),
    ]
    loose = {e.doc_id for _, e in build_entries([Source(str(p)) for p in sample_pdfs], 0, 1)}
    assert loose == {hashlib.sha256(b).hexdigest() for b in pdf_bytes}
    # Split over two "ranks" as the job does, then put back in order.
    entries = [e for _, e in sorted(build_entries(found, 0, 2) + build_entries(found, 1, 2))]
    good = [e for e in entries if e.error is None]
    bad = [e for e in entries if e.error is not None]
    assert {e.doc_id for e in good} == loose and len(good) == 9
    assert all(e.n_pages > 0 for e in good)
    assert [(e.member, e.error) for e in bad] == [
        ("../escape.pdf", "cannot read file: unsafe member path '../escape.pdf' in "
                          f"{inbox / 'a.zip'} (absolute, '..' or drive letter): not extracted"),
        ("/abs/evil.pdf", "cannot read file: unsafe member path '/abs/evil.pdf' in "
                          f"{inbox / 'd.rar'} (absolute, '..' or drive letter): not extracted"),
    ]
    # Same bytes in four containers: OCR'd once each (the first occurrence), the rest duplicates.
    assert len({e.doc_id for e in unique_docs(good)}) == 3


def test_list_files_globs_and_missing_archives(tmp_path: Path, sample_pdfs: list[Path],
                                               pdf_bytes: list[bytes]) -> None:
    z = write_zip(tmp_path / "one.zip", [("x.pdf", pdf_bytes[0])])
    lst = tmp_path / "inputs.txt"
    lst.write_text("one.zip\nmissing.rar\n")
    assert discover([str(lst)]) == [Source(str(z), "x.pdf"), Source(str(tmp_path / "missing.rar"))]
    assert inspect(Source(str(tmp_path / "missing.rar"))).error == "file not found"
    assert discover([str(tmp_path / "*.zip")]) == [Source(str(z), "x.pdf")]
    assert read_bytes(Source(str(z), "x.pdf")) == pdf_bytes[0]


def test_damaged_archives_are_error_rows(tmp_path: Path, pdf_bytes: list[bytes]) -> None:
    z = write_zip(tmp_path / "full.zip", [("x.pdf", pdf_bytes[0])])
    data = z.read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])  # central directory lost
    (tmp_path / "junk.tgz").write_bytes(b"this is not gzip")
    z.unlink()
    found = discover([str(tmp_path)])
    assert found == [Source(str(tmp_path / "cut.zip"), ""), Source(str(tmp_path / "junk.tgz"), "")]
    errors = [inspect(s).error for s in found]
    assert errors[0].startswith("cannot read file: damaged or not a ZIP archive:")
    assert errors[1].startswith("cannot read file: damaged or not a TAR archive:")
    # A member whose compressed bytes are damaged (listing works, reading does not).
    flip = write_zip(tmp_path / "flip.zip", [("x.pdf", pdf_bytes[0])])
    raw = bytearray(flip.read_bytes())
    raw[200] ^= 0xFF
    flip.write_bytes(bytes(raw))
    err = inspect(Source(str(flip), "x.pdf")).error
    assert err is not None and err.startswith("cannot read file: damaged ZIP member 'x.pdf'")


def test_e2e_archive_and_loose_run_once(tmp_path: Path, sample_pdfs: list[Path],
                                        pdf_bytes: list[bytes]) -> None:
    """A job over loose PDFs plus a ZIP and a RAR of the same PDFs OCRs each PDF once."""
    write_zip(tmp_path / "same.zip", [(p.name, b) for p, b in zip(sample_pdfs, pdf_bytes)])
    write_rar5_stored(tmp_path / "same.rar", [(p.name, b) for p, b in zip(sample_pdfs, pdf_bytes)])
    out = tmp_path / "out"
    run_launch(["--input", str(sample_pdfs[0].parent), str(tmp_path / "same.zip"),
                str(tmp_path / "same.rar"), "--output", str(out)],
               env=fake_model.env("delay=0"))
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(manifest) == 9
    pages = pq.read_table(out / "pages").to_pylist()
    loose_ids = {hashlib.sha256(b).hexdigest() for b in pdf_bytes}
    assert {r["doc_id"] for r in pages} == loose_ids
    assert all(r["member"] is None for r in pages)  # the loose copies came first
    per_doc = {}
    for r in pages:
        per_doc.setdefault(r["doc_id"], []).append(r["page"])
    assert all(sorted(v) == list(range(1, len(v) + 1)) for v in per_doc.values())  # each page once
    docs = pq.read_table(out / "documents").to_pylist()
    assert sorted(sorted(d["duplicates"]) for d in docs) == sorted(
        sorted([f"same.zip::{p.name}", f"same.rar::{p.name}"])  # source: from the input's folder
        for p in sample_pdfs)


# --- RAR from the rarfile sdist ------------------------------------------------------------------

def _read(path: Path, member: str) -> bytes:
    return archives.read_member(path, member)


def test_rar3_rar5_and_multivolume_known_contents(rar_files: Path) -> None:
    assert archives.list_members(rar_files / "rar3-solid.rar", (".txt",)) == ["stest1.txt", "stest2.txt"]
    assert _read(rar_files / "rar3-solid.rar", "stest2.txt") == STEST  # rar3 solid
    assert _read(rar_files / "rar5-dups.rar", "stest9.txt") == STEST  # rar5 (dedup references)
    for first in ("rar5-vols.part1.rar", "rar3-vols.part1.rar", "rar3-old.rar"):
        assert archives.list_members(rar_files / first, (".txt",)) == ["vols/bigfile.txt", "vols/smallfile.txt"]
        assert _read(rar_files / first, "vols/bigfile.txt") == BIGFILE  # spans all volumes


def test_multivolume_discovers_first_volume_only(rar_files: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for n in ("rar5-vols.part1.rar", "rar5-vols.part2.rar", "rar5-vols.part3.rar",
              "rar3-old.rar", "rar3-old.r00", "rar3-old.r01"):
        shutil.copy(rar_files / n, tmp_path / n)
    monkeypatch.setattr(sources, "MEMBER_SUFFIXES", (".txt",))
    found = discover([str(tmp_path)])
    assert [(Path(s.source).name, s.member) for s in found] == [
        ("rar3-old.rar", "vols/bigfile.txt"), ("rar3-old.rar", "vols/smallfile.txt"),
        ("rar5-vols.part1.rar", "vols/bigfile.txt"), ("rar5-vols.part1.rar", "vols/smallfile.txt"),
    ]
    assert discover([str(tmp_path / "rar5-vols.part2.rar")]) == []
    a, b = inspect(found[0]), inspect(found[2])
    assert a.doc_id == b.doc_id == hashlib.sha256(BIGFILE).hexdigest()
    assert a.error == "not a PDF (no %PDF header)"  # read fine; text, not a PDF
    # Opened directly, a later volume says what to do.
    with pytest.raises(archives.ArchiveError, match="later volume .* open the first volume"):
        archives.list_members(tmp_path / "rar5-vols.part2.rar", (".txt",))


def test_rar_password(rar_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    psw = rar_files / "rar5-psw.rar"
    with pytest.raises(archives.ArchivePasswordError, match=f"encrypted: set {archives.PASSWORD_ENV}"):
        _read(psw, "stest1.txt")
    err = inspect(Source(str(psw), "stest1.txt")).error
    assert err == f"cannot read file: RAR member 'stest1.txt' in {psw} is encrypted: set {archives.PASSWORD_ENV}"
    monkeypatch.setenv(archives.PASSWORD_ENV, "wrong")
    with pytest.raises(archives.ArchivePasswordError, match="wrong password or damaged data"):
        _read(psw, "stest1.txt")
    archives.set_password("password")
    assert os.environ[archives.PASSWORD_ENV] == "password"  # so spawned workers see it too
    assert _read(psw, "stest1.txt") == STEST  # compressed
    assert _read(psw, "stest2.txt") == STEST  # stored


def test_rar_header_password(rar_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hpsw = rar_files / "rar5-hpsw.rar"
    with pytest.raises(archives.ArchivePasswordError, match="headers are encrypted"):
        archives.list_members(hpsw, (".txt",))
    monkeypatch.setattr(sources, "MEMBER_SUFFIXES", (".txt",))
    # Unlistable: one error document, so the archive shows up in the manifest.
    (src,) = discover([str(hpsw)])
    assert src == Source(str(hpsw), archives.WHOLE_ARCHIVE)
    assert "headers are encrypted" in inspect(src).error
    monkeypatch.setenv(archives.PASSWORD_ENV, "password")
    try:
        import cryptography  # noqa: F401  (rarfile needs it to decrypt headers)
    except ImportError:
        with pytest.raises(archives.ArchiveError, match="needs the Python package `cryptography`"):
            archives.list_members(hpsw, (".txt",))
    else:
        assert archives.list_members(hpsw, (".txt",)) == ["stest1.txt", "stest2.txt"]
        assert _read(hpsw, "stest2.txt") == STEST


def test_rar_backend_is_the_bundled_library(rar_files: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every RAR variant reads with no system tool on PATH: rar5 solid (which `unar` cannot
    decompress), rar3 solid, volumes and passwords all go through unrar2-cffi in-process."""
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("unrar") is None and shutil.which("unar") is None
    assert archives.rar_backend() == "unrar2-cffi"
    assert _read(rar_files / "rar5-solid.rar", "stest1.txt") == STEST
    assert _read(rar_files / "rar5-solid.rar", "stest2.txt") == STEST
    assert _read(rar_files / "rar3-solid.rar", "stest1.txt") == STEST
    assert _read(rar_files / "rar5-vols.part1.rar", "vols/bigfile.txt") == BIGFILE
    monkeypatch.setenv(archives.PASSWORD_ENV, "password")
    assert _read(rar_files / "rar5-psw.rar", "stest1.txt") == STEST
    assert _read(rar_files / "rar5-hpsw.rar", "stest1.txt") == STEST


def test_rar_tool_fallback_names_the_package(rar_files: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Without unrar2-cffi and without a system tool, the error says what to install."""
    monkeypatch.setattr(archives, "_cffi_rarfile", lambda: None)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(archives.BackendError, match="pip install unrar2-cffi"):
        archives.rar_backend()
    with pytest.raises(archives.BackendError, match="pip install unrar2-cffi"):
        _read(rar_files / "rar5-solid.rar", "stest1.txt")


def test_corrupt_rar(rar_files: Path, tmp_path: Path) -> None:
    raw = bytearray((rar_files / "rar3-solid.rar").read_bytes())
    truncated = tmp_path / "truncated.rar"
    truncated.write_bytes(bytes(raw[:60]))
    garbage = tmp_path / "garbage.rar"
    garbage.write_bytes(b"Rar!\x1a\x07\x00" + bytes(range(256)))
    for bad in (truncated, garbage):
        try:
            names = archives.list_members(bad, (".txt",))
        except archives.ArchiveError as e:
            assert "RAR" in str(e)
            continue
        for n in names:
            with pytest.raises(archives.ArchiveError):
                _read(bad, n)
    # Flipped bytes inside compressed data: the backend reports it; nothing escapes as a crash.
    raw[-30] ^= 0xFF
    flipped = tmp_path / "flipped.rar"
    flipped.write_bytes(bytes(raw))
    rows = [inspect(Source(str(flipped), n)) for n in ("stest1.txt", "stest2.txt")]
    assert any(r.error is not None and r.error.startswith("cannot read file: ") for r in rows)


def test_rar_reads_leave_no_temp_files(rar_files: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert _read(rar_files / "rar3-vols.part1.rar", "vols/smallfile.txt")
    with pytest.raises(archives.ArchiveError):
        _read(rar_files / "rar5-psw.rar", "stest1.txt")
    assert list(tmp_path.iterdir()) == []
