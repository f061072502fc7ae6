"""The end-of-job summary that says which inputs need a look: the documents with failed pages
(first few by name, all of them in a file), the inputs that were the same document as another one,
and what `--retry-failed` would do again.

Reads only the manifest and the committed chunks' doc_id/status columns, filtered to failed rows,
so it costs what the failures cost, not what the corpus costs.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from nougat_dist.store.finalize import FAILED_STATUSES
from nougat_dist.store.layout import OutputDir



@dataclass
class Report:
    """What the summary says, as data (the tests read it; `lines()` prints it)."""

    #: source (+ "!member") -> {status: pages}, documents with at least one failed page
    failed_docs: dict[str, dict[str, int]] = field(default_factory=dict)
    #: unreadable inputs: source -> reason (no page could be rendered)
    unreadable: dict[str, str] = field(default_factory=dict)
    #: duplicate inputs: the kept document's name -> the other names of the same bytes
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    failed_pages: int = 0

    def lines(self, out: Path, shown: int = 5) -> list[str]:
        msgs = []
        if self.failed_docs or self.unreadable:
            names = list(self.unreadable) + [n for n in self.failed_docs if n not in self.unreadable]
            head = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
            msgs.append(f"{len(names)} document(s) need a look ({self.failed_pages} failed page(s), "
                        f"{len(self.unreadable)} unreadable): {head}; all of them, with reasons: "
                        f"{OutputDir(out).failures}")
            msgs.append(f"`--retry-failed` on the same command would OCR the {self.failed_pages} "
                        f"failed page(s) again and inspect the {len(self.unreadable)} unreadable "
                        "input(s) again (e.g. after setting an archive password)")
        if self.duplicates:
            n = sum(len(v) for v in self.duplicates.values())
            pairs = [f"{', '.join(v)} = {k}" for k, v in list(self.duplicates.items())[:shown]]
            msgs.append(f"{n} input(s) are byte-identical to another input and were OCR'd once: "
                        + "; ".join(pairs) + (" ..." if len(self.duplicates) > shown else ""))
        return msgs


def _name(source: str, member: str | None) -> str:
    return source if member is None else f"{source}!{member}"


def build(out: Path) -> Report:
    """The report of an output dir, and the failures file written next to it (atomically)."""
    from nougat_dist.store.chunks import atomic_write_text

    layout = OutputDir(out)
    rep = Report()
    have = pq.read_schema(layout.manifest).names  # an earlier release's has no location
    manifest = pq.read_table(layout.manifest, columns=[c for c in (
        "doc_id", "source", "member", "error", "location") if c in have]).to_pylist()
    first: dict[str, str] = {}
    for row in manifest:
        # Named by the path read, so that it can be found here (`source` is relative).
        name = _name(row.get("location") or row["source"], row["member"])
        if row["error"] is not None:
            rep.unreadable[name] = row["error"]
        elif row["doc_id"] in first:
            rep.duplicates.setdefault(first[row["doc_id"]], []).append(name)
        else:
            first[row["doc_id"]] = name
    chunks = sorted(layout.pages.glob("*.parquet")) if layout.pages.is_dir() else []
    reasons: dict[str, list[dict]] = defaultdict(list)
    if chunks:
        table = ds.dataset([str(c) for c in chunks], format="parquet").to_table(
            columns=["doc_id", "page", "status", "error"],
            filter=pc.field("status").isin(list(FAILED_STATUSES)))
        per_doc: dict[str, Counter] = defaultdict(Counter)
        table = table.filter(pc.greater(table["page"], 0))  # page 0: an unreadable input's row
        for r in table.to_pylist():
            per_doc[r["doc_id"]][r["status"]] += 1
            reasons[r["doc_id"]].append({"page": r["page"], "status": r["status"], "error": r["error"]})
        rep.failed_pages = table.num_rows
        for doc_id, counts in per_doc.items():
            rep.failed_docs[first.get(doc_id, doc_id)] = dict(counts)
    lines = [json.dumps({"document": n, "unreadable": why}) for n, why in rep.unreadable.items()]
    by_name = {v: k for k, v in first.items()}
    for name in rep.failed_docs:
        pages = sorted(reasons[by_name.get(name, name)], key=lambda r: r["page"])
        lines.append(json.dumps({"document": name, "doc_id": by_name.get(name, name), "pages": pages}))
    path = layout.failures
    if lines:
        atomic_write_text("\n".join(lines) + "\n", path)
    elif path.exists():
        path.unlink()  # a retry fixed them all
    return rep
