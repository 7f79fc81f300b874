"""EDM preconditioning as a wrapper: backbones never see noise conventions."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .schedules import EDMParameterisation, Parameterisation

Tensor = torch.Tensor


class Denoiser(Protocol):
    """``D(x_sigma, sigma, cond) -> x0_hat`` in the EDM convention (``x_sigma = x0 + sigma n``, ``sigma`` per sample
    or a scalar): what the samplers, the losses and the metrics call. Teachers, ``Precond`` and plain functions
    are denoisers."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor: ...


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Broadcast a per-sample vector ``[B]`` against a batch of rank ``ndim``."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's lambda(sigma) = 1 / c_out^2, which makes the denoising loss of an x0 estimate unit-scaled."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class Precond(nn.Module):
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, cond)`` (Karras et al. 2022, table 1).

    ``backbone(x, c_noise, cond)`` is any network mapping inputs of the data's shape to the same shape. The four
    coefficients come from ``parameterisation`` (``schedules.py``): EDM's own by default; a diffusers model's VP
    or flow convention for ``DiffusersDenoiser``, which only changes how its backbone is called.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, parameterisation: Parameterisation | None = None):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)
        self.parameterisation = parameterisation or EDMParameterisation(self.sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` at ``sigma``, in its dtype."""
        return self.parameterisation.coefficients(sigma, sigma.dtype)

    def _prepare(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The coefficients at a scalar or per-sample ``sigma``, shaped to broadcast against ``x``."""
        sigma = torch.as_tensor(sigma, dtype=None if torch.is_tensor(sigma) else x.dtype, device=x.device)
        c_skip, c_out, c_in, c_noise = self.parameterisation.coefficients(sigma.expand(x.shape[0]), x.dtype)
        nd = x.ndim
        return append_dims(c_skip, nd), append_dims(c_out, nd), append_dims(c_in, nd), c_noise

    def _network(self, x_in: Tensor, c_noise: Tensor, cond: Tensor | None) -> Tensor:
        """``F``: the backbone, called in its own conventions (a subclass adapts dtypes and conditions here)."""
        return self.backbone(x_in, c_noise, cond)

    def _network_features(self, x_in: Tensor, c_noise: Tensor, cond: Tensor | None) -> Tensor:
        return self.backbone.features(x_in, c_noise, cond)

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        c_skip, c_out, c_in, c_noise = self._prepare(x, sigma)
        return c_skip * x + c_out * self._network(c_in * x, c_noise, cond)

    def from_pure_noise(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        """``lim D(sigma z, sigma)`` as ``sigma -> inf`` for unit noise ``z``: a flow model at ``t = 1``. Raises
        ValueError for a convention without that limit (``Parameterisation.at_pure_noise``)."""
        limit = self.parameterisation.at_pure_noise()
        if limit is None:
            raise ValueError(f"a {self.parameterisation.kind} denoiser has no limit at infinite noise; only a flow "
                             "model starts from pure noise (sigma_g = inf)")
        a, c_out, b, c_noise = limit
        t = torch.full((z.shape[0],), c_noise, dtype=torch.float32, device=z.device)
        return a * z + c_out * self._network(b * z, t, cond)

    def forward_with_features(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(D(x, sigma), features(x, sigma))`` in one pass where the backbone computes both at once
        (``forward_features``: its features are a prefix of its forward), else in two calls."""
        both = getattr(self.backbone, "forward_features", None)
        if both is None or type(self)._network is not Precond._network:
            return self(x, sigma, cond), self.features(x, sigma, cond)
        c_skip, c_out, c_in, c_noise = self._prepare(x, sigma)
        out, feats = both(c_in * x, c_noise, cond)
        return c_skip * x + c_out * out, feats

    def features(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """The backbone's internal features at ``(x, sigma)`` (what critic heads read), same input scaling."""
        _, _, c_in, c_noise = self._prepare(x, sigma)
        return self._network_features(c_in * x, c_noise, cond)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """EDM's lambda(sigma) = 1 / c_out^2, which makes the denoising loss unit-scaled."""
        return edm_loss_weight(sigma, self.sigma_data)
