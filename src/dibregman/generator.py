"""The student: a denoiser evaluated at a few fixed noise levels (one, by default)."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from .precond import Precond

Tensor = torch.Tensor


def student_sigmas(steps: int, sigma_g: float, sigma_last: float, rho: float = 7.0) -> tuple[float, ...]:
    """The noise levels of a ``steps``-step student: EDM's grid from ``sigma_g`` down to ``sigma_last``
    (``rho`` = 7 spends the steps where the noise is small); one step is ``(sigma_g,)``."""
    if steps == 1:
        return (float(sigma_g),)
    hi, lo = sigma_g ** (1 / rho), sigma_last ** (1 / rho)
    inner = [float((hi + k / (steps - 1) * (lo - hi)) ** rho) for k in range(1, steps - 1)]
    return (float(sigma_g), *inner, float(sigma_last))  # the ends exactly as given


class Generator(nn.Module):
    """``G(z, cond)``: ``x_1 = D(sigma_1 z_1, sigma_1)``, then for each later step ``k`` the last estimate is
    noised again and denoised, ``x_k = D(x_{k-1} + sigma_k z_k, sigma_k)`` (DMD2's multi-step student).

    One step (the default) is ``D(sigma_g z, sigma_g)`` (at ``sigma_g = inf``, a flow model's
    ``z - v(z, t=1)``: what SD3's and Flux's one-step pipelines compute) and ``z`` has the sample's shape; with
    ``N`` steps ``z`` holds the ``N`` noise tensors, ``[B, N, *shape]`` (``latent_shape``), so the student stays a plain
    function of its noise: seeded samples, metrics and exports treat both alike.

    Started from a copy of the teacher's denoiser, it is already a (poor) sampler: at large ``sigma_g`` the
    denoiser returns the posterior mean of x0, so distillation starts from the data's centre of mass rather
    than from noise (DMD, SiD and FastGen all initialise this way).
    """

    def __init__(self, denoiser: Precond, sigma_g: float = 2.5, sigmas: Sequence[float] | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.sigmas = tuple(float(s) for s in (sigmas if sigmas is not None else (sigma_g,)))
        if not self.sigmas or any(b >= a for a, b in pairwise(self.sigmas)):
            raise ValueError(f"a student's noise levels must decrease; got {list(self.sigmas)}")
        if math.isinf(self.sigmas[0]):
            if len(self.sigmas) > 1:
                raise ValueError("a student that starts from pure noise (sigma_g = inf) has one step for now")
            if denoiser.parameterisation.at_pure_noise() is None:
                raise ValueError(f"sigma_g = inf (pure noise) needs a flow-matching denoiser, whose limit there is "
                                 f"finite; this one is {denoiser.parameterisation.kind}: give a finite sigma_g")

    @property
    def sigma_g(self) -> float:
        return self.sigmas[0]

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    @classmethod
    def from_teacher(cls, teacher_net: Precond, sigma_g: float = 2.5,
                     sigmas: Sequence[float] | None = None) -> Generator:
        return cls(copy.deepcopy(teacher_net), sigma_g, sigmas)

    def latent_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of one sample's noise ``z`` for samples of ``shape``."""
        return tuple(shape) if self.steps == 1 else (self.steps, *shape)

    def _step(self, x: Tensor, k: int, cond: Tensor | None) -> Tensor:
        sigma = torch.full((x.shape[0],), self.sigmas[k], dtype=x.dtype, device=x.device)
        return self.denoiser(x, sigma, cond)

    def forward(self, z: Tensor, cond: Tensor | None = None, upto: int | None = None) -> Tensor:
        """The sample after ``upto`` steps (all of them by default). With ``upto`` given, the steps before
        the last one run without gradients: DMD2's backward simulation trains each step on the student's
        own earlier outputs, with the gradient of that step alone."""
        k_last = self.steps if upto is None else upto
        if not 1 <= k_last <= self.steps:
            raise ValueError(f"upto must be in 1..{self.steps} (this student's steps); got {upto}")
        if self.steps == 1:
            return self.first_step(z, cond)
        x = None
        for k in range(k_last):
            noisy = self.sigmas[k] * z[:, k] if x is None else x + self.sigmas[k] * z[:, k]
            with torch.no_grad() if upto is not None and k < k_last - 1 else contextlib.nullcontext():
                x = self._step(noisy, k, cond)
        return x

    def first_step(self, z0: Tensor, cond: Tensor | None = None) -> Tensor:
        """``D(sigma_g z0, sigma_g)`` for noise ``z0`` of the sample's shape (what DMD's regression pairs fit); at
        ``sigma_g = inf`` its limit, the flow model at ``t = 1`` (``Precond.from_pure_noise``)."""
        if math.isinf(self.sigma_g):
            return self.denoiser.from_pure_noise(z0, cond)
        return self._step(self.sigma_g * z0, 0, cond)


OneStepGenerator = Generator  # its earlier name
