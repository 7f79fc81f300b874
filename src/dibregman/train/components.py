"""Everything a distillation run is built from, made once from a config (and rebuilt identically on resume)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import sampling
from ..artifacts import build_mlp_precond
from ..divergences import Divergence
from ..generator import OneStepGenerator
from ..losses import GeneratorLoss, OmegaBinNormalizer, denoising_loss
from ..nets.mlp import MLP
from ..precond import Precond
from ..ratio import Critic
from ..schedules import KarrasUniform, LogNormal
from ..teachers import Teacher
from .config import DistillConfig, divergence_from_spec
from .ema import EMA

Tensor = torch.Tensor


def fit_network(teacher: Teacher, hidden: int, depth: int, steps: int, batch_size: int,
                generator: torch.Generator, device: torch.device) -> Precond:
    """An analytic teacher has no weights to copy, so the students start from an MLP regressed onto its
    exact denoiser (``lambda(sigma) ||D_theta - D_T||^2`` at noisy teacher samples): the same starting
    point a network teacher gives, with a target free of the denoising loss's noise."""
    net = build_mlp_precond({"dim": teacher.shape[0], "hidden": hidden, "depth": depth},
                            teacher.sigma_data).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sigmas = LogNormal(p_mean=-0.4, p_std=1.4)  # wider than EDM's: the generator queries large sigma
    for _ in range(steps):
        x0 = teacher.sample(batch_size, generator=generator).float().to(device)
        sigma = sigmas(batch_size, generator).to(device)
        n = torch.randn(x0.shape, generator=generator).to(device)
        with torch.no_grad():
            target = teacher(x0 + sigma[:, None] * n, sigma)
        loss = denoising_loss(net, x0, sigma, n, target=target).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


@torch.no_grad()
def teacher_samples(teacher: Teacher, n: int, seed: int, device: torch.device, batch: int = 4096) -> Tensor:
    """The teacher's own 35-NFE Heun samples (what stands for p when no data is used)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        noise = torch.randn((min(batch, n - i), *teacher.shape), generator=g).to(device)
        out.append(sampling.sample(teacher, noise, num_steps=18, sigma_min=teacher.sigma_min,
                                   sigma_max=teacher.sigma_max).float())
    return torch.cat(out)


def true_samples(teacher: Teacher, n: int, seed: int) -> Tensor | None:
    """Samples of the law the teacher models: exact for an analytic teacher, its data for a trained one."""
    g = torch.Generator().manual_seed(seed)
    if hasattr(teacher, "sample"):
        return teacher.sample(n, generator=g).float()
    data = getattr(teacher, "data_spec", None)
    if data:
        from ..data.toy2d import load_points

        points = load_points(data, n, g)  # a file gives all its rows, maybe sorted: draw a random subset
        return points[torch.randperm(len(points), generator=g)[:n]].float()
    return None


@dataclass
class Components:
    generator: OneStepGenerator
    fake_score: Precond
    critic: Critic | None
    ema: EMA
    optimizers: dict[str, torch.optim.Optimizer]
    generator_loss: GeneratorLoss
    dre: Divergence
    bins: OmegaBinNormalizer | None
    generator_sigmas: KarrasUniform
    fake_score_sigmas: LogNormal

    def modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"generator": self.generator, "fake_score": self.fake_score,
                                      "ema": self.ema.module}
        if self.critic is not None:
            mods["critic"] = self.critic
        if self.bins is not None:
            mods["omega_bins"] = self.bins
        return mods

    def optimizer_state(self) -> dict[str, Any]:
        return {k: o.state_dict() for k, o in self.optimizers.items()}


def build(cfg: DistillConfig, teacher: Teacher, base: Precond, device: torch.device) -> Components:
    """Generator and fake score start as copies of ``base`` (the teacher's network, or its fit)."""
    # copies of a teacher's network: trainable whatever the teacher's own flags were
    generator = OneStepGenerator.from_teacher(base, cfg.sigma_g).to(device).requires_grad_(True).train()
    fake_score = copy.deepcopy(base).to(device).requires_grad_(True).train()
    gsig = KarrasUniform(teacher.sigma_min, teacher.sigma_max, cfg.generator_t_min, cfg.generator_t_max)
    gen_loss = GeneratorLoss(
        divergence_from_spec(cfg.divergence), weighting=cfg.weighting,
        log_r_clip=(math.log(cfg.r_clip_min), math.log(cfg.r_clip_max)), normalize=cfg.omega_normalize,
        gan_weight=cfg.gan_weight, mode=cfg.generator_mode)
    critic = None
    if gen_loss.needs_critic:
        mlp = MLP(teacher.shape[0], cfg.hidden, cfg.depth, out_dim=1)
        critic = Critic(mlp, teacher.sigma_data).to(device)
    betas = (cfg.beta1, cfg.beta2)
    opts = {"generator": torch.optim.Adam(generator.parameters(), lr=cfg.lr_generator, betas=betas),
            "fake_score": torch.optim.Adam(fake_score.parameters(), lr=cfg.lr_fake_score, betas=betas)}
    if critic is not None:
        opts["critic"] = torch.optim.Adam(critic.parameters(), lr=cfg.lr_critic, betas=betas)
    bins = None
    if cfg.omega_normalize == "bins":
        bins = OmegaBinNormalizer(teacher.sigma_min, teacher.sigma_max).to(device)
    return Components(generator, fake_score, critic, EMA(generator, cfg.ema_decay), opts, gen_loss,
                      divergence_from_spec(cfg.critic_loss), bins, gsig, LogNormal())
