"""The critic: a noise-conditioned classifier whose logit estimates ``log p_sigma / q_sigma``.

Convention, in one place: the logit ``l`` says "from the teacher", so ``log r = log q/p = -l``.
"""

from __future__ import annotations

import torch
from torch import nn

from .precond import append_dims

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
