"""Backbones we own or wrap; ``build_backbone`` rebuilds one from the ``arch`` saved beside its weights."""

from __future__ import annotations

from typing import Any

from torch import nn

KINDS = ("mlp", "unet", "text_unet", "edm_songunet")


def build_backbone(arch: dict[str, Any]) -> nn.Module:
    kind = arch.get("kind", "mlp") if isinstance(arch, dict) else None
    if kind == "mlp":
        from .mlp import MLP

        return MLP.from_arch(arch)
    if kind == "unet":
        from .unet import UNet

        return UNet.from_arch(arch)
    if kind == "text_unet":
        from .text_unet import TextUNet

        return TextUNet.from_arch(arch)
    if kind == "edm_songunet":  # EDM's DDPM++ / NCSN++ network, imported from an EDM snapshot
        from .edm_unet import SongUNet

        return SongUNet.from_arch(arch)
    raise ValueError(f"unknown network kind {kind!r}; this version builds {', '.join(KINDS)}")


def arch_of(backbone: nn.Module) -> dict[str, Any]:
    """``arch`` with its kind, as saved beside weights."""
    from .edm_unet import KIND as EDM_KIND
    from .edm_unet import SongUNet
    from .mlp import MLP
    from .text_unet import TextUNet

    kind = ("mlp" if isinstance(backbone, MLP) else EDM_KIND if isinstance(backbone, SongUNet)
            else "text_unet" if isinstance(backbone, TextUNet) else "unet")
    return {"kind": kind, **backbone.arch()}


def image_shape(arch: dict[str, Any]) -> list[int] | None:
    """``[C, H, W]`` of the images an image backbone's ``arch`` takes; None for a point (MLP) backbone."""
    if arch.get("kind") in ("unet", "text_unet"):
        res = arch.get("resolution", 28)
        return [arch.get("channels", 1), res, res]
    if arch.get("kind") == "edm_songunet":
        res = arch.get("img_resolution")
        return [arch.get("in_channels"), res, res]
    return None
