"""The three losses of Di-Bregman distillation. Each returns a per-sample tensor ``[B]``; the training
loop reduces, scales and steps. Hyperparameters are fixed at construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .divergences import Divergence
from .precond import Precond, append_dims
from .ratio import FeatureCritic, log_r_from_logit

Tensor = torch.Tensor
Net = Callable[..., Tensor]


def _mean_dims(v: Tensor) -> Tensor:
    return v.flatten(1).mean(1)


def denoising_loss(net: Precond, x0: Tensor, sigma: Tensor, n: Tensor, cond: Tensor | None = None,
                   target: Tensor | None = None) -> Tensor:
    """EDM's weighted denoising loss ``lambda(sigma) ||D(x0 + sigma n) - x0||^2`` (mean over dims).

    ``target`` replaces ``x0`` as the regression target (to fit a network to a known denoiser)."""
    x_sigma = x0 + append_dims(sigma, x0.ndim) * n
    err = net(x_sigma, sigma, cond) - (x0 if target is None else target)
    return net.loss_weight(sigma) * _mean_dims(err**2)


def fake_score_loss(fake_score: Precond, x_student: Tensor, sigma: Tensor, n: Tensor,
                    cond: Tensor | None = None) -> Tensor:
    """The fake score learns the student's law by denoising detached generator samples."""
    return denoising_loss(fake_score, x_student.detach(), sigma, n, cond)


def critic_loss(critic: Net, x_teacher: Tensor, x_student: Tensor, sigma: Tensor, n_teacher: Tensor,
                n_student: Tensor, dre: Divergence, cond: Tensor | None = None,
                cond_teacher: Tensor | None = None) -> Tensor:
    """Bregman density-ratio loss on ``r_hat = exp(-logit)``; ``dre = logistic`` is the classifier's
    logistic loss ``softplus(-l_p) + softplus(l_q)``. Teacher and student batches have equal size;
    ``cond`` labels the student batch, ``cond_teacher`` the teacher's (default: ``cond``)."""
    s = append_dims(sigma, x_student.ndim)
    x_p, x_q = x_teacher + s * n_teacher, x_student.detach() + s * n_student
    c_p = cond if cond_teacher is None else cond_teacher
    if (c_p is None) == (cond is None):  # one call on both halves: a third less time for a small network
        sig = torch.as_tensor(sigma, dtype=x_q.dtype, device=x_q.device).expand(x_q.shape[0])
        both = critic(torch.cat([x_p, x_q]), torch.cat([sig, sig]), None if cond is None else torch.cat([c_p, cond]))
        l_p, l_q = both.split(x_q.shape[0])
    else:
        l_p, l_q = critic(x_p, sigma, c_p), critic(x_q, sigma, cond)
    return dre.dre_loss(log_r_from_logit(l_p), log_r_from_logit(l_q))


def regression_loss(generator: Net, z: Tensor, x_teacher: Tensor, cond: Tensor | None = None) -> Tensor:
    """DMD's regression loss: ``mean_dims (G(z) - x_T(z))^2`` on pairs of unit noise ``z`` and the sample the
    teacher's deterministic ODE sampler makes from it. It teaches the one-step map the teacher's own
    noise-to-sample map, whose image keeps the teacher's mode shapes (a distribution-matching gradient alone
    only sees them through the fake score's resolution at small sigma)."""
    return _mean_dims((generator(z, cond) - x_teacher) ** 2)


class OmegaBinNormalizer(nn.Module):
    """Divides ``omega`` by a running mean of ``omega`` in its noise bin (log-spaced in sigma), so
    that each noise level keeps its own scale. Its buffers are part of the training state."""

    def __init__(self, sigma_min: float, sigma_max: float, num_bins: int = 16, momentum: float = 0.99):
        super().__init__()
        self.log_lo, self.log_hi = math.log(sigma_min), math.log(sigma_max)
        self.num_bins, self.momentum = num_bins, momentum
        self.register_buffer("running", torch.ones(num_bins, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(num_bins, dtype=torch.bool))

    def bins(self, sigma: Tensor) -> Tensor:
        u = (sigma.log() - self.log_lo) / (self.log_hi - self.log_lo)
        return (u * self.num_bins).long().clamp(0, self.num_bins - 1)

    @torch.no_grad()
    def forward(self, omega: Tensor, sigma: Tensor, reduce_sum: Callable[[Tensor], Tensor]) -> Tensor:
        b = self.bins(sigma)
        sums = torch.zeros(self.num_bins, dtype=torch.float64, device=omega.device)
        counts = torch.zeros_like(sums)
        sums.index_add_(0, b, omega.double())
        counts.index_add_(0, b, torch.ones_like(omega, dtype=torch.float64))
        sums, counts = reduce_sum(sums), reduce_sum(counts)
        hit = counts > 0  # masks, not boolean indexing: the step never waits for the device to count hits
        batch_mean = sums / counts.clamp_min(1)
        moved = torch.where(self.seen, self.momentum * self.running + (1 - self.momentum) * batch_mean, batch_mean)
        self.running.copy_(torch.where(hit, moved, self.running))
        self.seen |= hit
        return omega / self.running[b].to(omega.dtype)


@dataclass
class GeneratorOutput:
    loss: Tensor  # [B], carries the generator's gradient
    omega: Tensor  # [B], before normalisation (what the divergence asked for)
    log_r: Tensor | None  # [B], after clipping; None when no critic is used
    weight: Tensor  # [B], the time weighting wt(sigma)


@dataclass
class GeneratorLoss:
    """The Di-Bregman generator update (docs/concepts.md, "The generator update").

    Per sample: ``g = wt * omega(r) * (D_F(x_sigma) - D_T(x_sigma))`` applied through the surrogate
    ``0.5 * mean_dims (x - stopgrad(x - g))^2``, whose gradient in ``x`` is ``g / dims`` (DMD's MSE
    convention, so ``reverse_kl`` reproduces DMD's update exactly). ``mode = "discriminator"`` uses
    the equivalent critic-only gradient of section 6 and no fake score.
    """

    divergence: Divergence
    weighting: str = "dmd"  # "dmd": 1/mean|x - D_T|; "sigma2": 1/sigma^2 (exact gradient); "none": 1
    log_r_clip: tuple[float, float] | None = (math.log(0.1), math.log(20.0))
    normalize: str = "batch"  # "batch" | "bins" | "none"
    gan_weight: float = 0.0
    mode: str = "score"  # "score" | "discriminator"
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.weighting not in ("dmd", "sigma2", "none"):
            raise ValueError(f"weighting must be 'dmd', 'sigma2' or 'none'; got {self.weighting!r}")
        if self.normalize not in ("batch", "bins", "none"):
            raise ValueError(f"normalize must be 'batch', 'bins' or 'none'; got {self.normalize!r}")
        if self.mode not in ("score", "discriminator"):
            raise ValueError(f"mode must be 'score' or 'discriminator'; got {self.mode!r}")

    @property
    def needs_critic(self) -> bool:
        return self.divergence.name != "reverse_kl" or self.gan_weight > 0 or self.mode == "discriminator"

    def _normalise(self, omega: Tensor, sigma: Tensor, bins: OmegaBinNormalizer | None,
                   reduce_sum: Callable[[Tensor], Tensor]) -> Tensor:
        if self.normalize == "batch":
            total = reduce_sum(torch.stack([omega.sum(), omega.new_tensor(float(omega.numel()))]))
            return omega / (total[0] / total[1]).clamp_min(self.eps)
        if self.normalize == "bins":
            if bins is None:
                raise ValueError("normalize='bins' needs an OmegaBinNormalizer")
            return bins(omega, sigma, reduce_sum)
        return omega

    def __call__(self, x: Tensor, sigma: Tensor, n: Tensor, teacher: Net, fake_score: Net | None,
                 critic: Net | None, cond: Tensor | None = None, bins: OmegaBinNormalizer | None = None,
                 reduce_sum: Callable[[Tensor], Tensor] = lambda t: t) -> GeneratorOutput:
        s = append_dims(sigma, x.ndim)
        x_sigma = x + s * n

        d_f = None
        with torch.no_grad():
            log_r = None
            if self.needs_critic:
                if critic is None:
                    raise ValueError(f"divergence {self.divergence.name!r} (or a GAN term) needs a critic")
                if self.mode == "score" and isinstance(critic, FeatureCritic) and critic.reads(fake_score):
                    d_f, feats = fake_score.forward_with_features(x_sigma.detach(), sigma, cond)  # one pass
                    logit = critic.from_features(feats)
                else:
                    logit = critic(x_sigma.detach(), sigma, cond)
                log_r = log_r_from_logit(logit)
                if self.log_r_clip is not None:
                    log_r = log_r.clamp(*self.log_r_clip)
            omega = self.divergence.omega(log_r if log_r is not None else torch.zeros_like(sigma))
            omega_n = self._normalise(omega, sigma, bins, reduce_sum)

        if self.mode == "discriminator":
            # grad = -E[h''(r)/D^2 grad D(x_sigma)], D = sigmoid(l); h''(r) = omega / r, log r = -l.
            # Divided by dims, the score form's mean-over-dims convention, so that both modes give the
            # same gradient (the score form with weighting "sigma2") in any dimension.
            with torch.no_grad():
                coef = omega_n * (-log_r - 2 * F.logsigmoid(-log_r)).exp() / x[0].numel()
            loss = -coef * torch.sigmoid(critic(x_sigma, sigma, cond))
            weight = torch.ones_like(sigma)
        else:
            if fake_score is None:
                raise ValueError("the score form of the generator loss needs a fake score")
            with torch.no_grad():
                d_t = teacher(x_sigma.detach(), sigma, cond)
                if d_f is None:
                    d_f = fake_score(x_sigma.detach(), sigma, cond)
                weight = self._weight(x, d_t, sigma)
                g = append_dims(weight * omega_n, x.ndim) * (d_f - d_t)
            loss = 0.5 * _mean_dims((x - (x - g).detach()) ** 2)

        if self.gan_weight > 0:
            loss = loss + self.gan_weight * F.softplus(-critic(x_sigma, sigma, cond))
        return GeneratorOutput(loss=loss, omega=omega, log_r=log_r, weight=weight)

    def _weight(self, x: Tensor, d_t: Tensor, sigma: Tensor) -> Tensor:
        if self.weighting == "dmd":
            return 1 / _mean_dims((x.detach() - d_t).abs()).clamp_min(self.eps)
        if self.weighting == "sigma2":
            return sigma**-2
        return torch.ones_like(sigma)
