"""The pieces of a restricted unpickler shared by the readers of foreign pickles (CIFAR-10 batches in
``data/images.py``, EDM network snapshots in ``teachers/edm.py``): the only callables they may name besides
their own, and the error for anything else. Nothing here imports or calls what a pickle names."""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from typing import Any


def numpy_globals() -> dict[str, Callable[..., Any]]:
    """The callables numpy's own array pickles name, under numpy 1 or 2 module paths."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar, "_frombuffer": numeric._frombuffer}


def latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 pickles bytes as under protocol <= 2 (``_codecs.encode(text, 'latin1')``), and nothing more."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


class UnsafePickleError(ValueError):
    """A pickle names a global outside the allowed few; nothing it names has been imported or called."""
