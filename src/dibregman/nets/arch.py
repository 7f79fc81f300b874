"""Rebuilding a network from the ``arch`` dict saved beside its weights, with errors that name the entry."""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

T = TypeVar("T")

MAX_INT = 1 << 22  # any integer of an arch: widths, resolutions, a scheduler's number of timesteps
MAX_REPEATS = 256  # blocks per level or in all: each is a Python module, built even on the meta device
MAX_LEVELS = 16
REPEATS = ("depth", "layers_per_block", "num_blocks", "transformer_layers_per_block", "num_layers")
LEVELS = ("mult", "channel_mult", "block_out_channels", "down_block_types", "up_block_types")


def check_arch_size(arch: Any, where: str = "arch") -> None:
    """Refuse an ``arch`` (from a file: it may be hand-edited or damaged) whose numbers would take hours or
    gigabytes to build: a ``depth`` of 10**7 builds ten million modules even on the meta device."""
    if isinstance(arch, dict):
        for key, value in arch.items():
            name = f"{where}.{key}"
            if key in REPEATS and any(isinstance(v, int) and v > MAX_REPEATS for v in _ints(value)):
                raise ValueError(f"{name} must be at most {MAX_REPEATS}; got {value!r}")
            if key in LEVELS and isinstance(value, list | tuple) and len(value) > MAX_LEVELS:
                raise ValueError(f"{name} may list at most {MAX_LEVELS} levels; got {len(value)}")
            check_arch_size(value, name)
    elif isinstance(arch, list | tuple):
        for value in arch:
            check_arch_size(value, where)
    elif isinstance(arch, int) and not isinstance(arch, bool) and abs(arch) > MAX_INT:
        raise ValueError(f"{where} must be between -{MAX_INT} and {MAX_INT}; got {arch}")


def _ints(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def from_arch(cls: type[T], arch: Any, kind: str) -> T:
    """``cls(**arch)`` without ``kind``; a wrong kind, unknown or bad arguments raise a ValueError."""
    if not isinstance(arch, dict):
        raise ValueError(f"arch must be a JSON object; got {type(arch).__name__}")
    if arch.get("kind", kind) != kind:
        raise ValueError(f"unknown network kind {arch.get('kind')!r}; this version builds {kind!r}")
    check_arch_size(arch)
    args = {k: v for k, v in arch.items() if k != "kind"}
    valid = set(inspect.signature(cls).parameters)
    unknown = sorted(args.keys() - valid)
    if unknown:
        raise ValueError(f"arch has unknown {cls.__name__} arguments {unknown}; valid: {sorted(valid)}")
    try:
        return cls(**args)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot build a {cls.__name__} from arch {arch} ({e})") from None
