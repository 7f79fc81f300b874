"""The sigma samplers (options ``generator_sigmas`` and ``fake_score_sigmas``): the noise levels the generator and
critic updates, and the fake score's denoising loss, are drawn at. Each is a builder
``(cfg, sigma_min, sigma_max) -> sampler`` registered in ``SIGMA_SAMPLERS``, where ``sampler(n, generator)`` returns
``n`` positive noise levels and ``[sigma_min, sigma_max]`` is the run's noise range; register your own to make its
name a valid value of both options."""

from __future__ import annotations

import torch

from ..registry import Registry
from ..schedules import KarrasUniform, LogNormal, LogUniform, SigmaSampler
from .config import ConfigError, DistillConfig

SIGMA_SAMPLERS = Registry("sigma sampler")


@SIGMA_SAMPLERS.register("karras", help="t ~ U[generator_t_min, generator_t_max] on EDM's rho-warped axis of the "
                         "noise range, DMD's uniform timestep", check=False)
def karras(cfg: DistillConfig, sigma_min: float, sigma_max: float) -> SigmaSampler:
    return KarrasUniform(sigma_min, sigma_max, cfg.generator_t_min, cfg.generator_t_max)


@SIGMA_SAMPLERS.register("lognormal", help="log sigma ~ N(fake_score_p_mean, fake_score_p_std^2), EDM's training law",
                         check=False)
def lognormal(cfg: DistillConfig, sigma_min: float, sigma_max: float) -> SigmaSampler:
    return LogNormal(cfg.fake_score_p_mean, cfg.fake_score_p_std)


@SIGMA_SAMPLERS.register("loguniform", help="log sigma uniform over the noise range", check=False)
def loguniform(cfg: DistillConfig, sigma_min: float, sigma_max: float) -> SigmaSampler:
    return LogUniform(sigma_min, sigma_max)


def sigma_sampler(cfg: DistillConfig, key: str, sigma_min: float, sigma_max: float) -> SigmaSampler:
    """The sampler option ``key`` names over the noise range; one of your own is tried once here (on its own
    generator, so no run's stream moves) and refused unless it returns ``n`` positive finite levels."""
    entry = SIGMA_SAMPLERS.get(getattr(cfg, key))
    sampler = entry.make(cfg, sigma_min, sigma_max)
    if entry.check:
        try:
            drawn = sampler(4, torch.Generator().manual_seed(0))
            ok = torch.is_tensor(drawn) and drawn.shape == (4,) and bool((drawn.isfinite() & (drawn > 0)).all())
        except Exception as e:
            raise ConfigError(f"{key} = {getattr(cfg, key)!r}: its sampler failed on (4, generator): {e}") from None
        if not ok:
            raise ConfigError(f"{key} = {getattr(cfg, key)!r}: sampler(n, generator) must return a tensor of n "
                              "positive finite noise levels")
    return sampler
