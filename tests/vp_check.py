"""One check shared by the diffusers tests: a teacher's converted denoiser against a pipeline's own x0 at the
discrete VP timesteps of its scheduler."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def assert_vp_x0(teacher, alphas_cumprod: torch.Tensor, steps: list[int], shape: tuple[int, ...], cond,
                 pipeline_x0: Callable[[torch.Tensor, int, int, float], torch.Tensor]) -> None:
    """``teacher(x_sigma, sigma_k, cond)`` equals ``pipeline_x0(x_t, k, i, sigma_k)`` for each step ``k`` (row
    ``i`` of ``cond``), where ``sigma_k = sqrt((1 - ab_k) / ab_k)`` and ``x_t = x_sigma / sqrt(1 + sigma_k^2)``
    is what the pipeline feeds its model; tolerance 1e-4, relative to the noise level."""
    ab = alphas_cumprod.double()[steps]
    sigma = ((1 - ab) / ab).sqrt()
    noise = torch.randn(len(steps), *shape, generator=torch.Generator().manual_seed(1))
    x_sigma = noise * (1 + sigma.float()).reshape(-1, *[1] * len(shape))
    got = teacher(x_sigma, sigma, cond)
    for i, k in enumerate(steps):
        s = sigma[i].item()
        with torch.no_grad():
            ref = pipeline_x0(x_sigma[i:i + 1] / math.sqrt(1 + s * s), k, i, s)
        torch.testing.assert_close(got[i:i + 1], ref, rtol=1e-4, atol=1e-4 * (1 + s))
