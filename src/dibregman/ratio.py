"""The critic: a noise-conditioned classifier whose logit estimates ``log p_sigma / q_sigma``.

Convention, in one place: the logit ``l`` says "from the teacher", so ``log r = log q/p = -l``.
"""

from __future__ import annotations

import torch
from torch import nn

from .precond import Precond, append_dims

Tensor = torch.Tensor


def log_r_from_logit(logit: Tensor) -> Tensor:
    return -logit


def logit_from_log_r(log_r: Tensor) -> Tensor:
    return -log_r


class Critic(nn.Module):
    """A standalone critic ``c(x_sigma, sigma, cond) -> logit [B]`` on any backbone with a scalar output.

    The input is scaled by EDM's ``c_in`` so that the backbone sees unit-variance inputs at every
    noise level, exactly as a denoiser backbone does.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    def forward(self, x_sigma: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x_sigma.dtype, device=x_sigma.device).expand(x_sigma.shape[0])
        c_in = append_dims((sigma**2 + self.sigma_data**2).rsqrt(), x_sigma.ndim)
        return self.backbone(c_in * x_sigma, sigma.log() / 4, cond).reshape(x_sigma.shape[0])


def feature_head(channels: int, spatial: bool) -> nn.Module:
    """A small head from features to one logit: conv + pooling on ``[B, C, h, w]``, an MLP on ``[B, C]``."""
    if spatial:
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(channels, 1))
    return nn.Sequential(nn.SiLU(), nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, 1))


class FeatureCritic(nn.Module):
    """A critic head on a denoiser's bottleneck features: the fake score's (DMD2) or the teacher's (FastGen).

    The feature network (unless ``train_encoder``) is not registered as a submodule: the critic's
    parameters, optimiser and checkpoint hold the head alone, and the critic loss never moves the network
    it reads (a fake score trained to classify as well would stop being the denoiser of the student's
    law). The encoder runs without autograd unless the input needs a gradient (the GAN term or the
    discriminator form) or it is the critic's own (``train_encoder``, a standalone image critic).
    """

    def __init__(self, encoder: Precond, head: nn.Module, train_encoder: bool = False):
        super().__init__()
        self.head = head
        self.train_encoder = train_encoder
        if train_encoder:  # a standalone critic: the encoder is its own, trained with the head
            self.encoder = encoder
        else:
            object.__setattr__(self, "encoder", encoder)  # a reference, not a submodule (see above)

    def forward(self, x_sigma: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        need_grad = self.train_encoder or x_sigma.requires_grad
        with torch.set_grad_enabled(torch.is_grad_enabled() and need_grad):
            feats = self.encoder.features(x_sigma, sigma, cond)
        return self.from_features(feats)

    def from_features(self, feats: Tensor) -> Tensor:
        """The logit from features of the encoder computed elsewhere (the generator update reads them from the
        fake score's own forward on the same input: one pass instead of two)."""
        return self.head(feats).reshape(feats.shape[0])

    def reads(self, net: nn.Module) -> bool:
        """Whether the logit is a head on ``net``'s features, untrained by the critic (so they can be shared)."""
        return not self.train_encoder and self.encoder is net
