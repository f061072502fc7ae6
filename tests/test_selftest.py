"""`python -m nougat_dist selftest` on CPU with the tiny checkpoint, and the parts of its GPU batch
probe that a CPU can check."""

from __future__ import annotations

import os
import subprocess
import sys

import pypdf
import pypdfium2
import torch

from conftest import ROOT
from nougat_dist import selftest
from nougat_dist.ocr import probe


def test_selftest_passes_on_cpu_without_the_checkout_or_dev_packages(tmp_path, tiny_checkpoint):
    # fpdf2 and the repo's testing/ package shadowed by modules that refuse to import: the
    # self-test must need neither; it runs from a directory outside the repo.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    for name in ("fpdf", "testing"):
        (shadow / f"{name}.py").write_text(f"raise ImportError('{name} is not installed')\n")
    env = {**os.environ, "PYTHONPATH": f"{shadow}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-m", "nougat_dist", "selftest", "--checkpoint",
                           str(tiny_checkpoint), "--device", "cpu", "--pages", "3",
                           "--batch-size", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = proc.stdout
    assert "ok    fidelity    3 pages: launcher text == stock nougat text" in out, out
    assert "(both empty" not in out  # the tiny checkpoint writes text: the comparison means something
    assert "ok    speed       batch 2: model only" in out and "launcher pipeline" in out
    assert "ok    /dev/shm" in out and "skip  batch size" in out
    assert out.rstrip().endswith("result: all checks passed")


def test_test_pdf_reads_strictly_in_pypdf_and_pdfium(tmp_path):
    pdf = selftest.write_test_pdf(tmp_path / "t.pdf", 3)
    reader = pypdf.PdfReader(pdf, strict=True)
    assert len(reader.pages) == 3
    assert "Test page 2 of 3" in reader.pages[1].extract_text()
    doc = pypdfium2.PdfDocument(str(pdf))
    assert len(doc) == 3
    assert "Test page 3 of 3" in doc[2].get_textpage().get_text_bounded()


def test_compare_reports_where_the_texts_differ():
    assert selftest.compare("same text", "same text", 1).status == "ok"
    c = selftest.compare("abcXdef", "abcYdef", 1)
    assert c.status == "FAIL" and "character 3" in c.detail
    assert selftest.compare("abc", "abcd", 1).status == "FAIL"


def test_probe_line_recovers_a_linear_memory_model():
    true = probe.Line(fixed=3e8, per_page=2e7, per_token=1e5)
    b1, b2, t1, t2 = 2, 8, 224, 448
    peaks = [true.peak(b, t) for t in (t1, t2) for b in (b1, b2)]
    got = probe.fit(b1, b2, t1, t2, *peaks)
    assert abs(got.fixed - true.fixed) < 1 and abs(got.per_page - true.per_page) < 1e-3
    assert abs(got.per_token - true.per_token) < 1e-6
    budget = 80 * 2**30
    batch = got.largest_batch(budget, 3584)
    assert true.peak(batch, 3584) <= budget < true.peak(batch + 1, 3584)


def test_forced_length_decodes_every_page_to_the_given_length(tiny_checkpoint):
    """The probe's worst case is real: nougat's own inference runs every page to `tokens`."""
    from nougat_dist.ocr.model import encoder_input_spec, load_model

    model = load_model(tiny_checkpoint, torch.device("cpu"), full_precision=True)
    size, _ = encoder_input_spec(tiny_checkpoint)
    images = torch.rand(2, 3, *size)
    tokens = int(model.config.max_length)
    with probe.forced_length(model, tokens), torch.inference_mode():
        out = model.inference(image_tensors=probe.batch_of(images, 3))
    assert out["sequences"].shape == (3, tokens)
    assert (out["sequences"][:, -1] != model.decoder.tokenizer.pad_token_id).all()
    assert "generate" not in vars(model.decoder.model)  # the class's method again
