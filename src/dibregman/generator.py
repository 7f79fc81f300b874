"""The one-step generator: a denoiser evaluated once at a fixed noise level."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .precond import Precond

Tensor = torch.Tensor


class OneStepGenerator(nn.Module):
    """``G(z, cond) = D_theta(sigma_g z, sigma_g, cond)``.

    Started from a copy of the teacher's denoiser, it is already a (poor) one-step sampler: at large
    ``sigma_g`` the denoiser returns the posterior mean of x0, so distillation starts from the data's
    centre of mass rather than from noise (DMD, SiD and FastGen all initialise this way).
    """

    def __init__(self, denoiser: Precond, sigma_g: float = 2.5):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_g = float(sigma_g)

    @classmethod
    def from_teacher(cls, teacher_net: Precond, sigma_g: float = 2.5) -> OneStepGenerator:
        return cls(copy.deepcopy(teacher_net), sigma_g)

    def forward(self, z: Tensor, cond: Tensor | None = None) -> Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_g, dtype=z.dtype, device=z.device)
        return self.denoiser(self.sigma_g * z, sigma, cond)
