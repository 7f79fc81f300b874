"""Where a student loses variety, measured exactly on an analytic teacher.

The student's law is known up to sampling: N samples ``x_i`` make ``q_sigma`` the equal-weight mixture of
``N(x_i, sigma^2 I)``, whose log-density and posterior mean are closed forms

    log q_sigma(x) = logsumexp_i(-|x - x_i|^2 / 2 sigma^2) - log N - d/2 log(2 pi sigma^2),
    D_q(x, sigma)  = sum_i softmax_i(-|x - x_i|^2 / 2 sigma^2) x_i.

With the teacher's exact ``log p_sigma`` and ``D_T`` this gives, per noise level, the two quantities the
update ``omega(r) (D_F - D_T)`` is built from, against their truth: how far the fake score ``D_F`` is from
the student's exact denoiser ``D_q``, and how far the critic's ``log r`` is from ``log q_sigma - log p_sigma``.
Torch only, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..ratio import log_r_from_logit

Tensor = torch.Tensor
Net = Callable[..., Tensor]
_BLOCK = 2048
# The noise levels of the diagnostics: from half the ring's mode width (0.1) to its radius (2). Below that
# the finite-sample D_q is noisier than the signal: two independent sets of 4096 students disagree by 2.8x
# the signal at sigma = 0.02, 0.27x at 0.05, <= 0.18x from 0.1 up (measured on a demo student).
DIAGNOSTIC_SIGMAS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


def _logits(x: Tensor, sigma: Tensor, samples: Tensor) -> Tensor:
    """``-|x_b - x_i|^2 / (2 sigma_b^2)`` for a block of queries ``[b, d]`` against all samples ``[N, d]``."""
    d2 = torch.cdist(x, samples, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    return -d2 / (2 * sigma[:, None] ** 2)


def _blocks(x: Tensor, sigma: Tensor | float) -> list[tuple[Tensor, Tensor]]:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
    return [(x[i:i + _BLOCK], sigma[i:i + _BLOCK]) for i in range(0, x.shape[0], _BLOCK)]


@torch.no_grad()
def empirical_posterior(x: Tensor, sigma: Tensor | float, samples: Tensor) -> tuple[Tensor, Tensor]:
    """The exact denoiser ``E[x0 | x_sigma = x]`` ``[B, d]`` and ``log q_sigma(x)`` ``[B]`` (float64) of the
    equal-weight mixture of ``N(samples_i, sigma^2 I)``, from one pass over the samples."""
    x, samples = x.double(), samples.double()
    n, d = samples.shape
    means, logs = [], []
    for xb, sb in _blocks(x, sigma):
        logits = _logits(xb, sb, samples)
        lse = torch.logsumexp(logits, dim=1)
        means.append(torch.exp(logits - lse[:, None]) @ samples)
        logs.append(lse - math.log(n) - 0.5 * d * torch.log(2 * math.pi * sb**2))
    return torch.cat(means), torch.cat(logs)


def empirical_log_density(x: Tensor, sigma: Tensor | float, samples: Tensor) -> Tensor:
    """``log q_sigma(x)`` of the equal-weight mixture of ``N(samples_i, sigma^2 I)`` (float64) ``[B]``."""
    return empirical_posterior(x, sigma, samples)[1]


def empirical_denoiser(x: Tensor, sigma: Tensor | float, samples: Tensor) -> Tensor:
    """The exact denoiser ``E[x0 | x_sigma = x]`` when ``x0`` is uniform over ``samples`` (float64) ``[B, d]``."""
    return empirical_posterior(x, sigma, samples)[0]


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


@torch.no_grad()
def variety_diagnostics(student: Tensor, queries: Tensor, teacher: Net, log_p: Callable[[Tensor, float], Tensor],
                        fake_score: Net | None = None, critic: Net | None = None,
                        sigmas: Sequence[float] = DIAGNOSTIC_SIGMAS, generator: torch.Generator | None = None,
                        ) -> dict[str, float]:
    """Per noise level ``s`` (stats keys ``diag/<name>@<s>``), at ``x_s = queries + s n`` with student
    ``queries`` drawn independently of the ``student`` samples that define ``q_s``:

    - ``fake_score_err``: ``E|D_F - D_q|^2 / E|D_T - D_q|^2``, the fake score's error relative to the size of
      the signal it must resolve (0: exact; 1: no better than copying the teacher);
    - ``update_cos``: cosine between the update the generator gets, ``D_F - D_T``, and the exact one,
      ``D_q - D_T`` (all samples pooled);
    - ``log_r_true``: mean true ``log r = log q_s - log p_s`` at student points (the ratio the critic must see);
    - ``log_r_rmse`` / ``log_r_corr``: the critic's ``log r`` against the true one (RMSE and correlation).
    """
    out: dict[str, float] = {}
    for s in sigmas:
        n = torch.randn(queries.shape, generator=generator).to(queries)
        x = queries + s * n
        sig = torch.full((x.shape[0],), float(s), dtype=x.dtype, device=x.device)
        d_q, log_q = empirical_posterior(x, s, student)
        d_t = teacher(x, sig).double()
        signal = (d_t - d_q).pow(2).sum(1).mean()
        key = f"@{s:g}"
        if fake_score is not None:
            d_f = fake_score(x, sig).double()
            out["diag/fake_score_err" + key] = float((d_f - d_q).pow(2).sum(1).mean() / signal.clamp_min(1e-30))
            u, v = (d_f - d_t).flatten(), (d_q - d_t).flatten()
            out["diag/update_cos" + key] = float(u @ v / (u.norm() * v.norm()).clamp_min(1e-30))
        true = log_q - log_p(x, s).double()
        out["diag/log_r_true" + key] = float(true.mean())
        if critic is not None:
            est = log_r_from_logit(critic(x, sig)).double()
            out["diag/log_r_rmse" + key] = float((est - true).pow(2).mean().sqrt())
            out["diag/log_r_corr" + key] = _pearson(est, true)
    return out
