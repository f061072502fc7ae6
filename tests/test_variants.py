"""Every branch of Nougat's page output against the stock CLI, with the tiny checkpoint's
variants (testing/tiny_checkpoint.py): pages that end with </s> after page-dependent lengths
("eos"), and pages that loop so nougat's repetition handling blanks or fails them ("loop").

Both sides run in this process to keep the test fast: the launcher's job through `worker.run`
(what launch.py runs) and the stock CLI through its own `predict.main` (what the `nougat`
console script calls). One page per PDF, so the stock CLI's one .mmd per PDF is one page's output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from testing.tiny_checkpoint import build_tiny_checkpoint, write_ink_pages

BATCH = 4
#: Lines of box "words" per page, one page per PDF: chosen so that each variant reaches every
#: branch it is built for in both dtypes (the test checks that they are reached).
EOS_LINES = [22, 1, 52, 0, 10, 3]  # not in ink order, so length-aware batches differ
LOOP_LINES = [1, 15, 20, 40]  # blanked, failed, kept with its looped tail cut by nougat, kept
EOS_MAX_LENGTH = 64  # < 135: nougat's repetition check cannot flag a page (every page is `ok`)
LOOP_MAX_LENGTH = 256  # >= ~170 so a page that loops late is failed, not blanked


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on this project's shared 2-core machines two OpenMP threads spin against
    each other and every other process (10-20x the CPU time of one thread here); the text does
    not depend on the thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {
        "eos": build_tiny_checkpoint(root / "eos", max_length=EOS_MAX_LENGTH, variant="eos"),
        "loop": build_tiny_checkpoint(root / "loop", max_length=LOOP_MAX_LENGTH, variant="loop"),
        # long enough for the repetition check to flag a page that ended early, short of the
        # ~200 steps at which StoppingCriteriaScores starts to look
        "eos190": build_tiny_checkpoint(root / "eos190", max_length=190, variant="eos"),
    }


def run_ours(pdfs: list[Path], out: Path, ckpt: Path, full_precision: bool,
             batching: str = "document_order") -> dict[str, dict]:
    """The launcher's job in this process, one rank; page rows by file name.

    worker.run is what launch.py runs once its process is set up; the process-wide setup around
    it (logging handlers, gc.freeze, killing leftover children) is left out, as it would reach
    into the test process."""
    from nougat_dist import dist as ndist
    from nougat_dist.config import parse_args
    from nougat_dist.worker import run

    args = ["--input", *map(str, pdfs), "--output", str(out), "--checkpoint", str(ckpt),
            "--batch-size", str(BATCH), "--num-workers", "0", "--device", "cpu",
            "--batching", batching]
    cfg, _ = parse_args(args + (["--full-precision"] if full_precision else []))
    info = ndist.init(cfg.device, control_backend=cfg.control_backend)
    try:
        assert run(cfg, info) == 0
    finally:
        ndist.teardown()
    pages = pq.read_table(out / "pages").to_pylist()
    docs = {r["doc_id"]: r for r in pq.read_table(out / "documents").to_pylist()}
    return {Path(r["source"]).name: {**r, "document": docs[r["doc_id"]]["text"]} for r in pages}


def run_stock(pdfs: list[Path], out: Path, ckpt: Path, full_precision: bool,
              monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """nougat's predict.main, unchanged, in this process; .mmd text by PDF name."""
    import predict  # the stock CLI's module (console script `nougat` = predict:main)

    argv = ["nougat", *map(str, pdfs), "-o", str(out), "--checkpoint", str(ckpt),
            "-b", str(BATCH)] + (["--full-precision"] if full_precision else [])
    with monkeypatch.context() as m:
        m.setattr(sys, "argv", argv)
        predict.main()
    return {pdf.name: (out / pdf.with_suffix(".mmd").name).read_text(encoding="utf-8")
            for pdf in pdfs}


def check_decode_efficiency(out: Path, tokens: list[int]) -> None:
    """Every page's batch ran as many steps as its longest page (pages that end with </s>, in
    document order, BATCH to a batch), and stats.json and `status` report Σ tokens / Σ slots."""
    import json

    from nougat_dist.store.status import collect, render

    batches = [tokens[i:i + BATCH] for i in range(0, len(tokens), BATCH)]
    slots = sum(len(b) * max(b) for b in batches)
    rows = pq.read_table(out / "pages").to_pylist()
    assert sum(r["batch_steps"] for r in rows) == slots
    expected = {"efficiency": round(sum(tokens) / slots, 4), "page_tokens": sum(tokens),
                "batch_slots": slots}
    assert expected["efficiency"] < 1.0  # the pages differ in length: some slots were padding
    assert json.loads((out / "stats.json").read_text())["decode"] == expected
    info = collect(out)
    assert info["decode"] == expected
    assert f"efficiency {expected['efficiency']:.3f}" in render(info)


def stock_text_of(row: dict, index: int) -> str:
    """What the stock CLI writes for this page: our text, except that the stock CLI numbers a
    page blanked by the repetition check by its global index over all inputs (i * batch + j + 1,
    the known bug the README lists) where we write the page number."""
    if row["status"] == "empty":
        return row["document"].replace(f"[MISSING_PAGE_EMPTY:{row['page']}]",
                                       f"[MISSING_PAGE_EMPTY:{index + 1}]")
    return row["document"]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("variant", ["eos", "loop"])
def test_every_page_equals_stock_cli(variant, precision, variants, tmp_path, monkeypatch):
    lines = EOS_LINES if variant == "eos" else LOOP_LINES
    pdfs = write_ink_pages(tmp_path / "pdfs", lines)
    full = precision == "fp32"
    ours = run_ours(pdfs, tmp_path / "ours", variants[variant], full)
    stock = run_stock(pdfs, tmp_path / "cli", variants[variant], full, monkeypatch)

    for index, pdf in enumerate(pdfs):
        row = ours[pdf.name]
        assert stock[pdf.name] == stock_text_of(row, index), (pdf.name, row["status"])

    statuses = [ours[p.name]["status"] for p in pdfs]
    tokens = [ours[p.name]["n_tokens"] for p in pdfs]
    if variant == "eos":
        # Pages end with </s> at lengths that grow with their ink (the densest may reach
        # max_length); none is flagged by the repetition check at this max_length.
        assert statuses == ["ok"] * len(pdfs)
        assert sum(n < EOS_MAX_LENGTH for n in tokens) >= len(pdfs) - 1, tokens
        assert len(set(tokens)) == len(pdfs), tokens
        check_decode_efficiency(tmp_path / "ours", tokens)
    else:
        # Blanked (looped from the start), failed (looped later) and kept pages, all three.
        assert {"empty", "fail", "ok"} <= set(statuses), statuses
        for row in (ours[p.name] for p in pdfs):
            marker = {"empty": f"[MISSING_PAGE_EMPTY:{row['page']}]",
                      "fail": f"[MISSING_PAGE_FAIL:{row['page']}]"}.get(row["status"])
            if marker is not None:
                assert row["text"].strip() == marker


def _model_pages(ckpt: Path, lines: list[int], tmp: Path, dtype):
    """The model (nougat's from_pretrained) and the encoder inputs of the ink pages, rendered
    as the render worker does."""
    import pypdfium2
    from nougat import NougatModel

    from nougat_dist.ocr.predict import predict_page

    model = NougatModel.from_pretrained(ckpt).eval().to(dtype)
    images, predicted = [], []
    for pdf in write_ink_pages(tmp, lines):
        page = pypdfium2.PdfDocument(pdf)[0]
        img = page.render(scale=96 / 72).to_pil()
        images.append(model.encoder.prepare_input(img, random_padding=False))
        predicted.append(predict_page(page, img).tokens)
    return model, images, predicted


def _texts(model, images, batches: list[list[int]]) -> dict[int, tuple[str, str]]:
    """(status, text) of every page, decoded in the given batches of page indices."""
    import torch

    from nougat_dist.ocr.model import page_results

    got = {}
    for batch in batches:
        with torch.inference_mode():
            out = model.inference(image_tensors=torch.stack([images[i] for i in batch]))
        results = page_results(out, [i + 1 for i in batch], markdown=True, skipping=True,
                               pad_token_id=model.decoder.tokenizer.pad_token_id)
        got.update({i: (r.status, r.text) for i, r in zip(batch, results)})
    return got


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_page_that_ended_is_blanked_next_to_a_long_page(precision, variants, tmp_path):
    """nougat's repetition check is batch-level (README, Fidelity): it measures a page over every
    step of its batch, so a page that ended with </s> after ~30 tokens is `ok` alone or next to a
    short page, and blanked or failed next to a page that runs to max_length 190."""
    import torch

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    model, images, _ = _model_pages(variants["eos190"], [1, 10, 52], tmp_path / "pdfs", dtype)
    alone, short_mate, long_mate = (_texts(model, images, [batch])[0]
                                    for batch in ([0], [0, 1], [0, 2]))
    assert alone[0] == "ok" and alone[1].strip()
    assert short_mate == alone
    # blanked if its steady tail (after </s>) starts within ~30 steps, else failed
    marker = {"empty": "[MISSING_PAGE_EMPTY:1]", "fail": "[MISSING_PAGE_FAIL:1]"}
    assert long_mate[0] in marker and long_mate[1] == f"\n\n{marker[long_mate[0]]}\n\n"


def test_length_aware_batches_change_no_text_where_no_page_is_flagged(variants, tmp_path):
    """Below 135 tokens nougat's repetition check cannot flag a page, so what a page decodes to
    does not depend on its batch-mates: length-aware batches give every page the same text as
    document order (here with the eos variant, whose lengths differ from page to page)."""
    import torch

    from nougat_dist.sched.batching import make_batches

    model, images, predicted = _model_pages(variants["eos"], EOS_LINES, tmp_path, torch.bfloat16)
    items = list(zip(range(len(images)), predicted))
    document = make_batches("document_order", items, 2)
    aware = make_batches("length_aware", items, 2, depth=3)
    assert sorted(map(sorted, document)) != sorted(map(sorted, aware)), "same batches: proves nothing"
    assert _texts(model, images, aware) == _texts(model, images, document)


def test_the_text_checkpoint_gives_every_page_the_same_text_under_both_batchings(
        tiny_checkpoint, sample_pdfs, tmp_path, monkeypatch):
    """The real job (worker.run, the tiny checkpoint through nougat's from_pretrained, 1 rank):
    the default `text` model's pages do not depend on their batch-mates, so length-aware batches
    give every page the text document order gives."""
    from nougat_dist.worker import Worker

    texts, batches = {}, {}
    for policy in ("document_order", "length_aware"):
        seen: list[list[tuple[int, int]]] = []
        process = Worker._process

        def recording(self, batch, seen=seen, process=process):
            seen.append(list(batch.keys))
            return process(self, batch)
        monkeypatch.setattr(Worker, "_process", recording)
        run_ours(sample_pdfs, tmp_path / policy, tiny_checkpoint, False, policy)
        monkeypatch.undo()
        rows = pq.read_table(tmp_path / policy / "pages").to_pylist()
        assert {r["status"] for r in rows} == {"ok"}
        texts[policy] = {(Path(r["source"]).name, r["page"]): r["text"] for r in rows}
        batches[policy] = seen
    assert len(texts["length_aware"]) == 11
    assert batches["length_aware"] != batches["document_order"], "same batches: proves nothing"
    assert texts["length_aware"] == texts["document_order"]
