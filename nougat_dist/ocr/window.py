"""Rendered pages held back a few batches so that each model batch holds pages of similar
predicted length (`--batching length_aware`); the choice itself is `sched.batching.LengthWindow`.

The work loop puts every rendered batch from the DataLoader in (`take`) and runs what comes out
(`pop`). Pages that did not render need no decoding, so they come straight back out of `take` and
never wait. A page in the window is claimed and not yet processed: its unit is not complete, so
the writer does not commit it, and a stop leaves it to be redone on resume like any page in
flight. Memory is bounded: the window holds at most `depth` batches of page tensors, copied out
of the render workers' shared memory so that a page left waiting does not pin its whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nougat_dist.ocr.render import Batch
from nougat_dist.sched.batching import LengthWindow

#: Batches of rendered pages the window holds: enough choice to group lengths, little memory.
DEPTH = 4
#: Batches a page may see go past before it is taken whatever its length.
MAX_AGE = 8


@dataclass
class _Page:
    key: tuple[int, int]
    image: torch.Tensor
    render_ms: float
    predicted_tokens: float


class BatchWindow:
    """A LengthWindow over rendered pages: `Batch`es in, `Batch`es of similar lengths out."""

    def __init__(self, batch_size: int, depth: int = DEPTH, max_age: int = MAX_AGE,
                 pin_memory: bool = False) -> None:
        self.batch_size = batch_size
        self.pin_memory = pin_memory
        self._window: LengthWindow[_Page] = LengthWindow(batch_size, depth, max_age)
        self._keys: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        return len(self._window)

    @property
    def capacity(self) -> int:
        return self._window.capacity

    def keys(self) -> set[tuple[int, int]]:
        """The pages waiting in the window (rendered, claimed, not processed)."""
        return set(self._keys)

    def full(self) -> bool:
        return self._window.full()

    def take(self, batch: Batch) -> Batch | None:
        """Park a rendered batch's pages; returns its pages without an image (render errors,
        unreadable documents) as a batch to process now, or None if it had none."""
        ok = set(batch.ok_index)
        for j, i in enumerate(batch.ok_index):
            assert batch.images is not None
            predicted = batch.predicted_tokens[i] if batch.predicted_tokens else 0.0
            page = _Page(batch.keys[i], batch.images[j].clone(), batch.render_ms[i], predicted)
            self._window.add(page, predicted)
            self._keys.add(page.key)
        failed = [i for i in range(len(batch.keys)) if i not in ok]
        if not failed:
            return None
        return Batch(keys=[batch.keys[i] for i in failed], images=None, ok_index=[],
                     errors={n: batch.errors[i] for n, i in enumerate(failed)},
                     render_ms=[batch.render_ms[i] for i in failed],
                     predicted_tokens=[0.0] * len(failed))

    def ready(self, drained: bool) -> bool:
        """Whether a batch may come out: a whole batch is here, or nothing more is coming."""
        n = len(self._window)
        return n >= self.batch_size or (n > 0 and drained)

    def pop(self) -> Batch:
        """The next batch: pages of similar predicted length, the oldest page always among them."""
        pages = self._window.pop()
        for p in pages:
            self._keys.discard(p.key)
        first = pages[0].image
        out = torch.empty((len(pages), *first.shape), dtype=first.dtype,
                          pin_memory=self.pin_memory)
        torch.stack([p.image for p in pages], out=out)
        return Batch(keys=[p.key for p in pages], images=out, ok_index=list(range(len(pages))),
                     errors={}, render_ms=[p.render_ms for p in pages],
                     predicted_tokens=[p.predicted_tokens for p in pages])
