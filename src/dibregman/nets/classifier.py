"""A small image classifier: the project's own feature network for Frechet distance, KID, precision/recall
and label adherence (saving, loading and training: ``train/classifier.py``).

Why our own rather than Inception: it runs on 10k samples in every evaluation on a CPU, so it must take
seconds, and it is trained on the images being generated (28x28 grey Fashion-MNIST, far from ImageNet).

Design: three stages of ``depth`` x ``conv3x3 -> GroupNorm -> SiLU`` (widths ``width * (1, 2, 4)``), a
2x2 average pool after the first two, global average pooling, a linear layer to ``feature_dim`` + SiLU
(``features``, what FD reads), and a linear layer to the logits. GroupNorm rather than BatchNorm: with no
running statistics an image's features depend on that image alone, not on its batch or on train/eval mode.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .arch import from_arch

Tensor = torch.Tensor


def _groups(channels: int) -> int:
    # 8 groups where they divide (the usual choice for small convnets); else the largest divisor below 8.
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class Classifier(nn.Module):
    """``forward(x) -> logits [B, num_classes]``, ``features(x) -> [B, feature_dim]`` for images
    ``[B, channels, resolution, resolution]`` in [-1, 1]. Stage widths are ``width * (1, 2, 4)``."""

    def __init__(self, channels: int = 1, resolution: int = 28, num_classes: int = 10, width: int = 32,
                 feature_dim: int = 128, depth: int = 1):
        super().__init__()
        for name, value in (("channels", channels), ("resolution", resolution), ("num_classes", num_classes),
                            ("width", width), ("feature_dim", feature_dim), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2; got {num_classes}")
        if resolution < 4:
            raise ValueError(f"resolution must be at least 4 (two 2x poolings); got {resolution}")
        self.channels, self.resolution, self.num_classes = channels, resolution, num_classes
        self.width, self.feature_dim, self.depth = width, feature_dim, depth
        widths = (width, 2 * width, 4 * width)
        stages, c_in = [], channels
        for c in widths:
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU()]
                c_in = c
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.feature = nn.Linear(widths[-1], feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> Classifier:
        """Rebuild from ``arch()`` (as saved beside weights); bad entries raise a ValueError naming them."""
        return from_arch(cls, arch, "classifier")

    def arch(self) -> dict[str, Any]:
        """Constructor arguments (with ``kind``), saved beside the weights so a folder can be rebuilt."""
        return {"kind": "classifier", "channels": self.channels, "resolution": self.resolution,
                "num_classes": self.num_classes, "width": self.width, "feature_dim": self.feature_dim,
                "depth": self.depth}

    def _check(self, x: Tensor) -> None:
        expected = (self.channels, self.resolution, self.resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"the classifier expects images [B, {', '.join(map(str, expected))}]; "
                             f"got {list(x.shape)}")

    def features(self, x: Tensor) -> Tensor:
        """The penultimate layer ``[B, feature_dim]`` (what Frechet distance and KID compare)."""
        self._check(x)
        h = x
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i < len(self.stages) - 1:
                h = F.avg_pool2d(h, 2, ceil_mode=True)  # ceil: odd sizes (7 -> 4) keep their border pixels
        return F.silu(self.feature(h.mean(dim=(2, 3))))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
