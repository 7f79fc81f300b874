"""A text-conditional image backbone: diffusers' ``UNet2DConditionModel`` behind ``F(x, c_noise, cond)``.

``cond`` is a text encoder's hidden states ``[B, L, D]`` (``text/encoder.py``), read two ways, as in
SDXL: cross-attention at the coarser levels, and their mean over tokens added to the time embedding
(a global signal that a 28x28 network picks up in few steps). ``cond=None`` is the empty condition,
all-zero hidden states: label dropout trains it and classifier-free guidance calls it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .arch import from_arch
from .unet import NOISE_SCALE

Tensor = torch.Tensor


def cond_unet_features(unet: nn.Module, x: Tensor, timestep: Tensor, hidden: Tensor,
                       class_labels: Tensor | None = None, added_cond_kwargs: dict | None = None) -> Tensor:
    """A ``UNet2DConditionModel``'s bottleneck: its forward's time/class embedding (and SDXL's added text and
    size embedding), down blocks and mid block, without the decoder (what critic heads read)."""
    emb = unet.time_embedding(unet.time_proj(timestep.reshape(-1).expand(x.shape[0])).to(x.dtype))
    if unet.class_embedding is not None:
        emb = emb + unet.class_embedding(class_labels).to(x.dtype)
    if added_cond_kwargs is not None:
        emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=added_cond_kwargs)
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=hidden)
        else:
            h, _ = block(hidden_states=h, temb=emb)
    if unet.mid_block is None:
        return h
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(h, emb, encoder_hidden_states=hidden)
    return unet.mid_block(h, emb)


class TextUNet(nn.Module):
    arch_kind = "text_unet"  # its name in BACKBONES and in a saved arch

    def __init__(self, channels: int = 1, resolution: int = 28, base: int = 32, mult: tuple[int, ...] = (1, 2, 2),
                 layers_per_block: int = 1, text_dim: int = 384, text_length: int = 16, heads: int = 4,
                 attention_levels: int = 1, norm_groups: int = 8):
        super().__init__()
        from diffusers import UNet2DConditionModel

        mult = tuple(int(m) for m in mult)
        if not 1 <= attention_levels < len(mult):
            raise ValueError(f"attention_levels must be in [1, {len(mult) - 1}]: cross-attention runs on the coarsest "
                             f"levels, never at full resolution (the cost); got {attention_levels}")
        if resolution % 2 ** (len(mult) - 1):
            raise ValueError(f"resolution {resolution} must be divisible by 2^{len(mult) - 1} for {len(mult)} levels")
        self.channels, self.resolution, self.base, self.mult = channels, resolution, base, mult
        self.layers_per_block, self.text_dim, self.text_length = layers_per_block, text_dim, text_length
        self.heads, self.attention_levels, self.norm_groups = heads, attention_levels, norm_groups
        plain = len(mult) - attention_levels  # cross-attention (and its self-attention) on the coarse levels only
        self.unet = UNet2DConditionModel(
            sample_size=resolution, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(base * m for m in mult), layers_per_block=layers_per_block,
            down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attention_levels,
            up_block_types=("CrossAttnUpBlock2D",) * attention_levels + ("UpBlock2D",) * plain,
            cross_attention_dim=text_dim, attention_head_dim=heads, norm_num_groups=norm_groups,
            class_embed_type="projection", projection_class_embeddings_input_dim=text_dim)
        self.feature_channels = base * mult[-1]
        self.num_classes = 0  # conditioned on text, not labels

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> TextUNet:
        return from_arch(cls, arch, "text_unet")

    def arch(self) -> dict[str, Any]:
        return {"channels": self.channels, "resolution": self.resolution, "base": self.base, "mult": list(self.mult),
                "layers_per_block": self.layers_per_block, "text_dim": self.text_dim,
                "text_length": self.text_length, "heads": self.heads, "attention_levels": self.attention_levels,
                "norm_groups": self.norm_groups}

    def _inputs(self, x: Tensor, c_noise: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        shape = (x.shape[0], self.text_length, self.text_dim)
        if cond is None:
            cond = x.new_zeros(shape)
        elif tuple(cond.shape) != shape:
            raise ValueError(f"text condition of shape {tuple(cond.shape)}; this network takes {shape} "
                             "(text encoder hidden states padded to text_length tokens)")
        cond = cond.to(x.dtype)
        return NOISE_SCALE * c_noise.reshape(-1).expand(x.shape[0]), cond, cond.mean(1)

    def features(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        t, hidden, pooled = self._inputs(x, c_noise, cond)
        return cond_unet_features(self.unet, x, t, hidden, pooled)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        t, hidden, pooled = self._inputs(x, c_noise, cond)
        return self.unet(x, t, encoder_hidden_states=hidden, class_labels=pooled, return_dict=False)[0]
