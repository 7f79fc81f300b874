"""Closed-form quantities for Gaussians, written independently of the library so tests can check it.

Everything here is exact for ``x0 ~ N(mean, var)`` (per coordinate, independent coordinates) noised in
the EDM convention ``x_sigma = x0 + sigma * n``: the noised law is ``N(mean, var + sigma^2)`` and the
denoiser (posterior mean of ``x0``) is ``mean + var / (var + sigma^2) * (x - mean)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.polynomial.hermite_e import hermegauss


def gh(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Hermite nodes and weights for ``E[f(u)]``, ``u ~ N(0, 1)``: ``sum(w * f(x))``."""
    x, w = hermegauss(k)
    return x, w / w.sum()


def log_normal(x, mean, var):
    """Log density of ``N(mean, var)`` (1-D), for numpy arrays or torch tensors."""
    log = torch.log if isinstance(x, torch.Tensor) else np.log
    return -0.5 * log(2 * math.pi * (var + 0 * x)) - (x - mean) ** 2 / (2 * var)


def denoiser(mean: float, var: float):
    """The exact denoiser ``D(x, sigma, cond)`` of ``N(mean, var)`` per coordinate; ``sigma`` is ``[B]``."""

    def d(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        s2 = s.reshape((-1,) + (1,) * (x.ndim - 1)) ** 2
        return mean + var / (var + s2) * (x - mean)

    return d


def log_ratio(x, sigma: float, q: tuple[float, float], p: tuple[float, float]):
    """``log q_sigma(x) / p_sigma(x)`` for 1-D Gaussians ``q = (mean, var)``, ``p = (mean, var)``."""
    s2 = sigma**2
    return log_normal(x, q[0], q[1] + s2) - log_normal(x, p[0], p[1] + s2)


def f_divergence(h, q: tuple[float, float], p: tuple[float, float], k: int = 160) -> float:
    """``E_p[h(q/p)] - h(1)`` for 1-D Gaussians, by Gauss-Hermite quadrature under ``p``."""
    u, w = gh(k)
    x = p[0] + math.sqrt(p[1]) * u
    r = np.exp(log_normal(x, *q) - log_normal(x, *p))
    return float(np.sum(w * h(r)) - h(np.ones(1))[0])


def kl(q: tuple[float, float], p: tuple[float, float]) -> float:
    """``KL(N(q) || N(p))`` in closed form (1-D)."""
    return 0.5 * (q[1] / p[1] + (q[0] - p[0]) ** 2 / p[1] - 1 + math.log(p[1] / q[1]))
