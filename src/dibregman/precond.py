"""EDM preconditioning as a wrapper: backbones never see noise conventions."""

from __future__ import annotations

import torch
from torch import nn

Tensor = torch.Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Broadcast a per-sample vector ``[B]`` against a batch of rank ``ndim``."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's lambda(sigma) = 1 / c_out^2, which makes the denoising loss of an x0 estimate unit-scaled."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class Precond(nn.Module):
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, cond)`` (Karras et al. 2022, table 1).

    ``backbone(x, c_noise, cond)`` is any network mapping inputs of the data's shape to the same shape.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        nd = x.ndim
        out = self.backbone(append_dims(c_in, nd) * x, c_noise, cond)
        return append_dims(c_skip, nd) * x + append_dims(c_out, nd) * out

    def forward_with_features(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(D(x, sigma), features(x, sigma))`` in one pass where the backbone computes both at once
        (``forward_features``: its features are a prefix of its forward), else in two calls."""
        both = getattr(self.backbone, "forward_features", None)
        if both is None:
            return self(x, sigma, cond), self.features(x, sigma, cond)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        nd = x.ndim
        out, feats = both(append_dims(c_in, nd) * x, c_noise, cond)
        return append_dims(c_skip, nd) * x + append_dims(c_out, nd) * out, feats

    def features(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """The backbone's internal features at ``(x, sigma)`` (what critic heads read), same input scaling."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        _, _, c_in, c_noise = self.coefficients(sigma)
        return self.backbone.features(append_dims(c_in, x.ndim) * x, c_noise, cond)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """EDM's lambda(sigma) = 1 / c_out^2, which makes the denoising loss unit-scaled."""
        return edm_loss_weight(sigma, self.sigma_data)
