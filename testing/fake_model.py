"""A fake Nougat model for the scheduling and fault tests: a sleep per page, no checkpoint.

A run uses it through the product's model hook: `env("delay=0.05")` is the environment
(NOUGAT_DIST_MODEL=testing.fake_model:source:delay=0.05) under which every rank builds its
FakeModel instead of loading Nougat.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch

from nougat_dist.ocr.model import MODEL_ENV, ModelSource

#: What the fake model's rows record and the input its render workers prepare (Nougat's own
#: input size, so pages render as for the real model).
MODEL_ID, DTYPE, INPUT_SIZE = "fake", "none", [448, 224]


class FakeModel:
    """Honours NougatModel.inference's contract with a sleep per page.

    Spec string: comma-separated `key=value`, e.g. `delay=0.05,delay_rank1=0.5,oom_above=2`.
    `oom_above=N` raises the error the CUDA allocator raises for any batch larger than N pages;
    `text_bytes=N` adds N characters of incompressible text to each page.
    Text is derived from the input pixels, so it is page-dependent.
    """

    def __init__(self, spec: str, rank: int) -> None:
        opts = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
        self.delay = float(opts.get(f"delay_rank{rank}", opts.get("delay", "0")))
        self.oom_above = int(opts.get("oom_above", "0"))
        self.text_bytes = int(opts.get("text_bytes", "0"))

    def inference(self, image_tensors: torch.Tensor, early_stopping: bool = True) -> dict[str, Any]:
        n = len(image_tensors)
        if self.oom_above and n > self.oom_above:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {n} GiB (injected by the fake model)")
        time.sleep(self.delay * n)
        # A digest of the pixels: page-dependent, and unlike a float sum the same whatever the
        # number of threads torch reduces with.
        preds = []
        for t in image_tensors:
            digest = hashlib.sha256(t.float().contiguous().cpu().numpy().tobytes()).hexdigest()
            preds.append(f"fake page {digest[:16]}\n\n" + self._filler(digest))
        return {"predictions": preds, "repeats": [None] * n, "sequences": None, "repetitions": []}


    def _filler(self, digest: str) -> str:
        """`text_bytes` characters of hex that do not compress (a sha256 chain from the page's
        digest), for tests whose chunks must be large."""
        out = []
        while sum(map(len, out)) < self.text_bytes:
            digest = hashlib.sha256(digest.encode()).hexdigest()
            out.append(digest)
        return "".join(out)[:self.text_bytes]


def source(spec: str = "") -> ModelSource:
    """The hook's factory: every rank runs FakeModel(spec, rank)."""
    return ModelSource(MODEL_ID, DTYPE, INPUT_SIZE, False,
                       load=lambda rank, device: FakeModel(spec, rank), cpu_threads=False)


def value(spec: str) -> str:
    """The hook's value for FakeModel(spec) (for $NOUGAT_DIST_MODEL)."""
    return f"{__name__}:source:{spec}"


def env(spec: str) -> dict[str, str]:
    """The environment under which a run's ranks use FakeModel(spec) instead of Nougat."""
    return {MODEL_ENV: value(spec)}
