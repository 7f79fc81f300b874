"""Transformer backbones of diffusers pipelines behind the same denoiser contract as the U-Nets.

``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5) takes two text conditions: the token states
``encoder_hidden_states [N, L, joint_dim]`` and the pooled CLIP projections ``pooled_projections [N, P]``. The
rest of the library carries one condition tensor per sample, so the pooled vector travels as ``ceil(P /
joint_dim)`` extra tokens at the end of the sequence (zero-padded): ``pack_text`` / ``unpack_text``. A
prompt table, the empty prompt for guidance and the critic's conditions are then the same tensors as for a
Stable Diffusion 1.x UNet.
"""

from __future__ import annotations

import math

import torch
from torch import nn

Tensor = torch.Tensor

TRANSFORMER_CLASSES = ("SD3Transformer2DModel",)


def pooled_tokens(pooled_dim: int, joint_dim: int) -> int:
    return math.ceil(pooled_dim / joint_dim)


def pack_text(hidden: Tensor, pooled: Tensor) -> Tensor:
    """``[N, L, D]`` token states and ``[N, P]`` pooled projections as one ``[N, L + ceil(P / D), D]`` tensor."""
    n, _, d = hidden.shape
    k = pooled_tokens(pooled.shape[1], d)
    tail = torch.zeros(n, k * d, dtype=hidden.dtype, device=hidden.device)
    tail[:, :pooled.shape[1]] = pooled.to(hidden.dtype)
    return torch.cat([hidden, tail.reshape(n, k, d)], 1)


def unpack_text(cond: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """The inverse of ``pack_text``: ``(hidden [N, L, D], pooled [N, P])``."""
    k = pooled_tokens(pooled_dim, cond.shape[2])
    return cond[:, :-k], cond[:, -k:].flatten(1)[:, :pooled_dim]


class DiffusersSD3(nn.Module):
    """An ``SD3Transformer2DModel`` called as ``F(x_t, timestep, cond)`` with ``cond`` from ``pack_text``, and
    ``features``: the image tokens after the middle joint block as a map ``[B, inner_dim, H/p, W/p]`` (what
    critic heads read). ``unet`` names the wrapped model, as in ``DiffusersUNet``: the training code enables
    gradient checkpointing and reads dtypes through it."""

    text = True
    num_classes = 0

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.unet = transformer
        cfg = transformer.config
        self.pooled_dim = int(cfg["pooled_projection_dim"])
        self.feature_channels = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        self.feature_block = len(transformer.transformer_blocks) // 2  # the middle one: both streams still there

    def forward(self, x_t: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        hidden, pooled = unpack_text(cond, self.pooled_dim)
        return self.unet(x_t, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=timestep,
                         return_dict=False)[0]

    def features(self, x_t: Tensor, timestep: Tensor, cond: Tensor | None = None) -> Tensor:
        """The first steps of ``SD3Transformer2DModel.forward`` (patch embedding, time and pooled-text embedding,
        context embedding, joint blocks up to ``feature_block``), the image tokens as a spatial map."""
        t, p = self.unet, int(self.unet.config["patch_size"])
        hidden, pooled = unpack_text(cond, self.pooled_dim)
        h, w = x_t.shape[-2] // p, x_t.shape[-1] // p
        x = t.pos_embed(x_t)
        temb = t.time_text_embed(timestep.expand(x_t.shape[0]), pooled)
        context = t.context_embedder(hidden)
        for block in t.transformer_blocks[: self.feature_block + 1]:
            context, x = block(hidden_states=x, encoder_hidden_states=context, temb=temb)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
