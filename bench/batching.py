"""Decode efficiency of document-order vs length-aware batches, simulated on real PDFs.

Simulation: a page's true decode length is its text layer's token count (characters / 3.2, the
ratio of Nougat's BPE on English papers), which needs no GPU and no weights. Predictors compared:
the text layer (exact by construction here, so it measures the window alone), ink coverage of the
rendered page (what a scan gets), and no predictor (document order).

    python bench/batching.py [--json] [--pdfs DIR ...] [--samples N]

Efficiency = Σ page tokens / Σ (batch size x batch steps), a batch running as many steps as its
longest page. Pages without a text layer are left out of the simulation (they have no true length
here); the count is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pypdfium2  # noqa: E402

from nougat_dist.ocr import predict  # noqa: E402
from nougat_dist.ocr.render import NOUGAT_DPI  # noqa: E402
from nougat_dist.sched.batching import efficiency, make_batches  # noqa: E402

log = logging.getLogger("bench.batching")

#: Public PDFs on this machine's disk (Debian documentation), used when present.
SYSTEM_PDFS = (
    "/usr/share/doc/libtasn1-doc/libtasn1.pdf",
    "/usr/share/doc/shared-mime-info/shared-mime-info-spec.pdf",
)
BATCH_SIZES = (8, 24, 48)


def measure_pages(pdf: Path) -> list[dict]:
    """Per page: text-layer characters, ink coverage, prediction."""
    rows = []
    doc = pypdfium2.PdfDocument(str(pdf))
    try:
        for i in range(len(doc)):
            page = doc[i]
            try:
                img = page.render(scale=NOUGAT_DPI / 72).to_pil()
                p = predict.predict_page(page, img)
            finally:
                page.close()
            rows.append({"pdf": pdf.name, "page": i + 1, "chars": p.text_chars, "ink": p.ink})
    finally:
        doc.close()
    return rows


def collect(pdfs: list[Path]) -> list[dict]:
    rows = []
    for pdf in pdfs:
        rows += measure_pages(pdf)
    return rows


def simulate(rows: list[dict], depth: int, max_age: int) -> dict:
    """Efficiency per policy, predictor and batch size; predictor quality."""
    pages = [r for r in rows if r["chars"] >= predict.MIN_TEXT_CHARS]
    true = [r["chars"] / predict.CHARS_PER_TOKEN for r in pages]
    ink_fit = float(np.sum(true) / max(1e-9, np.sum([r["ink"] for r in pages])))
    predictors = {
        "text": true,
        "ink": [r["ink"] * predict.TOKENS_PER_INK for r in pages],
    }
    out: dict = {
        "pages": len(rows), "pages_with_text": len(pages),
        "true_tokens": {"median": float(np.median(true)), "p90": float(np.percentile(true, 90)),
                        "min": float(min(true)), "max": float(max(true))},
        "spearman": {name: predict.spearman(pred, true) for name, pred in predictors.items()},
        "ink_tokens_per_unit_fit": ink_fit, "depth": depth, "max_age": max_age,
        "efficiency": [],
    }
    for b in BATCH_SIZES:
        base = make_batches("document_order", [(t, 0.0) for t in true], b)
        out["efficiency"].append({"policy": "document_order", "predictor": None, "batch_size": b,
                                  "efficiency": efficiency(base)})
        for name, pred in predictors.items():
            batches = make_batches("length_aware", list(zip(true, pred)), b, depth, max_age)
            out["efficiency"].append({"policy": "length_aware", "predictor": name,
                                      "batch_size": b, "efficiency": efficiency(batches)})
    # Wider windows, text predictor: what ordering a rank's pages before rendering would give.
    out["depth_sweep"] = [
        {"depth": d, "batch_size": b, "efficiency": efficiency(make_batches(
            "length_aware", list(zip(true, true)), b, d, max(max_age, d * 2)))}
        for b in BATCH_SIZES for d in (2, 4, 8, 16, len(true))]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--pdfs", nargs="*", type=Path, default=[],
                    help="more PDF files or directories to include")
    ap.add_argument("--samples", type=int, default=12, help="generated sample papers to include")
    ap.add_argument("--depth", type=int, default=4, help="window depth in batches")
    ap.add_argument("--max-age", type=int, default=8, help="batches a page may wait at most")
    args = ap.parse_args(argv)

    from testing.samples import write_sample_pdfs

    pdfs = [Path(p) for p in SYSTEM_PDFS if Path(p).is_file()]
    for p in args.pdfs:
        pdfs += sorted(p.rglob("*.pdf")) if p.is_dir() else [p]
    with tempfile.TemporaryDirectory() as tmp:
        samples = write_sample_pdfs(tmp, n_docs=args.samples)
        real = collect(pdfs)
        generated = collect(samples)
    result = {
        "real_world": {"pdfs": [str(p) for p in pdfs], **simulate(real, args.depth, args.max_age)},
        "generated": {"pdfs": len(samples), **simulate(generated, args.depth, args.max_age)},
    }
    # The headline entries: the real-world set with the text-layer predictor.
    result["efficiency"] = [e for e in result["real_world"]["efficiency"]
                            if e["predictor"] in (None, "text")]
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for name in ("real_world", "generated"):
        r = result[name]
        print(f"{name}: {r['pages']} pages ({r['pages_with_text']} with text), spearman "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["spearman"].items()))
        for e in r["efficiency"]:
            print(f"  B={e['batch_size']:>2} {e['policy']:<15} {e['predictor'] or '-':<5} "
                  f"{e['efficiency']:.3f}")
        print("  depth sweep (text): " + ", ".join(
            f"B={e['batch_size']} d={e['depth']} {e['efficiency']:.3f}" for e in r["depth_sweep"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
