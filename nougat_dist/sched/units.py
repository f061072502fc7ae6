"""Work units: ranges of at most --unit-pages pages of one document, the unit of scheduling and
of commit, held as integer arrays (see `Units`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    from nougat_dist.store.manifest import DocEntry


@dataclass(frozen=True)
class Unit:
    """A range of pages of one document: the unit of scheduling and of commit.

    Pages are 1-based and inclusive. A document that cannot be read at all has one unit with
    first == last == 0, which produces its single error row.
    """

    doc: int  # index into the job's unique-document list
    first: int
    last: int

    @property
    def n_pages(self) -> int:
        return self.last - self.first + 1 if self.first else 1

    def pages(self) -> range:
        return range(self.first, self.last + 1)

    def key(self, doc_id: str) -> str:
        return unit_key(doc_id, self.first, self.last)


def unit_key(doc_id: str, first: int, last: int) -> str:
    """How a unit is named in a chunk's footer: `doc_id:first-last`."""
    return f"{doc_id}:{first}-{last}"


def parse_unit_key(key: str) -> tuple[str, int, int]:
    doc_id, span = key.rsplit(":", 1)
    first, last = span.split("-")
    return doc_id, int(first), int(last)


class Units(Sequence[Unit]):
    """Every unit of a job as three integer arrays (a million documents make ~2 M units: as
    Unit objects they cost seconds to build and to send; as arrays, milliseconds).

    A document's units are contiguous and in page order, which makes a unit findable from its key.
    """

    def __init__(self, doc: np.ndarray, first: np.ndarray, last: np.ndarray, start: np.ndarray,
                 unit_pages: int) -> None:
        self.doc, self.first, self.last = doc, first, last
        self.start = start  # index of each document's first unit
        self.unit_pages = unit_pages

    def __len__(self) -> int:
        return len(self.doc)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return Unit(int(self.doc[i]), int(self.first[i]), int(self.last[i]))

    def __iter__(self) -> Iterator[Unit]:
        for d, f, last in zip(self.doc.tolist(), self.first.tolist(), self.last.tolist()):
            yield Unit(d, f, last)

    @property
    def n_pages(self) -> np.ndarray:
        """Pages per unit (1 for a document's error unit), as int64."""
        return np.where(self.first > 0, self.last - self.first + 1, 1)

    def find(self, doc: int, first: int, last: int) -> int | None:
        """Index of the unit of document `doc` spanning first..last, or None (a unit of an
        earlier run with another --unit-pages, which is then done again)."""
        j = int(self.start[doc]) + ((first - 1) // self.unit_pages if first > 0 else 0)
        end = self.start[doc + 1] if doc + 1 < len(self.start) else len(self)
        if j < end and self.first[j] == first and self.last[j] == last:
            return j
        return None


def make_units(docs: Sequence[DocEntry], unit_pages: int) -> Units:
    """Split every document into units of at most unit_pages pages."""
    if unit_pages < 1:
        raise ValueError(f"unit_pages must be >= 1, got {unit_pages}")
    if hasattr(docs, "n_pages_array"):  # a DocTable: its columns, without per-row objects
        n_pages, ok = docs.n_pages_array(), docs.readable_array()
    else:
        n_pages = np.fromiter((d.n_pages for d in docs), dtype=np.int64, count=len(docs))
        ok = np.fromiter((d.error is None for d in docs), dtype=bool, count=len(docs))
    ok &= n_pages > 0
    count = np.where(ok, (n_pages + unit_pages - 1) // unit_pages, 1)
    start = np.cumsum(count) - count
    doc = np.repeat(np.arange(len(count), dtype=np.int64), count)
    k = np.arange(len(doc), dtype=np.int64) - start[doc]
    readable = ok[doc]
    first = np.where(readable, k * unit_pages + 1, 0)
    last = np.where(readable, np.minimum(first + unit_pages - 1, n_pages[doc]), 0)
    return Units(doc, first, last, start, unit_pages)
