"""torchrun --standalone on CPU (gloo): same rows as one rank, stealing under skew, world sizes."""

from __future__ import annotations


import pandas as pd
import pytest

from conftest import rows, run_launch, stats
from testing import fake_model
from testing.samples import write_long_pdf, write_sample_pdfs

FAST, SLOW = 0.1, 1.0  # seconds per page of the fake model on rank 0 and rank 1 (sleeps)
SKEWED = fake_model.env(f"delay={FAST},delay_rank1={SLOW}")
TIGHT = ["--unit-pages", "1", "--batch-size", "1", "--num-workers", "1", "--prefetch-factor", "1"]


def test_two_ranks_match_one_rank_with_the_tiny_model(tmp_path, tiny_checkpoint, sample_pdfs):
    common = ["--input", str(sample_pdfs[0].parent), "--checkpoint", str(tiny_checkpoint),
              "--unit-pages", "2", "--device", "cpu"]
    run_launch([*common, "--output", str(tmp_path / "one")])
    run_launch([*common, "--output", str(tmp_path / "two")], nproc=2)
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert one == two and len(one) == 11
    assert {r["rank"] for r in stats(tmp_path / "two")["per_rank"] if r["pages"] > 0} == {0, 1}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_page_exactly_once_for_world_sizes(tmp_path, world):
    pdfs = write_sample_pdfs(tmp_path / "in", n_docs=4, seed=world)
    out = tmp_path / "out"
    run_launch(["--input", str(tmp_path / "in"), "--output", str(out), "--unit-pages", "2",
                "--device", "cpu"], nproc=world if world > 1 else 0, env=fake_model.env("delay=0.01"))
    got = rows(out)
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(got) == manifest.n_pages.sum() == stats(out)["pages_total"]
    assert len(pdfs) == len(manifest)


def test_skewed_ranks_balance_by_stealing(tmp_path):
    """Rank 1 is 10x slower. Ideal makespan = pages / (1/FAST + 1/SLOW)."""
    pdf = write_long_pdf(tmp_path / "book.pdf", 120)
    out = tmp_path / "steal"
    run_launch(["--input", str(pdf), "--output", str(out), "--device", "cpu", *TIGHT],
               nproc=2, env=SKEWED)
    s = stats(out)
    ideal = 120 / (1 / FAST + 1 / SLOW)
    assert len(rows(out)) == 120
    assert s["per_rank"][0]["units_stolen"] > 0
    assert s["makespan_s"] <= 1.25 * ideal, s


def test_without_stealing_the_slow_rank_sets_the_pace(tmp_path):
    pdf = write_long_pdf(tmp_path / "book.pdf", 20)
    out = tmp_path / "static"
    run_launch(["--input", str(pdf), "--output", str(out), "--device", "cpu", *TIGHT, "--no-steal"],
               nproc=2, env=SKEWED)
    s = stats(out)
    ideal = 20 / (1 / FAST + 1 / SLOW)
    assert s["per_rank"][0]["units_stolen"] == s["per_rank"][1]["units_stolen"] == 0
    assert s["makespan_s"] >= 2.5 * ideal  # static halves: the slow rank does 10 pages (~10 s)


def test_one_long_document_keeps_both_ranks_busy(tmp_path):
    pdf = write_long_pdf(tmp_path / "one.pdf", 40)
    out = tmp_path / "out"
    run_launch(["--input", str(pdf), "--output", str(out), "--device", "cpu",
                "--unit-pages", "4"], nproc=2, env=fake_model.env("delay=0.05"))
    per_rank = [r["pages"] for r in stats(out)["per_rank"]]
    assert sum(per_rank) == 40 and min(per_rank) >= 10, per_rank
