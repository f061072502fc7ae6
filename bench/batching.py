"""Decode efficiency of document-order vs length-aware batches, simulated on real PDFs.

Simulation: a page's true decode length is its text layer's token count (characters / 3.2, the
ratio of Nougat's BPE on English papers), which needs no GPU and no weights. Predictors compared:
the text layer (exact by construction here, so it measures the window alone), ink coverage of the
rendered page (what a scan gets), and no predictor (document order).

    python bench/batching.py [--json] [--pdfs DIR ...] [--samples N] [--model]

Efficiency = Σ page tokens / Σ (batch size x batch steps), a batch running as many steps as its
longest page. Pages without a text layer are left out of the simulation (they have no true length
here); the count is reported.

--model decodes for real, on this CPU, with the tiny checkpoint's "eos" variant (pages end with
</s> after a number of tokens that grows with their ink; testing/tiny_checkpoint.py) on generated
scan-like pages: the same rendered pages in document-order and in length-aware batches, the two
policies interleaved in every repetition. It reports the measured efficiency (each batch's decode
steps and each page's tokens, as the page rows record them), model pages/s and their ratio, the
ink predictor's rank correlation with the true lengths, and whether every page's text is the same
under both policies (it must be: max length < 135, so nougat's batch-level repetition check
cannot flag a page).
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


def book_lines(n_pages: int, seed: int) -> list[int]:
    """Lines of box words per page of a scanned book: mostly full, some short (titles, ends of
    chapters, figures). The eos variant's stop step grows with ink and reaches max length near
    32 lines, so this spreads the true lengths over the whole range, as real pages spread over
    Nougat's."""
    import random

    rng = random.Random(seed)
    return [rng.randint(15, 32) if rng.random() < 0.7 else rng.randint(0, 14)
            for _ in range(n_pages)]


def model_bench(n_pages: int, batch_sizes: list[int], reps: int, max_length: int, depth: int,
                max_age: int, threads: int, seed: int = 0) -> dict:
    """Real decoding, document order vs length-aware, same pages, interleaved repetitions."""
    import statistics
    import time

    import torch
    from nougat import NougatModel

    from nougat_dist.ocr.model import page_results
    from testing.tiny_checkpoint import build_tiny_checkpoint, write_ink_pages

    torch.set_num_threads(threads)
    lines = book_lines(n_pages, seed)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_tiny_checkpoint(Path(tmp) / "eos", max_length=max_length, variant="eos")
        model = NougatModel.from_pretrained(ckpt).eval()
        pad = model.decoder.tokenizer.pad_token_id
        images, predicted = [], []
        for pdf in write_ink_pages(Path(tmp) / "pages", lines, seed=seed):
            doc = pypdfium2.PdfDocument(str(pdf))
            img = doc[0].render(scale=NOUGAT_DPI / 72).to_pil()
            predicted.append(predict.predict_page(doc[0], img).tokens)
            images.append(model.encoder.prepare_input(img, random_padding=False))
            doc.close()

    def decode(batches: list[list[int]]) -> tuple[float, dict[int, tuple[str, int, int]]]:
        got = {}
        t0 = time.perf_counter()
        for batch in batches:
            with torch.inference_mode():
                out = model.inference(image_tensors=torch.stack([images[i] for i in batch]))
            for i, r in zip(batch, page_results(out, batch, markdown=True, skipping=True,
                                                pad_token_id=pad)):
                got[i] = (r.text, r.n_tokens, r.batch_steps)
        return time.perf_counter() - t0, got

    items = list(zip(range(n_pages), predicted))
    rows, ratios, same_text, true_len = [], [], True, None
    for b in batch_sizes:
        plans = {policy: make_batches(policy, items, b, depth, max_age)
                 for policy in ("document_order", "length_aware")}
        times: dict[str, list[float]] = {policy: [] for policy in plans}
        results: dict[str, dict] = {}
        for rep in range(reps):
            order = list(plans) if rep % 2 == 0 else list(plans)[::-1]
            for policy in order:
                dt, results[policy] = decode(plans[policy])
                times[policy].append(dt)
        same_text &= ({i: t for i, (t, _, _) in results["document_order"].items()}
                      == {i: t for i, (t, _, _) in results["length_aware"].items()})
        true_len = [results["document_order"][i][1] for i in range(n_pages)]
        for policy, got in results.items():
            tokens = sum(n for _, n, _ in got.values())
            slots = sum(s for _, _, s in got.values())
            rows.append({"policy": policy, "batch_size": b, "efficiency": tokens / slots,
                         "pages_per_s": n_pages / statistics.median(times[policy]),
                         "seconds": times[policy]})
        # per-repetition ratio of pages/s (interleaved, so both saw the same machine state)
        ratios.append({"batch_size": b, "length_aware_over_document_order": statistics.median(
            d / a for d, a in zip(times["document_order"], times["length_aware"]))})
    return {"pages": n_pages, "max_length": max_length, "threads": threads, "reps": reps,
            "depth": depth, "max_age": max_age,
            "spearman_ink_vs_true": predict.spearman(predicted, true_len or []),
            "same_text_under_both_policies": same_text, "efficiency": rows, "speed": ratios}


def _page_texts(out: Path) -> dict[tuple[str, int], str]:
    import pyarrow.parquet as pq

    return {(r["source"], r["page"]): r["text"]
            for r in pq.read_table(out / "pages", columns=["source", "page", "text"]).to_pylist()}


def job_bench(n_pages: int, batch_size: int, reps: int, max_length: int, device: str,
              num_workers: int, pdf_dir: Path | None = None, checkpoint: Path | None = None,
              seed: int = 0) -> dict:
    """The real job, `torchrun --standalone --nproc_per_node=1 launch.py`, over the same pages
    with --batching document_order and length_aware, the two interleaved in every repetition.

    Pages/s is over each run's work phase (stats.json makespan_s: model load and finalize left
    out); decode efficiency is stats.json's. Checkpoint: the tiny `eos` variant (page lengths set
    by ink), built here unless given; pages: scan-like book pages unless `pdf_dir` is given.
    """
    import os
    import statistics
    import subprocess

    from testing.tiny_checkpoint import build_tiny_checkpoint, write_ink_pages

    policies = ("document_order", "length_aware")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("NLTK_DATA", str(ROOT / "tests" / "fixtures" / "nltk_data"))
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint or build_tiny_checkpoint(Path(tmp) / "eos", max_length=max_length,
                                                   variant="eos")
        if pdf_dir is None:
            pdf_dir = Path(tmp) / "pages"
            write_ink_pages(pdf_dir, book_lines(n_pages, seed), seed=seed)
        texts: dict[str, dict] = {}
        for rep in range(reps):
            for policy in (policies if rep % 2 == 0 else policies[::-1]):
                out = Path(tmp) / f"out-{policy}-{rep}"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node=1", "launch.py", "--input", str(pdf_dir), "--output",
                       str(out), "--checkpoint", str(ckpt), "--device", device, "--batch-size",
                       str(batch_size), "--num-workers", str(num_workers), "--batching", policy]
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                                       f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
                stats = json.loads((out / "stats.json").read_text())
                runs[policy].append({"pages": stats["pages_this_run"],
                                     "makespan_s": stats["makespan_s"], "wall_s": stats["wall_s"],
                                     "efficiency": stats["decode"]["efficiency"]})
                texts.setdefault(policy, _page_texts(out))
    rate = {p: [r["pages"] / r["makespan_s"] for r in runs[p]] for p in policies}
    a, b = texts["document_order"], texts["length_aware"]
    return {
        "device": device, "batch_size": batch_size, "reps": reps, "max_length": max_length,
        "pages": runs["length_aware"][0]["pages"], "num_workers": num_workers,
        "policies": {p: {"pages_per_s": statistics.median(rate[p]),
                         "efficiency": runs[p][0]["efficiency"], "runs": runs[p]} for p in policies},
        # per repetition (both policies ran back to back in it), then the median
        "length_aware_over_document_order": statistics.median(
            la / do for la, do in zip(rate["length_aware"], rate["document_order"])),
        "pages_whose_text_differs": sum(a[k] != b.get(k) for k in a),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--pdfs", nargs="*", type=Path, default=[],
                    help="more PDF files or directories to include")
    ap.add_argument("--samples", type=int, default=12, help="generated sample papers to include")
    ap.add_argument("--depth", type=int, default=4, help="window depth in batches")
    ap.add_argument("--max-age", type=int, default=8, help="batches a page may wait at most")
    ap.add_argument("--model", action="store_true",
                    help="also decode for real on this CPU with the tiny 'eos' checkpoint variant")
    ap.add_argument("--model-pages", type=int, default=96, help="pages for --model")
    ap.add_argument("--model-batch-sizes", type=int, nargs="+", default=[8, 24],
                    help="batch sizes for --model")
    ap.add_argument("--model-reps", type=int, default=3, help="interleaved repetitions for --model")
    ap.add_argument("--model-max-length", type=int, default=128,
                    help="the variant's max length for --model (< 135: no page can be flagged)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for --model")
    ap.add_argument("--job", action="store_true",
                    help="also run the real job (torchrun, 1 rank) with each --batching policy, "
                    "interleaved, with the tiny 'eos' checkpoint variant; 'job' in the output")
    ap.add_argument("--job-only", action="store_true", help="--job, and skip everything else")
    ap.add_argument("--job-pages", type=int, default=96, help="generated pages for --job")
    ap.add_argument("--job-pdfs", type=Path, help="a PDF directory for --job instead")
    ap.add_argument("--job-checkpoint", type=Path, help="checkpoint for --job (default: build "
                    "the eos variant at --job-max-length)")
    ap.add_argument("--job-batch-size", type=int, default=24, help="--batch-size for --job")
    ap.add_argument("--job-reps", type=int, default=2, help="interleaved repetitions for --job")
    ap.add_argument("--job-max-length", type=int, default=128, help="eos variant max length")
    ap.add_argument("--job-device", default="cpu", help="--device for --job")
    ap.add_argument("--job-workers", type=int, default=1, help="--num-workers for --job")
    args = ap.parse_args(argv)
    job = None
    if args.job or args.job_only:
        job = job_bench(args.job_pages, args.job_batch_size, args.job_reps, args.job_max_length,
                        args.job_device, args.job_workers, args.job_pdfs, args.job_checkpoint)
    if args.job_only:
        print(json.dumps({"job": job}) if args.json else _job_lines(job))
        return 0

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
    if job is not None:
        result["job"] = job
    if args.model:
        result["model"] = model_bench(args.model_pages, args.model_batch_sizes, args.model_reps,
                                      args.model_max_length, args.depth, args.max_age, args.threads)
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
    if "model" in result:
        m = result["model"]
        print(f"model (tiny eos variant, CPU, {m['pages']} pages, max length {m['max_length']}, "
              f"{m['threads']} thread(s), {m['reps']} interleaved reps): spearman ink vs true "
              f"{m['spearman_ink_vs_true']:.3f}, same text under both policies: "
              f"{m['same_text_under_both_policies']}")
        for e in m["efficiency"]:
            print(f"  B={e['batch_size']:>2} {e['policy']:<15} efficiency {e['efficiency']:.3f}  "
                  f"{e['pages_per_s']:.2f} pages/s")
        for r in m["speed"]:
            print(f"  B={r['batch_size']:>2} pages/s length-aware / document order: "
                  f"{r['length_aware_over_document_order']:.2f}x")
    if job is not None:
        print(_job_lines(job))
    return 0


def _job_lines(job: dict) -> str:
    lines = [f"job (torchrun, 1 rank, {job['device']}, {job['pages']} pages, batch "
             f"{job['batch_size']}, eos max length {job['max_length']}, {job['reps']} interleaved "
             f"reps; pages whose text differs: {job['pages_whose_text_differs']}):"]
    for policy, r in job["policies"].items():
        lines.append(f"  {policy:<15} {r['pages_per_s']:.2f} pages/s (work phase), decode "
                     f"efficiency {r['efficiency']:.3f}")
    lines.append(f"  length-aware / document order: {job['length_aware_over_document_order']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
