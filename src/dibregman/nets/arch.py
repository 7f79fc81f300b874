"""Rebuilding a network from the ``arch`` dict saved beside its weights, with errors that name the entry."""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

T = TypeVar("T")


def from_arch(cls: type[T], arch: Any, kind: str) -> T:
    """``cls(**arch)`` without ``kind``; a wrong kind, unknown or bad arguments raise a ValueError."""
    if not isinstance(arch, dict):
        raise ValueError(f"arch must be a JSON object; got {type(arch).__name__}")
    if arch.get("kind", kind) != kind:
        raise ValueError(f"unknown network kind {arch.get('kind')!r}; this version builds {kind!r}")
    args = {k: v for k, v in arch.items() if k != "kind"}
    valid = set(inspect.signature(cls).parameters)
    unknown = sorted(args.keys() - valid)
    if unknown:
        raise ValueError(f"arch has unknown {cls.__name__} arguments {unknown}; valid: {sorted(valid)}")
    try:
        return cls(**args)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot build a {cls.__name__} from arch {arch} ({e})") from None
