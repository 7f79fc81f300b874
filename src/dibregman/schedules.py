"""Noise conventions and sigma samplers.

One internal convention (EDM): ``x_sigma = x0 + sigma * n``. Other parameterisations are converted at
the edge with the pure functions below (docs/concepts.md, "Noise convention"); nothing inside the math sees them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

# --- conversions (each has its inverse; tests round-trip them) -----------------------------------


def vp_sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """DDPM / VP: ``x_t = sqrt(ab) x0 + sqrt(1-ab) n``  <->  EDM sigma = sqrt((1-ab)/ab)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def vp_alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    return 1 / (1 + sigma**2)


def vp_input_from_x_sigma(x_sigma: Tensor, sigma: Tensor) -> Tensor:
    """The VP model's input ``x_t = x_sigma / sqrt(1 + sigma^2)``."""
    return x_sigma / (1 + sigma**2).sqrt()


def flow_sigma_from_t(t: Tensor) -> Tensor:
    """Rectified flow ``x_t = (1-t) x0 + t n``  <->  sigma = t / (1-t)."""
    return t / (1 - t)


def flow_t_from_sigma(sigma: Tensor) -> Tensor:
    return sigma / (1 + sigma)


def flow_input_from_x_sigma(x_sigma: Tensor, sigma: Tensor) -> Tensor:
    return x_sigma / (1 + sigma)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's sampling grid, ``n`` sigmas from sigma_max down to sigma_min, then a final 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])


# --- sigma samplers for training ------------------------------------------------------------------

SigmaSampler = Callable[[int, torch.Generator | None], Tensor]


@dataclass(frozen=True)
class LogNormal:
    """EDM training distribution: ``log sigma ~ N(p_mean, p_std^2)``."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return (self.p_mean + self.p_std * torch.randn(n, generator=generator)).exp()


@dataclass(frozen=True)
class KarrasUniform:
    """``t ~ U[t_min, t_max]`` on EDM's rho-warped sigma axis (DMD samples its timestep uniformly
    in a range; this is the same idea on the continuous Karras axis)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    t_min: float = 0.02
    t_max: float = 0.98
    rho: float = 7.0

    def __call__(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(n, generator=generator)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (hi + t * (lo - hi)) ** self.rho


@dataclass(frozen=True)
class LogUniform:
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __call__(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, generator=generator)
        return (math.log(self.sigma_min) + u * math.log(self.sigma_max / self.sigma_min)).exp()


SIGMA_SAMPLERS: dict[str, type] = {"lognormal": LogNormal, "karras": KarrasUniform, "loguniform": LogUniform}


def get_sigma_sampler(name: str, **kwargs: float) -> SigmaSampler:
    if name not in SIGMA_SAMPLERS:
        raise ValueError(f"unknown sigma sampler {name!r}; choose one of {sorted(SIGMA_SAMPLERS)}")
    return SIGMA_SAMPLERS[name](**kwargs)
