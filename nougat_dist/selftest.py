"""`python -m nougat_dist selftest`: what to run on a new node before a long job.

It checks CUDA / NCCL / bf16 and /dev/shm, OCRs a small generated PDF through the launcher and
through the stock `nougat` CLI on the same device with the same checkpoint and compares the text
byte for byte, measures model-only against whole-pipeline pages/s, and on a GPU probes the largest
batch that survives a worst-case (max_length) decode. Needs only the installed package: the test
PDF is written here, by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@dataclass
class Check:
    name: str
    status: str  # ok | FAIL | skip
    detail: str


def write_test_pdf(path: Path, n_pages: int) -> Path:
    """A PDF of `n_pages` text pages in the standard Helvetica font (nothing embedded), written
    object by object with a correct xref table, so pypdf (the stock CLI's page count) and pdfium
    both read it without repairs."""
    lines = ["Abstract. We measure how a transformer reads scanned pages.",
             "The encoder is a Swin transformer; the decoder writes markdown.",
             "Results: the error rate falls as the resolution grows.",
             "1 Introduction", "Optical character recognition of scientific documents",
             "must keep formulas, tables and the reading order."]
    objects: list[bytes] = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    font_id = 3
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    kids = []
    for p in range(1, n_pages + 1):
        text = [f"Test page {p} of {n_pages}", *lines[p % 3:]]
        ops = ["BT", "/F1 16 Tf", "72 720 Td", f"({text[0]}) Tj", "/F1 11 Tf"]
        ops += [f"0 -22 Td ({t}) Tj" for t in text[1:]]
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1")
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        content_id = len(objects)
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                       b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (content_id, font_id))
        kids.append(b"%d 0 R" % len(objects))
    objects[1] = b"<< /Type /Pages /Kids [" + b" ".join(kids) + b"] /Count %d >>" % n_pages
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(bytes(out))
    return path


def platform_checks(requested: str) -> tuple[list[Check], object | None]:
    """torch, CUDA, NCCL, bf16, and the device a rank would get (no silent CPU fallback)."""
    import torch

    from nougat_dist import dist as ndist

    checks = [Check("torch", "ok", f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}")]
    try:
        device = ndist.pick_device(requested, 0)
    except ndist.DeviceError as e:
        return checks + [Check("device", "FAIL", str(e))], None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        checks.append(Check("cuda", "ok", f"{torch.cuda.device_count()} GPU(s); {device}: {props.name}, "
                            f"{props.total_memory / 2**30:.1f} GiB, capability {props.major}.{props.minor}"))
        nccl = ndist.nccl_version()
        checks.append(Check("nccl", "ok" if nccl else "FAIL",
                            f"NCCL {nccl}" if nccl else "torch has no NCCL: multi-GPU jobs need "
                            "--control-backend gloo"))
        bf16 = torch.cuda.is_bf16_supported()
        checks.append(Check("bf16", "ok" if bf16 else "FAIL", "supported" if bf16 else
                            "this GPU has no bf16: run with --full-precision"))
    else:
        checks.append(Check("cuda", "skip", "running on the CPU (--device cpu, or no GPU allocated)"))
        try:
            x = torch.ones(8, 8, dtype=torch.bfloat16)
            ok = bool((x @ x)[0, 0] == 8)
        except RuntimeError as e:
            ok, why = False, str(e)
        checks.append(Check("bf16", "ok" if ok else "FAIL", "CPU bf16 matmul works" if ok else
                            f"CPU bf16 fails ({why}): run with --full-precision"))
    return checks, device


def shm_check(input_size: list[int], batch: int, workers: int, prefetch: int, ranks: int) -> Check:
    from nougat_dist.errors import SetupError
    from nougat_dist.ocr.render import check_shm, shm_free, shm_needed

    need = shm_needed(input_size, batch, workers, prefetch, ranks)
    free = shm_free()
    if free is None:
        return Check("/dev/shm", "skip", "no /dev/shm on this system")
    try:
        check_shm(need, free, workers, prefetch)
    except SetupError as e:
        return Check("/dev/shm", "FAIL", str(e))
    return Check("/dev/shm", "ok", f"{free / 2**20:.0f} MiB free, {need / 2**20:.0f} MiB needed by "
                 f"{ranks} rank(s) x {workers} worker(s) x prefetch {prefetch} at batch {batch}")


def _child_env(device: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the stock CLI uses a GPU whenever it sees one
    return env


def _run(cmd: list[str], env: dict[str, str], what: str, timeout: float) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {proc.stderr[-2000:]}")


def run_launcher(pdf: Path, out: Path, ckpt: Path, device: str, batch: int, fp32: bool,
                 timeout: float) -> tuple[str, dict]:
    """The launcher as a job runs it (one rank): the document's text and stats.json."""
    import pyarrow.parquet as pq

    cmd = [sys.executable, "-m", "nougat_dist.cli", "--input", str(pdf), "--output", str(out),
           "--checkpoint", str(ckpt), "--device", device, "--batch-size", str(batch),
           # the CLI's batches: a page nougat's batch-level repetition check flags depends on its
           # batch-mates (docs/fidelity.md), so length-aware batches could differ there
           "--batching", "document_order"]
    _run(cmd + (["--full-precision"] if fp32 else []), _child_env(device), "the launcher", timeout)
    from nougat_dist.store.layout import OutputDir

    layout = OutputDir(out)
    text = pq.read_table(layout.documents).column("text").to_pylist()[0]
    return text, json.loads(layout.stats.read_text())


def run_stock(pdf: Path, out: Path, ckpt: Path, device: str, batch: int, fp32: bool,
              timeout: float) -> str:
    """nougat's own predict.py (the `nougat` command), same device, checkpoint and batch size."""
    cmd = [sys.executable, "-m", "predict", str(pdf), "-o", str(out), "--checkpoint", str(ckpt),
           "-b", str(batch)]
    _run(cmd + (["--full-precision"] if fp32 else []), _child_env(device), "the stock nougat CLI", timeout)
    return (out / pdf.with_suffix(".mmd").name).read_text(encoding="utf-8")


def compare(ours: str, stock: str, n_pages: int) -> Check:
    """Byte comparison of the two texts; a difference shows where it starts."""
    if ours == stock:
        note = "" if ours.strip() else " (both empty: the checkpoint wrote no text)"
        return Check("fidelity", "ok", f"{n_pages} pages: launcher text == stock nougat text, "
                     f"{len(ours.encode())} bytes{note}")
    at = next((i for i, (a, b) in enumerate(zip(ours, stock)) if a != b), min(len(ours), len(stock)))
    return Check("fidelity", "FAIL", f"texts differ from character {at}: launcher "
                 f"{ours[at:at + 40]!r} vs stock {stock[at:at + 40]!r} ({len(ours)} vs {len(stock)} chars)")


def render_pages(pdf: Path, input_size: list[int], align: bool):
    """The test pages as the render workers prepare them (pdfium at 96 dpi, prepare_input)."""
    import pypdfium2
    import torch

    from nougat_dist.ocr.render import EncoderInput, render_page

    prepare = EncoderInput(input_size, align)
    doc = pypdfium2.PdfDocument(str(pdf))
    try:
        return torch.stack([prepare(render_page(doc, p)) for p in range(1, len(doc) + 1)])
    finally:
        doc.close()


@contextlib.contextmanager
def _quiet_nougat():
    """nougat logs "Found repetitions in sample i" on the root logger for every looping page of
    every batch; in a report of one line per check that is noise (the pages' own texts are
    compared above, where it matters)."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def model_only_rate(model, images, batch: int, device) -> float:
    """Pages/s of model.inference alone over the same pages in the same batches."""
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode(), _quiet_nougat():
        for i in range(0, len(images), batch):
            model.inference(image_tensors=images[i:i + batch])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - t0)


def add_selftest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR", help="Nougat checkpoint directory (default as "
                   "the launcher: $NOUGAT_CHECKPOINT or torch hub's dir; --model is downloaded "
                   "when absent)")
    p.add_argument("--model", default="0.1.0-small", help="model tag to download without a checkpoint")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--batch-size", type=int, default=4, help="batch for the comparison and speed runs")
    p.add_argument("--pages", type=int, default=8, help="pages of the generated test PDF")
    p.add_argument("--full-precision", action="store_true", help="float32 instead of bfloat16")
    p.add_argument("--no-verify-batch", dest="verify_batch", action="store_false",
                   help="GPU: print the batch size fitted from two full-length decodes at small "
                   "batches without running one full batch at that size to verify it (a full "
                   "max_length batch of the real model takes a minute or more)")
    p.add_argument("--timeout", type=float, default=900, help="seconds each OCR run may take")


def _print(c: Check) -> None:
    print(f"  {c.status:<5} {c.name:<11} {c.detail}", flush=True)


def run_selftest(args: argparse.Namespace) -> int:
    """Run every check, print one line each; exit 1 if any failed, 2 if setup is broken."""
    checks, device = platform_checks(args.device)
    print("nougat-dist selftest")
    for c in checks:
        _print(c)
    if device is None:
        return 2
    from nougat_dist.ocr.model import (CheckpointError, checkpoint_name, encoder_input_spec,
                                       resolve_checkpoint)

    try:
        ckpt = resolve_checkpoint(args.checkpoint, args.model)
    except CheckpointError as e:
        _print(Check("checkpoint", "FAIL", str(e)))
        return 2
    input_size, align = encoder_input_spec(ckpt)
    import torch

    ranks = torch.cuda.device_count() if device.type == "cuda" else 1
    later = [Check("checkpoint", "ok", f"{checkpoint_name(ckpt)} at {ckpt}, input {input_size}"),
             shm_check(input_size, args.batch_size, 2, 2, ranks)]
    for c in later:
        _print(c)
    checks += later
    with tempfile.TemporaryDirectory(prefix="nougat-selftest-") as tmp, warnings.catch_warnings():
        # torch's and nougat's deprecation notices would interleave with the report
        warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
        pdf = write_test_pdf(Path(tmp) / "selftest.pdf", args.pages)
        checks += _ocr_checks(args, pdf, Path(tmp), ckpt, device, input_size, align)
    failed = [c.name for c in checks if c.status == "FAIL"]
    print("result: " + (f"FAILED ({', '.join(failed)})" if failed else "all checks passed"))
    return 1 if failed else 0


def _ocr_checks(args, pdf: Path, tmp: Path, ckpt: Path, device, input_size, align) -> list[Check]:
    from nougat_dist.ocr.model import load_model

    checks = []
    try:
        ours, stats = run_launcher(pdf, tmp / "launcher", ckpt, device.type, args.batch_size,
                                   args.full_precision, args.timeout)
        stock = run_stock(pdf, tmp / "stock", ckpt, device.type, args.batch_size,
                          args.full_precision, args.timeout)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        checks.append(Check("fidelity", "FAIL", str(e)))
        _print(checks[-1])
        return checks
    checks.append(compare(ours, stock, args.pages))
    _print(checks[-1])
    model = load_model(ckpt, device, args.full_precision)
    images = render_pages(pdf, input_size, align)
    model_rate = model_only_rate(model, images, args.batch_size, device)
    span = stats.get("makespan_s") or 0
    pipe_rate = stats["pages_this_run"] / span if span > 0 else float("nan")
    checks.append(Check("speed", "ok", f"batch {args.batch_size}: model only {model_rate:.2f} pages/s, "
                        f"launcher pipeline {pipe_rate:.2f} pages/s ({pipe_rate / model_rate:.2f} "
                        "of model-only; a short run, so first-batch costs weigh in)"))
    _print(checks[-1])
    checks.append(_batch_check(model, images, device, args.verify_batch))
    _print(checks[-1])
    return checks


def _batch_check(model, images, device, verify: bool) -> Check:
    if device.type != "cuda":
        return Check("batch size", "skip", "probed on GPUs only (on CPU memory is rarely the "
                     "bound: the launcher uses 4)")
    from nougat_dist.ocr.probe import HEADROOM, largest_batch

    max_length = int(model.config.max_length)
    with _quiet_nougat():
        r = largest_batch(model, images, max_length, verify=verify)
    if r.batch < 1:
        return Check("batch size", "FAIL", f"not one page fits a {max_length}-token decode in "
                     f"{r.budget / 2**30:.1f} GiB; " + "; ".join(r.notes))
    how = (f"verified by one full batch ({r.seconds:.0f} s)" if r.verified
           else "fitted from two small full-length batches, not verified")
    per_page = r.line.per_page / 2**20
    return Check("batch size", "ok", f"use --batch-size {r.batch}: {r.batch} worst-case "
                 f"({max_length}-token) decodes fit {HEADROOM:.0%} of the free GPU memory "
                 f"({r.budget / 2**30:.1f} GiB), ~{per_page:.0f} MiB per page; {how}. "
                 + "; ".join(r.notes))
