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


def _two_regime_peak(batch: int, tokens: int) -> float:
    """Peak bytes of one decode as measured on an H200 with the real 0.1.0-small architecture:
    the larger of the encoder's activations (142 MiB a page) and the decode's scores and cache
    (0.2 MiB a page per token); short decodes are hidden under the encoder's peak."""
    encoder = 2e8 + batch * 142 * 2**20
    decode = 3e8 + batch * tokens * 0.2 * 2**20
    return max(encoder, decode)


def test_probe_fits_the_full_length_decode_that_short_decodes_hide():
    budget = int(125 * 2**30)
    # what short decodes would have said: the same peak at 224 and 448 tokens
    assert _two_regime_peak(8, 224) == _two_regime_peak(8, 448)
    r = probe.largest_batch(None, None, 3584, verify=False, budget=budget, measure=_two_regime_peak)
    assert _two_regime_peak(r.batch, 3584) <= budget < _two_regime_peak(r.batch + 1, 3584)
    assert not r.verified and "3584-token" in r.notes[0]


def test_probe_steps_down_until_the_verifying_batch_fits_and_caps_the_batch():
    calls = []

    def measure(batch: int, tokens: int) -> float:
        calls.append(batch)
        if batch > 40:  # the fitted line is optimistic: the real batch runs out of memory
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return 1e8 + batch * 1e9

    r = probe.largest_batch(None, None, 3584, budget=int(60e9), measure=measure)
    assert r.verified and r.batch <= 40 and calls[:2] == [2, 4] and calls[2] == 59
    assert any("ran out of memory" in n for n in r.notes)
    tiny = probe.largest_batch(None, None, 96, verify=False, budget=int(125 * 2**30),
                               measure=lambda b, t: 1e6 + b * 3e6)
    assert tiny.batch == probe.MAX_BATCH and any("capped" in n for n in tiny.notes)


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
