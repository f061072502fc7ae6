"""Length-aware batches from a bounded lookahead window of rendered pages (pure, no torch).

`model.inference` decodes until the longest page of the batch stops, so a batch costs
(batch size) x (its longest page) decode slots. Pages arrive in document order; this window holds
a few batches' worth and emits, each time, a batch of pages of similar predicted length:

* the batch always holds the oldest page in the window, and every page that has waited
  `max_age` emitted batches or more, so no page waits forever and a work unit's last page is
  never held back for long (commits stay unit-complete: the work loop commits a unit when its
  last page is done, as before);
* the other slots go to the pages whose predicted length is nearest to those pages' range;
* memory is bounded: the window never holds more than `depth` batches of pages.

`efficiency` is the figure this is judged by: Σ page tokens / Σ (batch size x batch steps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Generic, Iterable, Iterator, Sequence, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

POLICIES = ("document_order", "length_aware")


@dataclass
class _Entry(Generic[T]):
    item: T
    length: float
    arrival: int  # batches emitted when the page entered the window


@dataclass
class LengthWindow(Generic[T]):
    """Holds up to `depth` x `batch_size` pages and emits batches of similar predicted length."""

    batch_size: int
    depth: int = 4
    max_age: int = 8
    _entries: list[_Entry[T]] = field(default_factory=list)
    _emitted: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.depth < 1 or self.max_age < 1:
            raise ValueError("batch_size, depth and max_age must be >= 1")

    @property
    def capacity(self) -> int:
        return self.batch_size * self.depth

    def __len__(self) -> int:
        return len(self._entries)

    def full(self) -> bool:
        """True when the window should emit before it takes another page."""
        return len(self._entries) >= self.capacity

    def add(self, item: T, length: float) -> None:
        """Take one rendered page with its predicted length."""
        self._entries.append(_Entry(item, float(length), self._emitted))

    def pop(self) -> list[T]:
        """Emit one batch (at most `batch_size` pages; fewer only when the window holds fewer)."""
        if not self._entries:
            return []
        entries = self._entries  # arrival order: index 0 is the oldest
        due = [i for i, e in enumerate(entries) if self._emitted - e.arrival >= self.max_age]
        chosen = due[: self.batch_size] or [0]
        lo = min(entries[i].length for i in chosen)
        hi = max(entries[i].length for i in chosen)
        taken = set(chosen)

        def distance(i: int) -> tuple[float, int]:
            length = entries[i].length
            # Ties go to the older page.
            return (max(lo - length, length - hi, 0.0), i)

        rest = sorted((i for i in range(len(entries)) if i not in taken), key=distance)
        chosen += rest[: self.batch_size - len(chosen)]
        keep = set(chosen)
        batch = [entries[i].item for i in sorted(keep)]
        self._entries = [e for i, e in enumerate(entries) if i not in keep]
        self._emitted += 1
        return batch


def length_aware_batches(items: Iterable[tuple[T, float]], batch_size: int, depth: int = 4,
                         max_age: int = 8) -> Iterator[list[T]]:
    """Batches from a stream of (item, predicted length), through a LengthWindow."""
    window: LengthWindow[T] = LengthWindow(batch_size, depth, max_age)
    for item, length in items:
        window.add(item, length)
        if window.full():
            yield window.pop()
    while len(window):
        yield window.pop()


def document_order_batches(items: Iterable[tuple[T, float]], batch_size: int) -> Iterator[list[T]]:
    """Consecutive batches in arrival order: what the stock CLI does."""
    batch: list[T] = []
    for item, _ in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def make_batches(policy: str, items: Sequence[tuple[T, float]], batch_size: int, depth: int = 4,
                 max_age: int = 8) -> list[list[T]]:
    """Batches of `items` under `policy` (one of POLICIES)."""
    if policy == "document_order":
        return list(document_order_batches(items, batch_size))
    if policy == "length_aware":
        return list(length_aware_batches(items, batch_size, depth, max_age))
    raise ValueError(f"unknown batching policy {policy!r}; expected one of {POLICIES}")


def efficiency(batches: Iterable[Sequence[float]]) -> float:
    """Σ page tokens / Σ (batch size x batch steps), from each batch's true page lengths.

    A batch runs as many steps as its longest page; 1.0 means no slot decoded padding.
    """
    used = slots = 0.0
    for lengths in batches:
        if not lengths:
            continue
        used += sum(lengths)
        slots += len(lengths) * max(lengths)
    return used / slots if slots else 1.0
