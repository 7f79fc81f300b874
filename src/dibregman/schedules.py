"""Noise conventions and sigma samplers.

One internal convention (EDM): ``x_sigma = x0 + sigma * n``. A network trained in another (VP, rectified flow)
is read through its parameterisation object below, which gives a ``Precond`` its four coefficients; the pure
conversions beside them map the conventions' time variables (docs/concepts.md, "Noise convention").
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


# --- parameterisations: how a network's input and output are read as the EDM denoiser -------------------


Coefficients = tuple[Tensor, Tensor, Tensor, Tensor]


class Parameterisation:
    """``D(x_sigma, sigma) = c_skip x_sigma + c_out F(c_in x_sigma, c_noise, cond)``: how a network trained in one
    convention is read as the EDM denoiser. EDM's own preconditioning, a VP model with an epsilon, v or x0 output,
    and a rectified-flow model with a velocity output differ only in these four coefficients (``c_noise`` is the
    network's time input, in its own units), so every denoiser is a ``Precond`` around one of them."""

    kind = ""  # "edm", "vp" or "flow"
    prediction = ""  # what F predicts

    def coefficients(self, sigma: Tensor, dtype: torch.dtype) -> Coefficients:
        """``(c_skip, c_out, c_in, c_noise)`` at per-sample ``sigma``; the first three in ``dtype``."""
        raise NotImplementedError

    def timestep(self, sigma: Tensor) -> Tensor:
        """``c_noise`` at ``sigma``, as precise as the convention allows (float64 for the tables)."""
        raise NotImplementedError

    def sigma_from_timestep(self, timestep: Tensor) -> Tensor:
        """The inverse of ``timestep`` on the trained range."""
        raise NotImplementedError

    def at_pure_noise(self) -> tuple[float, float, float, float] | None:
        """``(a, c_out, b, c_noise)`` with ``D(sigma z, sigma) -> a z + c_out F(b z, c_noise)`` as ``sigma -> inf``,
        where the convention has that limit (a student that starts from pure noise, ``sigma_g = inf``); else None
        (EDM's and a VP table's time input diverge there)."""
        return None


@dataclass(frozen=True)
class EDMParameterisation(Parameterisation):
    """Karras et al. 2022, table 1: unit-variance network input and target for data of spread ``sigma_data``."""

    sigma_data: float = 0.5
    kind = "edm"
    prediction = "F"

    def coefficients(self, sigma: Tensor, dtype: torch.dtype) -> Coefficients:
        s, sd = sigma.to(dtype), self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, s.log() / 4

    def timestep(self, sigma: Tensor) -> Tensor:
        return torch.as_tensor(sigma).log() / 4

    def sigma_from_timestep(self, timestep: Tensor) -> Tensor:
        return (4 * torch.as_tensor(timestep)).exp()


VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


class VPParameterisation(Parameterisation):
    """DDPM / VP, ``x_t = sqrt(ab) x0 + sqrt(1-ab) n``: the model input is ``x_sigma / sqrt(1 + sigma^2)`` and its
    output an epsilon (``x0 = x_sigma - sigma eps``), a v (``x0 = sqrt(ab) x_t - sqrt(1-ab) v``) or x0 itself.

    Its timestep is the continuous index found by interpolating ``log sigma`` linearly over the discrete
    ``log sigma_k`` of ``alphas_cumprod`` (what diffusers' Euler and Karras samplers do), clamped to the trained
    grid; or, ``continuous``, ``0.25 log sigma`` (diffusers' EDM-style Euler variant)."""

    kind = "vp"

    def __init__(self, alphas_cumprod: Tensor, prediction: str = "epsilon", continuous: bool = False):
        if prediction not in VP_PREDICTIONS:
            raise ValueError(f"unsupported VP prediction {prediction!r}; supported: {', '.join(VP_PREDICTIONS)}")
        self.prediction, self.continuous = prediction, bool(continuous)
        log_sigmas = vp_sigma_from_alpha_bar(torch.as_tensor(alphas_cumprod).double()).log()
        keep = log_sigmas.isfinite()  # a zero-terminal-SNR end (alpha_bar = 0) has no finite EDM sigma
        self.log_sigmas = log_sigmas[keep]
        self.steps = torch.arange(len(log_sigmas), dtype=torch.float64)[keep]
        if len(self.log_sigmas) < 2 or not bool((self.log_sigmas.diff() > 0).all()):
            raise ValueError("noise levels must increase strictly with the timestep")
        self.sigma_min = float(self.log_sigmas[0].exp())
        self.sigma_max = float(self.log_sigmas[-1].exp())
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _table(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(log sigma_k, k)`` on ``device`` (float64 for exact knots; MPS has no float64)."""
        if device not in self._tables:
            dt = torch.float32 if device.type == "mps" else torch.float64
            self._tables[device] = (self.log_sigmas.to(device, dt), self.steps.to(device, dt))
        return self._tables[device]

    def timestep(self, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma)
        if self.continuous:
            return 0.25 * sigma.double().log()
        log_sigmas, steps = self._table(sigma.device)
        return interp(sigma.to(log_sigmas.dtype).log(), log_sigmas, steps)

    def sigma_from_timestep(self, timestep: Tensor) -> Tensor:
        t = torch.as_tensor(timestep).double()
        if self.continuous:
            return (4 * t).exp()
        log_sigmas, steps = self._table(t.device)
        return interp(t.to(steps.dtype), steps, log_sigmas).exp()

    def coefficients(self, sigma: Tensor, dtype: torch.dtype) -> Coefficients:
        s = sigma.to(dtype)
        c_in = 1 / (1 + s**2).sqrt()
        if self.prediction == "epsilon":
            c_skip, c_out = torch.ones_like(s), -s
        elif self.prediction == "v_prediction":
            c_skip, c_out = c_in**2, -s * c_in
        else:
            c_skip, c_out = torch.zeros_like(s), torch.ones_like(s)
        return c_skip, c_out, c_in, self.timestep(sigma).float()

    def __getstate__(self) -> dict:  # the per-device tables are a cache
        return {**self.__dict__, "_tables": {}}


class FlowParameterisation(Parameterisation):
    """Rectified flow, ``x_t = (1-t) x0 + t n``: ``t = sigma / (1+sigma)``, model input ``x_sigma / (1+sigma)``,
    timestep ``t * num_train_timesteps`` (as diffusers feeds it), velocity ``v = n - x0`` so ``x0 = x_t - t v``."""

    kind = "flow"
    prediction = "velocity"

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = int(num_train_timesteps)

    def timestep(self, sigma: Tensor) -> Tensor:
        return flow_t_from_sigma(torch.as_tensor(sigma).double()) * self.num_train_timesteps

    def sigma_from_timestep(self, timestep: Tensor) -> Tensor:
        return flow_sigma_from_t(torch.as_tensor(timestep).double() / self.num_train_timesteps)

    def coefficients(self, sigma: Tensor, dtype: torch.dtype) -> Coefficients:
        s = sigma.to(dtype)
        c_in = 1 / (1 + s)
        return c_in, -s * c_in, c_in, self.timestep(sigma).float()

    def at_pure_noise(self) -> tuple[float, float, float, float]:
        # t = 1: the model input is the noise itself and x0 = x_1 - v, what a one-step flow pipeline returns
        return 1.0, -1.0, 1.0, float(self.num_train_timesteps)


def interp(q: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear ``f(q)`` through ``(xp, fp)`` (``xp`` increasing), clamped to the end values."""
    q = q.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, q.contiguous(), right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (q - x0) / (x1 - x0) * (f1 - f0)


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
