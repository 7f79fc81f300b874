"""Backbones we own or wrap, in ``BACKBONES``; ``build_backbone`` rebuilds one from the ``arch`` saved beside its
weights.

A backbone is a module ``F(x, c_noise, cond)`` mapping inputs of the data's shape to the same shape, with
``arch()`` (JSON-able constructor arguments), a class attribute ``arch_kind`` (its registered name) and, for
critic heads and the teacher-feature metrics, ``features(x, c_noise, cond)`` (and ``feature_channels`` on an image
backbone); ``forward_features`` where both come from one pass. Registering a class of your own (its
``from_arch``) lets teachers and students with it be saved, loaded and sampled like ours::

    BACKBONES.register("mine", Mine.from_arch, help="my backbone", image_shape=lambda arch: [3, 32, 32])
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..registry import Registry

BACKBONES = Registry("backbone")  # entries build one from its arch; meta image_shape: arch -> [C, H, W] or None


@runtime_checkable
class Backbone(Protocol):
    """What a ``Precond`` wraps: ``F(x, c_noise, cond)`` of ``x``'s shape, rebuilt from ``arch()`` by the
    ``BACKBONES`` entry named ``arch_kind``. Optional capabilities, read through the functions below:
    ``features`` (critic heads, teacher-feature metrics) with ``feature_channels`` (image features
    ``[B, C, h, w]``) or ``hidden`` (point features ``[B, hidden]``); ``forward_features`` (both in one pass);
    ``unet``, a diffusers model inside (gradient checkpointing)."""

    arch_kind: str

    def __call__(self, x: torch.Tensor, c_noise: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor: ...

    def arch(self) -> dict[str, Any]: ...


def feature_width(backbone: nn.Module) -> tuple[bool, int] | None:
    """``(spatial, width)`` of ``backbone.features``: image features have ``feature_channels`` channels, point
    features ``hidden`` values; None for a backbone without features."""
    if not callable(getattr(backbone, "features", None)):
        return None
    if hasattr(backbone, "feature_channels"):
        return True, int(backbone.feature_channels)
    return (False, int(backbone.hidden)) if hasattr(backbone, "hidden") else None


def checkpointable(backbone: nn.Module) -> bool:
    """Whether the backbone runs a diffusers model (``unet``) whose gradient checkpointing can be switched on."""
    return callable(getattr(getattr(backbone, "unet", None), "enable_gradient_checkpointing", None))


def _ours(module: str, name: str) -> Any:
    """``from_arch`` of one of our classes, imported when first built (the U-Nets import diffusers)."""

    def build(arch: dict[str, Any]) -> nn.Module:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{module}"), name).from_arch(arch)

    return build


def _unet_shape(arch: dict[str, Any]) -> list[int]:
    res = arch.get("resolution", 28)
    return [arch.get("channels", 1), res, res]


BACKBONES.register("mlp", _ours("mlp", "MLP"), help="a residual MLP for points", check=False)
BACKBONES.register("unet", _ours("unet", "UNet"), help="our class-conditional image U-Net, a diffusers UNet2DModel",
                   check=False, image_shape=_unet_shape)
BACKBONES.register("text_unet", _ours("text_unet", "TextUNet"), check=False, image_shape=_unet_shape,
                   help="our caption-conditional image U-Net, a diffusers UNet2DConditionModel")
BACKBONES.register("edm_songunet", _ours("edm_unet", "SongUNet"), check=False,
                   help="EDM's DDPM++ / NCSN++ network, imported from an EDM snapshot",
                   image_shape=lambda arch: [arch.get("in_channels"), arch.get("img_resolution"),
                                             arch.get("img_resolution")])


def build_backbone(arch: dict[str, Any]) -> nn.Module:
    kind = arch.get("kind", "mlp") if isinstance(arch, dict) else None
    if kind not in BACKBONES:
        raise ValueError(f"unknown network kind {kind!r}; this version builds {', '.join(BACKBONES)}")
    entry = BACKBONES.get(kind)
    net = entry.make(arch)
    if entry.check and not (isinstance(net, nn.Module) and callable(getattr(net, "arch", None))
                            and getattr(type(net), "arch_kind", None) == kind):
        raise TypeError(f"backbone {kind!r} built a {type(net).__name__}: it must be an nn.Module with arch() whose "
                        f"class has arch_kind = {kind!r}")
    return net


def registered(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is of a registered kind, so a network around it can be saved and rebuilt."""
    return getattr(type(backbone), "arch_kind", None) in BACKBONES


def arch_of(backbone: nn.Module) -> dict[str, Any]:
    """``arch`` with its kind, as saved beside weights."""
    if not registered(backbone):
        raise TypeError(f"{type(backbone).__name__} is not a registered backbone: give its class an arch_kind and "
                        f"register it in dibregman.nets.BACKBONES (registered: {', '.join(BACKBONES)})")
    return {"kind": type(backbone).arch_kind, **backbone.arch()}


def image_shape(arch: dict[str, Any]) -> list[int] | None:
    """``[C, H, W]`` of the images an image backbone's ``arch`` takes; None for a point (MLP) backbone."""
    kind = arch.get("kind")
    shape = BACKBONES.get(kind).meta.get("image_shape") if kind in BACKBONES else None
    return shape(arch) if shape is not None else None
