"""Inputs that once vanished, hung or exhausted memory: archive members that are not regular
files, nested archives, a member far larger than its archive, a page far larger than any paper,
FIFOs, symlink loops and names that are not UTF-8. Deterministic; see tests/test_hostile.py."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path


def huge_page_pdf(width_pt: float = 20000, height_pt: float = 20000) -> bytes:
    """A blank one-page PDF of the given page size (a few hundred bytes): 711 million pixels at
    96 dpi for the default 20000 pt square."""
    import pypdf

    w = pypdf.PdfWriter()
    w.add_blank_page(width=width_pt, height=height_pt)
    buf = io.BytesIO()
    w.write(buf)
    return buf.getvalue()


def write_big_member_zip(path: Path, member_bytes: int, name: str = "big.pdf") -> Path:
    """A ZIP whose one member is a PDF header followed by member_bytes of zeros, written in
    chunks (deflate shrinks 1 GiB of zeros to about 1 MB, so the archive stays small)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = b"\0" * (1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(name, "w",
                                                                          force_zip64=True) as f:
        f.write(b"%PDF-1.4\n")
        left = member_bytes - 9
        while left > 0:
            f.write(chunk[:left])
            left -= len(chunk)
    return path


def write_odd_member_archives(out_dir: Path, pdf: bytes) -> dict[str, Path]:
    """Archives holding one good PDF (ok.pdf) beside members that must become error rows:
    a symlink, a FIFO and a device named *.pdf in a TAR, a symlink in a ZIP, and a nested ZIP.
    Returns {kind: archive path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tar_path = out_dir / "odd.tar"
    with tarfile.open(tar_path, "w") as tf:
        info = tarfile.TarInfo("ok.pdf")
        info.size = len(pdf)
        tf.addfile(info, io.BytesIO(pdf))
        for name, kind in (("link.pdf", tarfile.SYMTYPE), ("fifo.pdf", tarfile.FIFOTYPE),
                           ("dev.pdf", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "ok.pdf" if kind == tarfile.SYMTYPE else ""
            tf.addfile(info)
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("inner.pdf", pdf)
    zip_path = out_dir / "odd.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("ok.pdf", pdf)
        link = zipfile.ZipInfo("link.pdf")
        link.create_system = 3  # Unix: the mode bits in external_attr count
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "ok.pdf")
        zf.writestr("inner.zip", inner.getvalue())
    return {"tar": tar_path, "zip": zip_path}
