"""The plan's compact forms: units as arrays, documents as an Arrow buffer sent to every rank."""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest

from nougat_dist.store.manifest import (MANIFEST_SCHEMA, DocEntry, DocTable, Unit, make_units,
                                  parse_unit_key, unit_key)


def entries(n: int, seed: int) -> list[DocEntry]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        h = f"{rng.getrandbits(256):064x}"
        kind = rng.random()
        if kind < 0.1:
            out.append(DocEntry(h, f"/data/bad{i}.pdf", None, 0, 10, h, "damaged PDF (x)"))
        elif kind < 0.15:
            out.append(DocEntry(h, "/data/books.rar", f"vol{i}.pdf", rng.randint(40, 90), 999, h))
        else:
            out.append(DocEntry(h, f"/data/p{i}.pdf", None, rng.randint(1, 20), 1000 + i, h))
    return out


def naive_units(docs: list[DocEntry], unit_pages: int) -> list[Unit]:
    units = []
    for i, d in enumerate(docs):
        if d.error is not None or d.n_pages == 0:
            units.append(Unit(i, 0, 0))
            continue
        for first in range(1, d.n_pages + 1, unit_pages):
            units.append(Unit(i, first, min(first + unit_pages - 1, d.n_pages)))
    return units


def test_manifest_columns_are_docentry_fields_in_order():
    # manifest.load and DocTable build DocEntry positionally from these columns.
    names = [f.name for f in dataclasses.fields(DocEntry)]
    assert MANIFEST_SCHEMA.names == names
    # A DocTable's entries hold the leading core columns (no per-page metadata lists).
    assert list(DocTable.COLUMNS) == names[:len(DocTable.COLUMNS)]
    assert "location" in DocTable.COLUMNS and "page_width" not in DocTable.COLUMNS


@pytest.mark.parametrize("unit_pages", [1, 3, 16])
def test_units_match_the_page_by_page_split(unit_pages):
    docs = entries(300, seed=unit_pages)
    units = make_units(docs, unit_pages)
    expected = naive_units(docs, unit_pages)
    assert list(units) == expected
    assert [units[i] for i in range(len(units))] == expected
    assert units.n_pages.tolist() == [u.n_pages for u in expected]
    assert sum(u.n_pages for u in expected) == sum(d.n_pages if d.error is None else 1 for d in docs)


def test_a_unit_is_found_from_its_key_and_a_foreign_span_is_not():
    docs = entries(200, seed=1)
    units = make_units(docs, 4)
    for j, u in enumerate(units):
        doc_id, first, last = parse_unit_key(unit_key(docs[u.doc].doc_id, u.first, u.last))
        assert doc_id == docs[u.doc].doc_id
        assert units.find(u.doc, first, last) == j
    long_doc = next(i for i, d in enumerate(docs) if d.error is None and d.n_pages > 8)
    # spans of a run with another --unit-pages are not this run's units: they are done again
    assert units.find(long_doc, 1, 8) is None
    assert units.find(long_doc, 3, 6) is None
    assert units.find(long_doc, 1, 4) is not None


def test_doc_table_round_trips_through_bytes():
    docs = entries(500, seed=2)
    table = DocTable.from_bytes(pickle.loads(pickle.dumps(DocTable.from_entries(docs).to_bytes())))
    assert len(table) == len(docs)
    assert list(table) == docs
    assert table[0] == docs[0] and table[-1] == docs[-1] and table[123] == docs[123]
    with pytest.raises(IndexError):
        table[len(docs)]
    assert list(make_units(table, 5)) == list(make_units(docs, 5))


def test_empty_inputs_make_no_units():
    assert len(make_units([], 4)) == 0
    assert len(DocTable.from_bytes(DocTable.from_entries([]).to_bytes())) == 0


def test_manifest_round_trip_and_duplicates_as_a_table(tmp_path):
    from nougat_dist.store import manifest

    docs = entries(50, seed=3)
    rows = docs + [dataclasses.replace(docs[7], source="/data/copy.pdf"), docs[2]]
    written = manifest.write(tmp_path, rows)
    loaded = manifest.load(tmp_path)
    assert list(loaded) == list(written) == rows
    unique = manifest.unique_docs(loaded)
    assert isinstance(unique, DocTable) and list(unique) == manifest.unique_docs(rows) == docs
    table = DocTable.from_entries(docs)
    assert manifest.unique_docs(table) is table  # nothing to drop: no copy
    assert list(make_units(unique, 4)) == list(make_units(docs, 4))
