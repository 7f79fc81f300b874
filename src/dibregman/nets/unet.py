"""An image backbone: diffusers' ``UNet2DModel`` behind our ``F(x, c_noise, cond)`` interface.

Why diffusers' U-Net rather than our own: it is the backbone users' checkpoints already use, it exports
as a diffusers folder as is, and it has gradient checkpointing. We add two things it lacks: the EDM noise
input (``c_noise = log(sigma) / 4``, scaled to the span of DDPM timesteps its sinusoidal embedding was
designed for) and ``features``, the bottleneck activations that critic heads read.

Class conditioning: ``num_classes`` labels plus one more, the "no label" class ``num_classes`` that
classifier-free guidance drops labels to.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .arch import from_arch

Tensor = torch.Tensor

NOISE_SCALE = 250.0  # c_noise in about [-1.6, 1.1] -> about [-400, 275], DDPM's timestep span


class UNet(nn.Module):
    arch_kind = "unet"  # its name in BACKBONES and in a saved arch

    def __init__(self, channels: int = 1, resolution: int = 28, base: int = 32, mult: tuple[int, ...] = (1, 2, 2),
                 layers_per_block: int = 1, attention: bool = False, num_classes: int = 0, norm_groups: int = 8,
                 dropout: float = 0.0):
        super().__init__()
        from diffusers import UNet2DModel

        mult = tuple(int(m) for m in mult)
        self.channels, self.resolution, self.base, self.mult = channels, resolution, base, mult
        self.layers_per_block, self.attention, self.num_classes = layers_per_block, attention, num_classes
        self.norm_groups, self.dropout = norm_groups, dropout
        if resolution % 2 ** (len(mult) - 1):
            raise ValueError(f"resolution {resolution} must be divisible by 2^{len(mult) - 1} for {len(mult)} levels")
        self.unet = UNet2DModel(
            sample_size=resolution, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(base * m for m in mult), layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * len(mult), up_block_types=("UpBlock2D",) * len(mult),
            add_attention=attention, norm_num_groups=norm_groups, dropout=dropout,
            num_class_embeds=num_classes + 1 if num_classes else None)
        self.feature_channels = base * mult[-1]

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> UNet:
        """Rebuild from ``arch()`` (as saved beside weights); bad entries raise a ValueError naming them."""
        return from_arch(cls, arch, "unet")

    def arch(self) -> dict[str, Any]:
        return {"channels": self.channels, "resolution": self.resolution, "base": self.base, "mult": list(self.mult),
                "layers_per_block": self.layers_per_block, "attention": self.attention,
                "num_classes": self.num_classes, "norm_groups": self.norm_groups, "dropout": self.dropout}

    def _labels(self, cond: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if not self.num_classes:
            if cond is not None:
                raise ValueError("this network is unconditional; do not pass cond")
            return None
        if cond is None:  # no label: the guidance-free class
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return cond.long()

    def _embedding(self, x: Tensor, c_noise: Tensor, cond: Tensor | None) -> Tensor:
        u = self.unet
        t_emb = u.time_proj((NOISE_SCALE * c_noise).reshape(-1).expand(x.shape[0])).to(x.dtype)
        emb = u.time_embedding(t_emb)
        labels = self._labels(cond, x.shape[0], x.device)
        return emb if labels is None else emb + u.class_embedding(labels).to(x.dtype)

    def _down(self, x: Tensor, emb: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        u = self.unet
        h = u.conv_in(x)
        skips: tuple[Tensor, ...] = (h,)
        for block in u.down_blocks:
            h, res = block(hidden_states=h, temb=emb)
            skips += res
        return u.mid_block(h, emb), skips

    def features(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        """Bottleneck activations ``[B, feature_channels, h, w]`` (the encoder half only)."""
        return self._down(x, self._embedding(x, c_noise, cond))[0]

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.forward_features(x, c_noise, cond)[0]

    def forward_features(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The output and the bottleneck features on the way (``Precond.forward_with_features``)."""
        u = self.unet
        emb = self._embedding(x, c_noise, cond)
        h, skips = self._down(x, emb)
        feats = h
        for block in u.up_blocks:
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            h = block(h, res, emb)
        return u.conv_out(u.conv_act(u.conv_norm_out(h))), feats
