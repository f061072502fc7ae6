"""Page postprocessing as nougat's predict.py does it, and the deliberate numbering fix."""

from __future__ import annotations

import torch

from nougat_dist.ocr.model import is_oom, page_results
from testing.fake_model import FakeModel


def _out(preds, repeats):
    return {"predictions": preds, "repeats": repeats, "sequences": None}


def test_missing_page_markers_use_real_page_numbers():
    # The stock CLI numbers MISSING_PAGE_EMPTY by global batch index (i*batchsize+j+1); pages
    # 41 and 42 of a document in the third batch of 4 would be labelled 9 and 10 there.
    out = _out(["some text", "loop loop", "[MISSING_PAGE_POST]"], [0, 7, None])
    res = page_results(out, [41, 42, 43], markdown=False, skipping=True, pad_token_id=None)
    assert [r.text for r in res] == ["\n\n[MISSING_PAGE_EMPTY:41]\n\n",
                                     "\n\n[MISSING_PAGE_FAIL:42]\n\n",
                                     "\n\n[MISSING_PAGE_EMPTY:43]\n\n"]
    assert [r.status for r in res] == ["empty", "fail", "empty"]


def test_page_tokens_and_batch_steps():
    # <s> a b </s> | <s> a b c d e (ran to the end) | <s> x <pad>... (truncated by the check)
    seqs = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 5, 6, 7, 8, 9], [0, 5, 1, 1, 1, 1]])
    out = {"predictions": ["ab", "abcde", "x"], "repeats": [None, None, 3], "sequences": seqs}
    res = page_results(out, [1, 2, 3], markdown=False, skipping=True, pad_token_id=1)
    assert [(r.n_tokens, r.batch_steps) for r in res] == [(4, 6), (6, 6), (2, 6)]
    # No sequences (a fake model): no counts, rather than made-up ones.
    fake = page_results(_out(["t"], [None]), [1], markdown=False, skipping=True, pad_token_id=1)
    assert (fake[0].n_tokens, fake[0].batch_steps) == (None, None)


def test_no_skipping_keeps_text_and_markdown_flag():
    out = _out(["(1) \\[x\\]"], [0])
    kept = page_results(out, [1], markdown=False, skipping=False, pad_token_id=None)
    assert kept[0].text == "(1) \\[x\\]" and kept[0].status == "ok"
    md = page_results(out, [1], markdown=True, skipping=False, pad_token_id=None)
    assert md[0].text.startswith("\\[x \\tag{1}\\]")  # markdown_compatible adds equation tags


def test_oom_detection():
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("CUDA error: device-side assert triggered"))


def test_fake_model_contract_and_per_rank_delay():
    m0, m1 = FakeModel("delay=0,delay_rank1=0.01", 0), FakeModel("delay=0,delay_rank1=0.01", 1)
    assert (m0.delay, m1.delay) == (0.0, 0.01)
    out = m0.inference(image_tensors=torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]))
    assert len(out["predictions"]) == 2 and out["predictions"][0] != out["predictions"][1]
    assert out["repeats"] == [None, None]


def test_model_threads_leave_cores_to_rendering_only_when_it_needs_them():
    from nougat_dist.ocr.model import model_threads

    # a real model on CPU: seconds per page against tens of ms of rendering -> every core
    assert model_threads(2, render_ms_per_page=25, model_ms_per_page=5000) == 2
    assert model_threads(32, 25, 400) == 32
    # the tiny checkpoint: rendering needs ~0.8 of a core -> one core left to it
    assert model_threads(2, 21, 27) == 1
    assert model_threads(8, 21, 27) == 7
    # rendering slower than the model: never below one thread
    assert model_threads(2, 80, 20) == 1
    assert model_threads(4, 80, 20) == 1


def test_cpu_threads_only_lower_and_settle():
    from nougat_dist.ocr.model import CpuThreads

    before = torch.get_num_threads()
    try:
        t = CpuThreads(2)
        assert torch.get_num_threads() == 2
        t.observe(21, 40)  # rendering needs half a core: keep one core for it
        assert t.threads == torch.get_num_threads() == 1
        t.observe(21, 400)  # slower per page on fewer threads: not a reason to go back up
        assert t.threads == 1
        real = CpuThreads(2)
        for _ in range(5):
            real.observe(25, 5000)
        assert real.threads == torch.get_num_threads() == 2 and real.batches == CpuThreads.SETTLE_BATCHES
        late = CpuThreads(2)
        for _ in range(CpuThreads.SETTLE_BATCHES):
            late.observe(1, 1000)
        late.observe(100, 10)  # settled: later batches change nothing
        assert late.threads == 2
    finally:
        torch.set_num_threads(before)


class HungryModel:
    """Allocates a tensor for every attempt, then runs out of memory above `limit` pages; records
    whether the previous failed attempt's tensor could still be reached when the next began."""

    def __init__(self, limit: int) -> None:
        self.inner = FakeModel("delay=0", 0)
        self.limit = limit
        self.failed: list = []  # weakrefs to the failed attempts' tensors
        self.alive_at_retry: list[bool] = []

    def inference(self, image_tensors, early_stopping=True):
        import gc
        import weakref

        gc.collect()
        self.alive_at_retry.extend(ref() is not None for ref in self.failed)
        self.failed = []
        activations = torch.ones(len(image_tensors), 1024)
        if len(image_tensors) > self.limit:
            self.failed.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return self.inner.inference(image_tensors, early_stopping)


def test_oom_back_off_retries_with_the_failed_attempt_freed():
    from nougat_dist.ocr.pages import PageRunner, RankStats

    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(5)])
    pages = [1, 2, 3, 4, 5]
    plain = PageRunner(FakeModel("delay=0", 0), False, True, RankStats(0)).infer(images, pages)
    model = HungryModel(limit=1)
    stats = RankStats(0)
    got = PageRunner(model, False, True, stats).infer(images, pages)
    assert [r.text for r in got] == [r.text for r in plain]
    assert stats.oom_retries == 4  # 5 -> 2 + 3; 2 -> 1 + 1; 3 -> 1 + 2; 2 -> 1 + 1
    assert model.alive_at_retry and not any(model.alive_at_retry)
