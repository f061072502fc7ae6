"""clean and chunk on hand-written job outputs, with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nougat_dist.stages import postprocess as pp
from nougat_dist.__main__ import main
from nougat_dist.store.chunks import DOCUMENTS_SCHEMA, PAGES_SCHEMA, atomic_write_table

BODY = ("Deep learning models read scanned pages and write markdown text that people can "
        "search, quote and reuse in new work.")
HEADER = "Journal of Tests 12 (2024)"


def _page(doc_id: str, page: int, text: str, status: str = "ok") -> dict:
    return {"doc_id": doc_id, "source": f"/in/{doc_id}.pdf", "member": None, "page": page, "text": text,
            "status": status, "error": None if status == "ok" else "x", "n_tokens": None,
            "elapsed_ms": 1.0, "rank": 0, "model": "fake", "dtype": "none"}


def write_job_output(out: Path) -> Path:
    """A finished job's output: pages/ (two chunks) and documents.parquet, as writer/gather make."""
    a = [
        _page("A", 1, f"{HEADER}\n\n# Intro\n\n{BODY}\n\n\n\nSecond   paragraph\twith tabs.\u00a0{BODY}\r\n"),
        _page("A", 2, f"{HEADER}\n\n{BODY} Page two.\n\nloop\nloop\nloop\nloop\nloop\nloop\n\n#\n\n"
                      f"[MISSING_PAGE_POST:2]"),
        _page("A", 3, "[MISSING_PAGE_EMPTY:3]", "empty"),
        _page("A", 4, f"{HEADER}\n\n## Results\n\n{BODY} Page four."),
        _page("A", 5, f"{HEADER}\n\n12 34 56 = 78 + 90 ** {{}} [] () 1 2 3 4 5 6 7 8 9 0 12 34"),
        _page("A", 6, "", "fail"),
    ]
    b = [_page("B", 1, f"Appendix\n\n{BODY} Page four."), _page("B", 2, "short"),
         _page("B", 3, f"{BODY} Page two.\n\nloop")]  # = A's page 2 once cleaned
    c = [_page("C", 1, "Too short to keep.")]
    d = [_page("D", 0, "", "error")]
    e = [_page("E", 1, " ".join(["spam eggs"] * 40))]
    pages_dir = out / "pages"
    atomic_write_table(pa.Table.from_pylist(a + b, schema=PAGES_SCHEMA), pages_dir / "part-r00000-000000.parquet")
    atomic_write_table(pa.Table.from_pylist(c + d + e, schema=PAGES_SCHEMA),
                       pages_dir / "part-r00001-000000.parquet")
    docs = [{"doc_id": k, "source": f"/in/{k}.pdf", "member": None, "n_pages": n, "n_failed": 0,
             "text": "", "duplicates": []} for k, n in (("A", 6), ("B", 3), ("C", 1), ("D", 0), ("E", 1))]
    atomic_write_table(pa.Table.from_pylist(docs, schema=DOCUMENTS_SCHEMA),
                       out / "documents" / "train-00000-of-00001.parquet")
    return out


# --- pieces --------------------------------------------------------------------------------------

def test_normalise() -> None:
    raw = "#  Title \r\n\r\n\r\n\r\nA\u00a0 b\t\tc  \n#\n\n[MISSING_PAGE_FAIL:3]\n\n## \nend[MISSING_PAGE_POST]"
    assert pp.normalise(raw) == "# Title\n\nA b c\n\nend"


def test_collapse_repeats() -> None:
    assert pp.collapse_repeats("a\nb\nb\nb\nc", 3) == ("a\nb\nb\nb\nc", 0)
    assert pp.collapse_repeats("a\nb\nb\nb\nb\nb\nc\n\n\n\n\nd", 3) == ("a\nb\nc\n\n\n\n\nd", 4)


def test_boilerplate_and_quality() -> None:
    opts = pp.CleanOptions()
    pages = [f"{HEADER}\nbody {i}" for i in range(3)] + ["other\nbody 9"]
    assert pp.boilerplate_lines(pages, opts) == {HEADER}  # 3 of 4 pages >= 0.5
    assert pp.boilerplate_lines(pages[:3], opts) == set()  # under boilerplate_min_pages
    assert pp.quality_problem("x" * 49, opts) == ("too_short", "49 chars < 50")
    assert pp.quality_problem("1 2 3 4 5 6 7 8 9 0 " * 3 + "abc", opts) == (
        "low_alpha", "letters 0.09 of non-space chars < 0.3")
    assert pp.quality_problem(" ".join(["spam eggs"] * 40), opts) == (
        "repetitive", "distinct words 0.03 < 0.2")
    assert pp.quality_problem(BODY, opts) is None
    with pytest.raises(ValueError, match="--min-alpha-fraction"):
        pp.CleanOptions(min_alpha_fraction=2)


# --- clean ---------------------------------------------------------------------------------------

def test_clean_known_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write_job_output(tmp_path)
    assert main(["clean", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "clean: kept 4/12 pages, 2/5 documents; dropped pages: duplicate_page=1, low_alpha=1, "
        "repetitive=1, status:empty=1, status:error=1, status:fail=1, too_short=2")
    pages = pq.read_table(out / "clean" / "pages").to_pylist()
    assert [(r["doc_id"], r["page"], r["text"]) for r in pages] == [
        ("A", 1, f"# Intro\n\n{BODY}\n\nSecond paragraph with tabs. {BODY}"),
        ("A", 2, f"{BODY} Page two.\n\nloop"),
        ("A", 4, f"## Results\n\n{BODY} Page four."),
        ("B", 1, f"Appendix\n\n{BODY} Page four."),
    ]
    docs = pq.read_table(out / "clean" / "documents").to_pylist()
    assert [(d["doc_id"], d["pages"]) for d in docs] == [("A", [1, 2, 4]), ("B", [1])]
    assert docs[0]["text"] == "\n\n".join(r["text"] for r in pages[:3])
    dropped = pq.read_table(out / "clean" / "dropped").to_pylist()
    assert sorted((d["doc_id"], -1 if d["page"] is None else d["page"], d["reason"]) for d in dropped) == sorted([
        ("A", 3, "status:empty"), ("A", 5, "low_alpha"), ("A", 6, "status:fail"), ("B", 2, "too_short"),
        ("B", 3, "duplicate_page"), ("C", 1, "too_short"), ("C", -1, "no_pages_kept"),
        ("D", 0, "status:error"), ("D", -1, "no_pages_kept"), ("E", 1, "repetitive"),
        ("E", -1, "no_pages_kept"),
    ])
    report = json.loads((out / "clean" / "report.json").read_text())
    assert report["removed"] == {"boilerplate_lines": 4, "missing_page_markers": 1, "repeated_lines": 5}
    assert report["dropped_documents"] == {"no_pages_kept": 3}
    assert report["options"]["min_chars"] == 50


def test_clean_duplicate_documents(tmp_path: Path) -> None:
    text = f"# T\n\n{BODY}"
    rows = [_page("X", 1, text), _page("Y", 1, text + "\n\n\n")]  # same once whitespace is normalised
    atomic_write_table(pa.Table.from_pylist(rows, schema=PAGES_SCHEMA), tmp_path / "pages" / "part-r00000-000000.parquet")
    docs = [{"doc_id": k, "source": k, "member": None, "n_pages": 1, "n_failed": 0, "text": "",
             "duplicates": []} for k in "XY"]
    atomic_write_table(pa.Table.from_pylist(docs, schema=DOCUMENTS_SCHEMA),
                       tmp_path / "documents" / "train-00000-of-00001.parquet")
    report = pp.clean(tmp_path)
    assert (report.pages_kept, report.documents_kept) == (1, 1)
    assert report.dropped_documents == {"duplicate_document": 1}
    dropped = pq.read_table(tmp_path / "clean" / "dropped").to_pylist()
    assert [(d["doc_id"], d["page"], d["reason"], d["detail"]) for d in dropped] == [
        ("Y", None, "duplicate_document", "same text as X"), ("Y", 1, "duplicate_document", "same text as X")]


def test_clean_needs_finished_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["clean", str(tmp_path)]) == 2
    assert "documents not found" in capsys.readouterr().err
    assert main(["chunk", str(tmp_path)]) == 2
    assert "run `nougat-dist clean" in capsys.readouterr().err


def test_only_user_errors_lose_their_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A bad flag value is one line and exit 2; any other ValueError of a stage propagates."""
    write_job_output(tmp_path)
    assert main(["clean", str(tmp_path), "--min-alpha-fraction", "2"]) == 2
    assert capsys.readouterr().err.strip() == "error: --min-alpha-fraction must be within [0, 1]"

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(pp, "clean", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["clean", str(tmp_path)])


# --- chunk ---------------------------------------------------------------------------------------

PAGES = [(1, "# Intro\n\nAlpha beta gamma delta.\nEpsilon zeta.\n\nEta theta iota kappa lambda mu."),
         (2, "## Method\n\nNu xi omicron pi rho sigma tau.")]


def test_chunk_known_answer() -> None:
    rows = pp.chunk_document("d", "s.pdf", "m.pdf", PAGES, pp.default_tokenizer(),
                             pp.ChunkOptions(max_tokens=8, overlap=2))
    assert [(r["chunk_id"], r["page_start"], r["page_end"], r["n_tokens"], r["text"]) for r in rows] == [
        ("d-0", 1, 1, 7, "# Intro\n\nAlpha beta gamma delta."),  # ends at the paragraph
        ("d-1", 1, 1, 5, "delta.\nEpsilon zeta."),  # 2 tokens of overlap, then to the paragraph
        ("d-2", 1, 1, 8, "zeta.\n\nEta theta iota kappa lambda mu"),  # no break: max tokens
        ("d-3", 1, 1, 3, "lambda mu."),  # ends before the heading...
        ("d-4", 2, 2, 8, "## Method\n\nNu xi omicron pi rho sigma"),  # ...which starts clean
        ("d-5", 2, 2, 4, "rho sigma tau."),
    ]
    text = "\n\n".join(t for _, t in PAGES)
    assert all(text[r["char_start"]:r["char_end"]] == r["text"] for r in rows)
    # One chunk spanning both pages when it fits.
    (whole,) = pp.chunk_document("d", "s", None, PAGES, pp.default_tokenizer(), pp.ChunkOptions(max_tokens=100, overlap=0))
    assert (whole["page_start"], whole["page_end"], whole["n_tokens"], whole["text"]) == (1, 2, 27, text)


def test_chunk_with_tokenizer_file(tmp_path: Path) -> None:
    """--tokenizer takes a tokenizer.json; a byte-level BPE (like Nougat's) makes whitespace
    tokens, which must not end up at chunk edges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    bpe = Tokenizer(models.BPE(byte_vocab, []))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.save(str(tmp_path / "tokenizer.json"))
    tok = pp.load_tokenizer(tmp_path)  # a dir holding tokenizer.json, like a checkpoint dir
    rows = pp.chunk_document("d", "s", None, PAGES, tok, pp.ChunkOptions(max_tokens=40, overlap=5))
    assert all(r["n_tokens"] <= 40 and r["text"] == r["text"].strip() for r in rows)
    assert rows[0]["text"] == "# Intro\n\nAlpha beta gamma delta."
    text = "\n\n".join(t for _, t in PAGES)
    assert rows[-1]["text"].endswith("tau.") and rows[-1]["page_end"] == 2
    assert rows[0]["char_start"] == 0 and rows[-1]["char_end"] == len(text)
    # No text is lost between chunks (only whitespace, where a chunk ends before a heading).
    assert all(text[a["char_end"]:b["char_start"]].strip() == "" for a, b in zip(rows, rows[1:]))
    assert all(text[r["char_start"]:r["char_end"]] == r["text"] for r in rows)
    # A saved default tokenizer gives the default's answer.
    pp.default_tokenizer().save(str(tmp_path / "default.json"))
    opts = pp.ChunkOptions(max_tokens=8, overlap=2)
    assert (pp.chunk_document("d", "s", None, PAGES, pp.load_tokenizer(tmp_path / "default.json"), opts)
            == pp.chunk_document("d", "s", None, PAGES, pp.default_tokenizer(), opts))
    with pytest.raises(ValueError, match="--overlap"):
        pp.ChunkOptions(max_tokens=8, overlap=4)


def test_clean_then_chunk_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = write_job_output(tmp_path)
    assert main(["clean", str(out)]) == 0
    assert main(["chunk", str(out), "--max-tokens", "30", "--overlap", "5", "--rows-per-file", "3"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    files = sorted((out / "chunks").glob("train-*.parquet"))
    chunks = pa.concat_tables(pq.read_table(f) for f in files).to_pylist()
    assert line == (f"chunk: {len(chunks)} chunks ({sum(c['n_tokens'] for c in chunks)} tokens, tokenizer "
                    f"default (words/punctuation/digits)) from 2 documents in {len(files)} file(s) under "
                    f"{out / 'chunks'}")
    assert len(files) == -(-len(chunks) // 3) and all(c["n_tokens"] <= 30 for c in chunks)
    assert [(c["doc_id"], c["chunk_index"]) for c in chunks][:2] == [("A", 0), ("A", 1)]
    assert chunks[-1]["doc_id"] == "B" and chunks[-1]["page_start"] == chunks[-1]["page_end"] == 1
    spans = [(c["page_start"], c["page_end"]) for c in chunks if c["doc_id"] == "A"]
    assert spans[0][0] == 1 and spans[-1][1] == 4 and all(a <= b for a, b in spans)


def test_datasets_loads_pages_documents_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: imported first, and the constant set
    # (and restored) here, so offline mode does not leak into later tests (the upload tests).
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import datasets

    out = write_job_output(tmp_path / "out")
    pp.clean(out)
    pp.chunk(out, pp.ChunkOptions(max_tokens=30, overlap=5))
    cache = str(tmp_path / "hf-cache")
    for files, schema, n in ((str(out / "pages" / "*.parquet"), PAGES_SCHEMA, 12),
                             (str(out / "documents" / "*.parquet"), DOCUMENTS_SCHEMA, 5),
                             (str(out / "chunks" / "*.parquet"), pp.CHUNKS_SCHEMA, None)):
        ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
        assert ds.column_names == schema.names
        expected = pa.concat_tables(pq.read_table(p) for p in sorted(Path(files).parent.glob(Path(files).name)))
        assert ds.num_rows == (n if n is not None else expected.num_rows)
        assert ds.to_list() == expected.to_pylist()  # unchanged, row for row
