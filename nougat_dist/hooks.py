"""The two places a test may reach into a run, both named by an environment variable.

A hook's value is `module:callable[:ARGS]`. The process imports `module` (from its own sys.path:
the tests' `testing/` package sits at the checkout's root, beside launch.py), calls
`callable(ARGS)` (`callable()` without ARGS) once per process and value, and uses what it returns.
Unset, a run is the product's own. The hooks:

- `NOUGAT_DIST_MODEL` (ocr/model.py): returns the `ModelSource` a rank runs instead of the Nougat
  checkpoint, e.g. `testing.fake_model:source:delay=0.05` (a model that sleeps per page).
- `NOUGAT_DIST_FAULT` (faults.py): returns the function called at every fault point, e.g.
  `testing.faults:points:commit:2` (SIGKILL at the second chunk commit).
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

from nougat_dist.errors import SetupError


def from_env(env: str) -> Any | None:
    """What the hook named by $`env` returns (made once per process and value), or None if unset."""
    value = os.environ.get(env)
    return _make(env, value) if value else None


@functools.lru_cache(maxsize=None)
def _make(env: str, value: str) -> Any:
    module_name, sep, rest = value.partition(":")
    name, _, args = rest.partition(":")
    if not sep or not module_name or not name:
        raise SetupError(f"${env}={value!r}: expected module:callable[:ARGS] (or unset it)")
    try:
        factory = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise SetupError(f"${env}={value!r}: cannot load {module_name}:{name} ({e}); run from the "
                         "checkout (its root on sys.path), or unset it") from e
    return factory(args) if args else factory()
