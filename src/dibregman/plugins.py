"""The user's code: named by a spec string ``py:<module>:<function>`` (a divergence's convex ``h``, a function
that builds a teacher), imported as ``python -m`` would find it, from the working directory too; or
registered in a ``Registry`` (``registry.py``) of a plug-in point under a name of its own."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """The function ``py:<module>:<function>`` names; a ``ValueError`` naming ``what`` it should be otherwise.
    The working directory is on the import path only for this import: the caller's ``sys.path`` is kept."""
    module, _, name = spec.removeprefix("py:").rpartition(":")
    if not spec.startswith("py:") or not module or not name:
        raise ValueError(f"{what} from your own code is 'py:<module>:<function>'; got {spec!r}")
    added = "" not in sys.path
    if added:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {what} {spec!r}: {e}") from None
    finally:
        if added:
            sys.path.remove("")
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable; it must be {what}")
    return fn
