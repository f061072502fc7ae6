"""Command-line flags from an options dataclass (one flag per field, its declared help)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence

import pyarrow as pa

from nougat_dist.flags import help_of


def columns(table: pa.Table, names: Sequence[str]) -> list[list]:
    """The named columns of a table as Python lists."""
    return [table.column(n).to_pylist() for n in names]


def add_option_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per field of the dataclass cls, with its default and its help (flags.option)."""
    for f in dataclasses.fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
                            default=f.default, help=f"{help_of(f)} (default: {f.default})")


def options_from_args(args: argparse.Namespace, cls: type):
    """The options dataclass `cls` from the flags `add_option_flags` added for it."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
