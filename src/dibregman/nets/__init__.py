"""Backbones we own or wrap; ``build_backbone`` rebuilds one from the ``arch`` saved beside its weights."""

from __future__ import annotations

from typing import Any

from torch import nn

KINDS = ("mlp", "unet")


def build_backbone(arch: dict[str, Any]) -> nn.Module:
    kind = arch.get("kind", "mlp") if isinstance(arch, dict) else None
    if kind == "mlp":
        from .mlp import MLP

        return MLP.from_arch(arch)
    if kind == "unet":
        from .unet import UNet

        return UNet.from_arch(arch)
    raise ValueError(f"unknown network kind {kind!r}; this version builds {', '.join(KINDS)}")


def arch_of(backbone: nn.Module) -> dict[str, Any]:
    """``arch`` with its kind, as saved beside weights."""
    from .mlp import MLP

    return {"kind": "mlp" if isinstance(backbone, MLP) else "unet", **backbone.arch()}
