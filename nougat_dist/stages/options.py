"""Command-line flags from an options dataclass (one flag per field, its docstring as help)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from typing import Sequence

import pyarrow as pa


def columns(table: pa.Table, names: Sequence[str]) -> list[list]:
    """The named columns of a table as Python lists."""
    return [table.column(n).to_pylist() for n in names]


def add_option_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of the dataclass cls, with its default and its docstring."""
    for f in dataclasses.fields(cls):
        doc = _field_docs(cls).get(f.name, "")
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
                            default=f.default, help=f"{doc} (default: {f.default})")


def _field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)  # type: ignore[union-attr]
    return docs
