"""Teachers from a spec string: ``gmm:<built-in name or .json/.toml>`` or ``net:<teacher folder>``."""

from __future__ import annotations

from pathlib import Path

from .base import Teacher

__all__ = ["Teacher", "load_teacher"]


def load_teacher(spec: str) -> Teacher:
    kind, _, arg = spec.partition(":")
    if kind == "gmm" and arg:
        from .gmm import get_mixture

        return get_mixture(arg)
    if kind == "net" and arg:
        from .trained import load_teacher as load_net

        return load_net(arg)
    if Path(spec).is_dir():  # a bare folder made by `dibregman train-teacher`
        from .trained import load_teacher as load_net

        return load_net(spec)
    raise ValueError(f"cannot read teacher spec {spec!r}: use 'gmm:<built-in or file.json>' (e.g. "
                     "gmm:ring8_imbalanced) or 'net:<folder written by dibregman train-teacher>'")
