"""Command-line flags declared on dataclass fields: each field carries its own `--help` text.

Both the job's `Config` and the post stages' option classes declare their fields with `option`,
and their parsers read the text back with `help_of`, so a flag and its help live side by side.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field whose `--help` text is `help`."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={"help": help})


def help_of(f: dataclasses.Field) -> str:
    """The `--help` text a field was declared with (empty when it has none)."""
    return str(f.metadata.get("help", ""))
