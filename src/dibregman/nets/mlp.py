"""A small noise-conditioned MLP backbone for low-dimensional data (toy sets, analytic mixtures)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .arch import from_arch

Tensor = torch.Tensor


class SinusoidalEmbedding(nn.Module):
    """Fixed sinusoidal features of a scalar (EDM's c_noise); no parameters, no randomness."""

    def __init__(self, dim: int = 32, max_period: float = 1000.0):
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        # c_noise = log(sigma)/4 lives in about [-2, 1.2]; scale it so the slow frequencies vary too.
        arg = 100.0 * t.reshape(-1, 1) * self.freqs
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class MLP(nn.Module):
    """``F(x, c_noise, cond) -> [B, out_dim]``: residual SiLU blocks, noise (and class) embedding added
    to every block. ``out_dim`` defaults to the data dimension (a denoiser); a critic uses 1."""

    arch_kind = "mlp"  # its name in BACKBONES and in a saved arch

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, out_dim: int | None = None,
                 num_classes: int = 0, emb_dim: int = 32):
        super().__init__()
        self.dim, self.hidden, self.depth, self.num_classes, self.emb_dim = dim, hidden, depth, num_classes, emb_dim
        self.out_dim = dim if out_dim is None else out_dim
        self.embed = SinusoidalEmbedding(emb_dim)
        self.emb_proj = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes, hidden) if num_classes > 0 else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, self.out_dim))

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> MLP:
        """Rebuild from ``arch()`` (as saved beside weights); bad entries raise a ValueError naming them."""
        return from_arch(cls, arch, "mlp")

    def arch(self) -> dict:
        """Constructor arguments, saved beside the weights so a checkpoint can be rebuilt."""
        return {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "out_dim": self.out_dim,
                "num_classes": self.num_classes, "emb_dim": self.emb_dim}

    def features(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        emb = self.emb_proj(self.embed(c_noise))
        if self.class_emb is not None:
            if cond is None:
                raise ValueError("this network is class-conditional: pass cond (integer labels)")
            emb = emb + self.class_emb(cond)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(h + emb)
        return h

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.forward_features(x, c_noise, cond)[0]

    def forward_features(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The output and the features it was computed from (``Precond.forward_with_features``)."""
        h = self.features(x, c_noise, cond)
        out = self.out(h)
        return (out.reshape(x.shape) if self.out_dim == x[0].numel() else out), h
