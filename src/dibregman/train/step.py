"""One distillation step, as in the algorithm box of docs/concepts.md: ``K`` updates of the fake score (and
of the critic), one generator update along ``omega(r) * (D_F - D_T)``, the EMA. It reads and changes a
``DistillState`` and nothing else (no files, no logs): the run driver does the rest."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import dist
from ..losses import GeneratorOutput, critic_loss, fake_score_loss, regression_loss
from .state import DistillState

Tensor = torch.Tensor


@dataclass
class StepOutput:
    """What a step measured: ``logs`` in the order measured (tensors, read once per log window by ``Stats``)."""
    loss: Tensor  # the generator's, regression term included
    result: GeneratorOutput
    logs: list[dict[str, Tensor]] = field(default_factory=list)


def distill_step(s: DistillState) -> StepOutput:
    logs = []
    for _ in range(s.cfg.fake_score_steps):  # Phase 1: the fake score and the critic follow the student
        y = s.condition()
        with torch.no_grad(), s.amp:
            x = s.student_batch(y).float()
        if s.c.generator_loss.mode == "score":  # the discriminator form never asks the fake score
            logs.append({"loss/fake_score": fake_score_update(s, x, y)})
        if s.c.critic is not None:
            logs.append({"loss/critic": critic_update(s, x, y)})

    if s.cfg.lr_schedule == "cosine":  # Phase 2: the generator; rates from the step alone (exact resume)
        for group in s.c.optimizers["generator"].param_groups:
            group["lr"] = s.cfg.lr_generator * 0.5 * (1 + math.cos(math.pi * s.step / s.cfg.steps))
    y = s.condition()
    with s.amp:
        x = s.student_batch(y)
        res = s.c.generator_loss(x, s.sigmas(s.c.generator_sigmas), s.draw(), s.teacher, s.c.fake_score,
                                 s.c.critic, cond=y, bins=s.c.bins, reduce_sum=dist.all_reduce_sum)
        loss = res.loss.float().mean()
        if s.pairs is not None:
            reg = regression_term(s)
            loss = loss + s.cfg.regression_weight * reg
            logs.append({"loss/regression": reg})
    s.guard.step(s.c.optimizers["generator"], loss, s.c.generator, "generator", s.step + 1, s.cfg.grad_clip, s.out)

    s.c.ema.update(s.c.generator)  # Phase 3: EMA of the generator
    s.step += 1
    logs.append({"loss/generator": loss, "ratio/omega_mean": res.omega.mean(), "ratio/omega_min": res.omega.min(),
                 "ratio/omega_max": res.omega.max(), "ratio/weight_mean": res.weight.mean()})
    if res.log_r is not None:
        logs.append({"ratio/log_r_mean": res.log_r.mean(), "ratio/log_r_min": res.log_r.min(),
                     "ratio/log_r_max": res.log_r.max()})
    return StepOutput(loss, res, logs)


def fake_score_update(s: DistillState, x: Tensor, y: Tensor | None) -> Tensor:
    """One update of the fake score on the student's samples ``x``: denoising them."""
    sigma = s.sigmas(s.c.fake_score_sigmas)
    with s.amp:
        loss = fake_score_loss(s.c.fake_score, x, sigma, s.draw(), y).float().mean()
    s.guard.step(s.c.optimizers["fake_score"], loss, s.c.fake_score, "fake_score", s.step + 1, s.cfg.grad_clip, s.out)
    return loss


def critic_update(s: DistillState, x: Tensor, y: Tensor | None) -> Tensor:
    """One update of the critic: the pool's samples against the student's ``x``, at the generator's sigmas."""
    idx = s.indices(len(s.pool))
    sigma = s.sigmas(s.c.generator_sigmas)
    y_pool = s.conds.lookup(s.pool_idx[idx], s.device) if s.pool_idx is not None else None
    with s.amp:
        loss = critic_loss(s.c.critic, s.pool[idx.to(s.device)], x, sigma, s.draw(), s.draw(), s.c.dre, y,
                           y_pool).float().mean()
    s.guard.step(s.c.optimizers["critic"], loss, s.c.critic, "critic", s.step + 1, s.cfg.grad_clip, s.out)
    return loss


def regression_term(s: DistillState) -> Tensor:
    """DMD's regression loss on a batch of the teacher's noise-sample pairs."""
    z, x, conds = s.pairs
    j = s.indices(len(z))
    y = s.conds.lookup(conds[j], s.device) if conds is not None else None
    j = j.to(s.device)
    return regression_loss(s.c.generator.first_step, z[j], x[j], y).float().mean()
