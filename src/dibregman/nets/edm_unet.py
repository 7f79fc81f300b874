"""EDM's DDPM++ / NCSN++ U-Net (``SongUNet`` in NVlabs/edm ``training/networks.py``), written anew so that EDM
network snapshots load into it by state-dict key.

Every submodule, parameter and buffer carries EDM's name and shape (``map_layer0.weight``,
``enc.32x32_block0.conv0.weight``, ``dec.16x16_up.skip.resample_filter``...), the constructor takes EDM's
keyword arguments (what a snapshot records as the network's ``init_kwargs``) and the forward pass computes
EDM's (tests/test_edm_import.py compares it with outputs of NVlabs/edm's own code). The class names of the
layers are EDM's too: the importer checks each pickled layer against ours by class name and attributes.

Behind our backbone interface ``F(x, c_noise, cond)``: ``cond`` is integer labels ``[B]`` (EDM's one-hot
vectors; the label ``label_dim`` is "no label", EDM's all-zero vector, as in our other image backbones),
label vectors ``[B, label_dim]`` as EDM takes them, or None (all-zero). EDM's augmentation conditioning
(``augment_dim``) is zero when sampling, so ``map_augment`` is kept for its weights and never applied.
Only the random initialisation differs from EDM's: weights are meant to be loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .arch import from_arch

Tensor = torch.Tensor

KIND = "edm_songunet"
EMBEDDINGS = ("positional", "fourier")  # DDPM++, NCSN++
ENCODERS = ("standard", "skip", "residual")
DECODERS = ("standard", "skip")


def _filter(taps: Sequence[float]) -> Tensor:
    """The separable resampling kernel ``[1, 1, k, k]`` of 1-D taps, normalised to sum to 1."""
    f = torch.as_tensor([float(t) for t in taps], dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(max(in_features, 1)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    """A convolution (``kernel`` 0: none) with optional 2x up- or downsampling by a fixed FIR filter.

    ``fused_resample`` folds the resampling into the convolution's padding, as EDM's NCSN++ residual encoder
    does; it changes the border handling, so it is part of the architecture, not an optimisation."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False):
        if up and down:
            raise ValueError("a Conv2d resamples up or down, not both")
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fan_in = in_channels * kernel * kernel
        self.weight = (nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel) / math.sqrt(max(fan_in, 1)))
                       if kernel else None)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        self.register_buffer("resample_filter", _filter(resample_filter) if up or down else None)

    def _resample(self, x: Tensor, f: Tensor, channels: int, padding: int) -> Tensor:
        if self.up:  # transposed depthwise filter, stride 2; x4 keeps the mean of a 2x2-upsampled image
            return F.conv_transpose2d(x, (4 * f).tile(channels, 1, 1, 1), groups=channels, stride=2, padding=padding)
        return F.conv2d(x, f.tile(channels, 1, 1, 1), groups=channels, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if f is not None and w is not None and self.fused_resample:
            if self.up:  # upsample with both paddings, then an unpadded convolution
                x = F.conv2d(self._resample(x, f, self.in_channels, w_pad + f_pad), w)
            else:  # convolve with both paddings, then downsample unpadded
                x = self._resample(F.conv2d(x, w, padding=w_pad + f_pad), f, self.out_channels, 0)
        else:
            if f is not None:
                x = self._resample(x, f, self.in_channels, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        return x if self.bias is None else x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)


class GroupNorm(nn.Module):
    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)  # small layers: >= 4 per group
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Pre-activation residual block conditioned on the embedding, optionally resampling, optionally
    followed by multi-head self-attention (each branch scaled by ``skip_scale``)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:  # a 1x1 projection only where channels change (or asked)
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if not self.num_heads:
            return h
        b, c = h.shape[:2]
        # EDM's channel layout of qkv: [head, channel within head, (q, k, v)]; the weights depend on it
        q, k, v = self.qkv(self.norm2(h)).reshape(b * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
        logits = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(k.shape[1]))
        w = logits.softmax(dim=2).to(q.dtype)  # softmax in float32 whatever the activations' dtype
        a = torch.einsum("nqk,nck->ncq", w, v)
        return (self.proj(a.reshape(h.shape)) + h) * self.skip_scale


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar (DDPM++): ``[cos(x f_i), sin(x f_i)]``, geometric frequencies."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        angles = torch.outer(x, ((1 / self.max_positions) ** exponents).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (NCSN++): fixed Gaussian frequencies, stored as a buffer."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class SongUNet(nn.Module):
    """EDM's reimplementation of the DDPM++ (``embedding_type='positional'``, standard encoder) and NCSN++
    (``'fourier'``, ``encoder_type='residual'``, ``resample_filter=[1, 3, 3, 1]``) U-Nets of Song et al.

    Arguments and defaults are EDM's; EDM's CIFAR-10 networks use ``model_channels=128``,
    ``channel_mult=[2, 2, 2]``, ``augment_dim=9``, ``dropout=0.13`` and the defaults otherwise."""

    arch_kind = KIND  # its name in BACKBONES and in a saved arch

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        choices = (("embedding_type", embedding_type, EMBEDDINGS), ("encoder_type", encoder_type, ENCODERS),
                   ("decoder_type", decoder_type, DECODERS))
        for name, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        mult = [int(m) for m in channel_mult]
        if not mult or img_resolution % 2 ** (len(mult) - 1):
            raise ValueError(f"img_resolution {img_resolution} must be divisible by 2^{len(mult) - 1} "
                             f"for {len(mult)} levels (channel_mult {mult})")
        super().__init__()
        self._arch: dict[str, Any] = {
            "img_resolution": int(img_resolution), "in_channels": int(in_channels), "out_channels": int(out_channels),
            "label_dim": int(label_dim), "augment_dim": int(augment_dim), "model_channels": int(model_channels),
            "channel_mult": mult, "channel_mult_emb": int(channel_mult_emb), "num_blocks": int(num_blocks),
            "attn_resolutions": [int(r) for r in attn_resolutions], "dropout": float(dropout),
            "label_dropout": float(label_dropout), "embedding_type": embedding_type,
            "channel_mult_noise": int(channel_mult_noise), "encoder_type": encoder_type,
            "decoder_type": decoder_type, "resample_filter": [float(t) for t in resample_filter]}
        # what our training code reads from an image backbone
        self.channels, self.resolution, self.num_classes = int(in_channels), int(img_resolution), int(label_dim)
        self.feature_channels = int(model_channels) * mult[-1]
        self.label_dim, self.label_dropout = int(label_dim), float(label_dropout)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = {"emb_channels": emb_channels, "num_heads": 1, "dropout": float(dropout), "skip_scale": math.sqrt(0.5),
                 "eps": 1e-6, "resample_filter": resample_filter, "resample_proj": True, "adaptive_scale": False}

        # mapping network: noise level (+ label, + augmentation) -> embedding
        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        # encoder; module names (and their order, which forward follows) are EDM's
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, m in enumerate(mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, fused_resample=True,
                                                                   resample_filter=resample_filter)
                    caux = cout
            for i in range(num_blocks):
                cin, cout = cout, model_channels * m
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]

        # decoder: two blocks at the bottom, then per level an upsampling block and num_blocks + 1 blocks that
        # each take one skip connection
        self.dec = nn.ModuleDict()
        for level, m in reversed(list(enumerate(mult))):
            res = img_resolution >> level
            if level == len(mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * m
                attn = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3)

    @classmethod
    def from_arch(cls, arch: dict[str, Any]) -> SongUNet:
        """Rebuild from ``arch()`` (or EDM's init kwargs); bad entries raise a ValueError naming them."""
        return from_arch(cls, arch, KIND)

    def arch(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in self._arch.items()}

    def _labels(self, cond: Tensor | None, batch: int, like: Tensor) -> Tensor | None:
        if not self.label_dim:
            if cond is not None:
                raise ValueError("this network is unconditional; do not pass cond")
            return None
        if cond is None:
            return like.new_zeros(batch, self.label_dim)
        if cond.ndim == 2 and cond.shape[1] == self.label_dim:  # label vectors, as EDM takes them
            return cond.to(like.dtype)
        if cond.ndim != 1 or (cond.is_floating_point() and not torch.equal(cond, cond.round())):
            raise ValueError(f"cond must be integer labels [B] in 0..{self.label_dim} ({self.label_dim}: no label) "
                             f"or label vectors [B, {self.label_dim}]; got shape {list(cond.shape)}")
        # label_dim is "no label": the extra one-hot column is cut off, leaving EDM's all-zero vector
        return F.one_hot(cond.long(), self.label_dim + 1)[:, :self.label_dim].to(like.dtype)

    def _embedding(self, x: Tensor, c_noise: Tensor, cond: Tensor | None) -> Tensor:
        batch = x.shape[0]
        emb = self.map_noise(c_noise.to(x.dtype).reshape(-1).expand(batch))
        emb = emb.reshape(batch, 2, -1).flip(1).reshape(batch, -1)  # [sin, cos], the order EDM trained with
        labels = self._labels(cond, batch, x)
        if labels is not None:
            if self.training and self.label_dropout:  # classifier-free guidance training, as in EDM
                labels = labels * (torch.rand(batch, 1, device=x.device) >= self.label_dropout).to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def _encode(self, x: Tensor, emb: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips: list[Tensor] = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        return x, skips

    def features(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        """Bottleneck activations ``[B, feature_channels, h, w]``: the encoder and the two lowest-resolution
        decoder blocks (``*_in0``, ``*_in1``), which take no skip connection."""
        emb = self._embedding(x, c_noise, cond)
        h, _ = self._encode(x, emb)
        for name, block in self.dec.items():
            if not name.endswith(("_in0", "_in1")):
                break
            h = block(h, emb)
        return h

    def forward(self, x: Tensor, c_noise: Tensor, cond: Tensor | None = None) -> Tensor:
        emb = self._embedding(x, c_noise, cond)
        h, skips = self._encode(x, emb)
        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(h)
            elif "aux_conv" in name:  # an output head; with decoder_type 'skip' one per level, summed up
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if h.shape[1] != block.in_channels:
                    h = torch.cat([h, skips.pop()], dim=1)
                h = block(h, emb)
        return aux
