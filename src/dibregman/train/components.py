"""Everything a distillation run is built from, made once from a config (and rebuilt identically on resume)."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import sampling
from ..artifacts import build_precond
from ..divergences import Divergence
from ..generator import Generator, student_sigmas
from ..losses import GeneratorLoss, OmegaBinNormalizer, denoising_loss
from ..metrics.exact import variety_diagnostics
from ..precond import Precond
from ..ratio import Critic
from ..schedules import LogNormal, SigmaSampler
from ..teachers import Teacher, data_spec, exact_sampler, latent_codec
from ..teachers.objects import weights_digest
from .conditions import Conditions
from .config import ConfigError, DistillConfig, eval_samples, resolved_divergence
from .critics import CRITIC_HEADS
from .ema import EMA
from .sigmas import sigma_sampler

Tensor = torch.Tensor


def fit_network(teacher: Teacher, hidden: int, depth: int, steps: int, batch_size: int,
                generator: torch.Generator, device: torch.device) -> Precond:
    """A point teacher without weights to copy (analytic, or an object without a network): the students start
    from an MLP regressed onto its denoiser (``lambda(sigma) ||D_theta - D_T||^2`` at noisy teacher samples),
    the same starting point a network teacher gives, with a target free of the denoising loss's noise. The
    samples are exact where the teacher can draw them (``sample``), else ``FIT_POOL`` of its 35-NFE ones."""
    net = build_precond({"dim": teacher.shape[0], "hidden": hidden, "depth": depth},
                            teacher.sigma_data).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sigmas = LogNormal(p_mean=-0.4, p_std=1.4)  # wider than EDM's: the generator queries large sigma
    exact = exact_sampler(teacher)
    pool = None if exact is not None else teacher_samples(
        teacher, FIT_POOL, int(torch.randint(2**62, (1,), generator=generator)), device)  # its own stream
    for _ in range(steps):
        if pool is None:
            x0 = exact(batch_size, generator=generator).float().to(device)
        else:
            x0 = pool[torch.randint(len(pool), (batch_size,), generator=generator).to(device)]
        sigma = sigmas(batch_size, generator).to(device)
        n = torch.randn(x0.shape, generator=generator).to(device)
        with torch.no_grad():
            target = teacher(x0 + sigma[:, None] * n, sigma)
        loss = denoising_loss(net, x0, sigma, n, target=target).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


FIT_POOL = 10_000  # a teacher that cannot draw exact samples is fitted on this many of its 35-NFE ones
_FITS: dict[tuple, tuple[dict[str, Tensor], Tensor]] = {}


def fitted_start(teacher: Teacher, cfg: DistillConfig, device: torch.device) -> Precond:
    """``fit_network`` for ``cfg``, kept for the process: the members of a comparison (demo, compare) start
    from the same fit. The key holds the teacher's checksum and the global RNG state (the MLP's initial
    weights come from it), and a reuse leaves that RNG where the fit left it: the run is the same either way."""
    key = (cfg.teacher, weights_digest(teacher), cfg.hidden, cfg.depth, cfg.fit_steps, cfg.batch_size, cfg.seed,
           str(device), hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
    if key not in _FITS:
        net = fit_network(teacher, cfg.hidden, cfg.depth, cfg.fit_steps, cfg.batch_size,
                          torch.Generator().manual_seed(cfg.seed + 3), device)
        _FITS.clear()  # one fit at a time: bounded memory
        _FITS[key] = ({k: v.detach().clone() for k, v in net.state_dict().items()}, torch.get_rng_state())
        return net
    weights, rng = _FITS[key]
    net = build_precond({"dim": teacher.shape[0], "hidden": cfg.hidden, "depth": cfg.depth},
                        teacher.sigma_data).to(device)
    net.load_state_dict(weights)
    torch.set_rng_state(rng)
    return net


_TEACHER_ROWS: dict[tuple, tuple[Tensor, float]] = {}


def reference_teacher_samples(teacher: Teacher, cfg: DistillConfig, device: torch.device,
                              conds: Conditions) -> tuple[Tensor, float]:
    """The teacher's 35-NFE samples for the final table (and the seconds they took), kept for the process:
    runs of several members from one teacher (demo, compare) share them instead of sampling it again. The
    key holds a checksum of the teacher's weights and buffers, so a changed teacher is never reused."""
    n = eval_samples(cfg.eval_samples, teacher.shape)
    key = (cfg.teacher, weights_digest(teacher), cfg.guidance, cfg.prompts, n, cfg.seed, str(device))
    if key not in _TEACHER_ROWS:
        t0 = time.perf_counter()
        x = teacher_samples(teacher, n, cfg.seed + 5, device, conds, decode=True).cpu()
        _TEACHER_ROWS.clear()  # one teacher's samples at a time: bounded memory
        _TEACHER_ROWS[key] = (x, time.perf_counter() - t0)
    return _TEACHER_ROWS[key]


def balanced_labels(n: int, num_classes: int, device: torch.device | str = "cpu") -> Tensor | None:
    """The label convention of every sample set here: sample ``i`` has class ``i % num_classes``."""
    return torch.arange(n, device=device) % num_classes if num_classes else None


@torch.no_grad()
def teacher_samples(teacher: Teacher, n: int, seed: int, device: torch.device, conds: Conditions | None = None,
                    batch: int = 4096, return_noise: bool = False, decode: bool = False
                    ) -> Tensor | tuple[Tensor, Tensor]:
    """The teacher's own 35-NFE Heun samples (what stands for p when no data is used), sample ``i`` with
    condition ``i % K`` (``Conditions.cycle``; by default the teacher's classes). ``return_noise``: also the
    unit noise each sample's deterministic ODE started from (the pairs of DMD's regression loss).
    ``decode``: a latent teacher's samples as images (its VAE's decoding), for metrics and grids."""
    g = torch.Generator().manual_seed(seed)
    conds = conds if conds is not None else Conditions(teacher.num_classes)
    idx = conds.cycle(n)
    codec = latent_codec(teacher) if decode else None
    if len(teacher.shape) == 3:
        batch = sampling.batch_for(teacher.shape, min(batch, 512))  # an image network: bounded activations
    out, noises = [], []
    for i in range(0, n, batch):
        noise = torch.randn((min(batch, n - i), *teacher.shape), generator=g).to(device)
        cond = conds.lookup(idx[i:i + len(noise)], device) if idx is not None else None
        x = sampling.sample(teacher, noise, num_steps=18, sigma_min=teacher.sigma_min,
                            sigma_max=teacher.sigma_max, cond=cond).float()
        out.append(codec.decode(x).cpu() if codec is not None else x)  # images wait on the CPU, not the GPU
        noises.append(noise)
    return (torch.cat(out), torch.cat(noises)) if return_noise else torch.cat(out)


def true_samples(teacher: Teacher, n: int, seed: int, split: str = "train", classes: int | None = None
                 ) -> Tensor | None:
    """Samples of the law the teacher models: exact for an analytic teacher, its data for a trained one
    (``split="test"``: the held-out split where the data set has one). Image sets are class-balanced in
    the ``balanced_labels`` order over ``classes`` (default: the teacher's); there may be fewer than ``n``
    if a class runs short."""
    g = torch.Generator().manual_seed(seed)
    exact = exact_sampler(teacher)
    if exact is not None:
        return exact(n, generator=g).float()
    data = data_spec(teacher)
    if not data:
        return None
    from ..data.images import is_image_spec, load_images, test_split

    if not is_image_spec(data):
        from ..data.toy2d import load_points

        points = load_points(data, n, g)  # a file gives all its rows, maybe sorted: draw a random subset
        return points[torch.randperm(len(points), generator=g)[:n]].float()
    ds = load_images((test_split(data) or data) if split == "test" else data)
    order = torch.randperm(len(ds.images), generator=g)
    k = teacher.num_classes if classes is None else classes
    if not k or ds.labels is None:
        return ds.images[order[:n]]
    per_class = [order[ds.labels[order] == c] for c in range(k)]
    m = min(-(-n // k), *(len(ix) for ix in per_class))
    idx = torch.stack([ix[:m] for ix in per_class], dim=1).reshape(-1)[:n]  # class i % k at row i
    return ds.images[idx]


@dataclass
class Components:
    generator: Generator
    fake_score: Precond
    critic: Critic | None
    ema: EMA
    optimizers: dict[str, torch.optim.Optimizer]
    generator_loss: GeneratorLoss
    dre: Divergence
    bins: OmegaBinNormalizer | None
    generator_sigmas: SigmaSampler
    fake_score_sigmas: SigmaSampler
    shared: frozenset[int] | None = None  # LoRA: the teacher's tensors under the adapters, never checkpointed
    views: dict[str, nn.Module] | None = None  # parallel = fsdp: the whole-state views of the sharded networks
    gathered: dict[str, Any] | None = None  # and their optimisers' whole states, inside whole_state()

    def trained(self) -> dict[str, nn.Module]:
        """The networks the optimisers step, by optimiser name."""
        nets: dict[str, nn.Module] = {"generator": self.generator, "fake_score": self.fake_score}
        return nets if self.critic is None else {**nets, "critic": self.critic}

    def modules(self) -> dict[str, nn.Module]:
        """What a checkpoint holds (under LoRA: each module's tensors but the shared teacher weights; under
        FSDP: views that save and load the whole networks)."""
        mods: dict[str, nn.Module] = {**self.trained(), "ema": self.ema.module}
        if self.bins is not None:
            mods["omega_bins"] = self.bins
        if self.shared is not None:
            from ..lora import WithoutShared

            mods = {name: WithoutShared(m, self.shared) for name, m in mods.items()}
        return {**mods, **(self.views or {})}

    @contextlib.contextmanager
    def whole_state(self) -> Iterator[None]:
        """Under FSDP, entered on every process around a checkpoint: the whole weights and optimiser states
        gathered (process 0 holds them: ``modules`` and ``optimizer_state`` give them inside), dropped after."""
        if self.views is None:
            yield
            return
        from .sharding import optimizer_state

        try:
            for view in self.views.values():
                view.gather()
            self.gathered = {k: optimizer_state(self.trained()[k], o) for k, o in self.optimizers.items()}
            yield
        finally:
            for view in self.views.values():
                view.drop()
            self.gathered = None

    def optimizer_state(self) -> dict[str, Any]:
        if self.views is not None:
            if self.gathered is None:
                raise RuntimeError("a sharded run's optimiser states are saved inside whole_state() on every process")
            return self.gathered
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_optimizer_state(self, name: str, state: dict[str, Any]) -> None:
        if self.views is not None:
            from .sharding import load_optimizer_state

            load_optimizer_state(self.trained()[name], self.optimizers[name], state)
        else:
            self.optimizers[name].load_state_dict(state)


def noise_range(cfg: DistillConfig, teacher: Teacher) -> tuple[float, float]:
    """The generator update's and the critic's sigma range: ``cfg.sigma_min/max``, each 0 = the teacher's."""
    lo, hi = cfg.sigma_min or teacher.sigma_min, cfg.sigma_max or teacher.sigma_max
    if lo >= hi:
        raise ConfigError(f"the noise range [{lo}, {hi}] is empty: a sigma_min or sigma_max left at 0 takes the "
                          f"teacher's ({teacher.sigma_min}, {teacher.sigma_max}); set both")
    return lo, hi


def generator_loss(cfg: DistillConfig) -> GeneratorLoss:
    """The generator's update as ``cfg`` sets it (``.needs_critic`` says whether a critic is trained)."""
    return GeneratorLoss(
        resolved_divergence(cfg), weighting=cfg.weighting,
        log_r_clip=(math.log(cfg.r_clip_min), math.log(cfg.r_clip_max)), normalize=cfg.omega_normalize,
        gan_weight=cfg.gan_weight, mode=cfg.generator_mode)


# a few-step student's last noise level when `student_sigma_min` is 0, in units of the teacher's sigma_data:
# on the ring (sigma_data 1.28) two steps ending at 0.2 left 0.019 of the mass off the modes, at 0.1 0.034, at
# 0.64 0.051 (3 seeds each, docs/benchmarks.md)
STUDENT_SIGMA_MIN_FRACTION = 0.16


def resolved_student_sigmas(cfg: DistillConfig, teacher: Teacher) -> tuple[float, ...]:
    """The student's noise levels for ``cfg`` (``student_sigma_min = 0``: the automatic last level, kept below
    sigma_g (half of it, for a sigma_g under the fraction) and in the loadable range)."""
    last = cfg.student_sigma_min or max(min(STUDENT_SIGMA_MIN_FRACTION * teacher.sigma_data, 0.5 * cfg.sigma_g), 1e-4)
    if cfg.student_steps > 1 and last >= cfg.sigma_g:
        raise ConfigError(f"a few-step student needs its last noise level below sigma_g = {cfg.sigma_g}; the "
                          f"automatic one is {last:g}: set student_sigma_min")
    return student_sigmas(cfg.student_steps, cfg.sigma_g, last)


def _adam(params: Any, lr: float, betas: tuple[float, float], device: torch.device) -> torch.optim.Adam:
    """Fused on the CPU, where the default is a Python loop over tensors (a third of its time on the ring's
    MLPs); CUDA keeps its default (foreach), and a torch without a fused CPU kernel (before 2.4) the loop."""
    params = list(params)
    if device.type == "cpu":
        try:
            return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
        except RuntimeError:
            pass
    return torch.optim.Adam(params, lr=lr, betas=betas)


def build(cfg: DistillConfig, teacher: Teacher, base: Precond, device: torch.device) -> Components:
    """Generator and fake score start as copies of ``base`` (the teacher's network, or its fit)."""
    # copies of a teacher's network: trainable whatever the teacher's own flags were
    sigmas = resolved_student_sigmas(cfg, teacher)
    shared = None
    if cfg.lora_rank:  # two adapter sets on the teacher's own frozen weights (lora.py)
        from ..lora import lora_copy, tensor_ids

        shared = tensor_ids(base)
        generator = Generator(lora_copy(base, cfg.lora_rank, cfg.lora_alpha), cfg.sigma_g, sigmas).to(device).train()
        fake_score = lora_copy(base, cfg.lora_rank, cfg.lora_alpha).to(device).train()
    else:
        generator = Generator.from_teacher(base, cfg.sigma_g, sigmas).to(device).requires_grad_(True).train()
        fake_score = copy.deepcopy(base).to(device).requires_grad_(True).train()
    sigma_min, sigma_max = noise_range(cfg, teacher)
    gsig = sigma_sampler(cfg, "generator_sigmas", sigma_min, sigma_max)
    gen_loss = generator_loss(cfg)
    critic = None
    if gen_loss.needs_critic:
        critic = CRITIC_HEADS.get(cfg.critic_head).make(teacher, base, fake_score, cfg).to(device)
    bins = None
    if cfg.omega_normalize == "bins":
        bins = OmegaBinNormalizer(sigma_min, sigma_max).to(device)
    ema = EMA(generator, cfg.ema_decay, share=base.buffers() if shared is not None else ())  # whole, before sharding
    views = None
    if cfg.parallel == "fsdp":  # the optimisers below then hold their parameters' shards
        from .sharding import FullState, shard

        shard([generator.denoiser.backbone, fake_score.backbone, *([critic] if critic is not None else [])], device)
        views = {"generator": FullState(generator), "fake_score": FullState(fake_score)}
        if critic is not None:
            views["critic"] = FullState(critic)
    betas = (cfg.beta1, cfg.beta2)
    opts = {"generator": _adam(_trainable(generator), cfg.lr_generator, betas, device),
            "fake_score": _adam(_trainable(fake_score), cfg.lr_fake_score, betas, device)}
    if critic is not None:
        opts["critic"] = _adam(_trainable(critic), cfg.lr_critic, betas, device)
    return Components(generator, fake_score, critic, ema, opts, gen_loss,
                      resolved_divergence(cfg, "critic_loss"), bins, gsig,
                      sigma_sampler(cfg, "fake_score_sigmas", sigma_min, sigma_max), shared, views)


def _trainable(net: nn.Module) -> list[nn.Parameter]:
    """What an optimiser steps: all of a fully trained network, the adapters of a LoRA one."""
    return [p for p in net.parameters() if p.requires_grad]


DIAGNOSTIC_STUDENTS, DIAGNOSTIC_QUERIES = 8192, 1024  # the students define q; the queries probe it


def variety_probe(teacher: Any, c: Components, seed: int) -> Callable[[], dict[str, float]]:
    """For an analytic teacher: ``probe()`` measures the fake score and the critic of the *current* generator
    against their exact targets (``metrics/exact.py``). Fixed noise (its own seeds, never the training
    stream), so the numbers are comparable over training and the same after a resume."""
    device = next(c.generator.parameters()).device
    z = sampling.seeded_noise(seed + 7, DIAGNOSTIC_STUDENTS + DIAGNOSTIC_QUERIES,
                              c.generator.latent_shape(teacher.shape), device)

    @torch.no_grad()
    def probe() -> dict[str, float]:
        x = c.generator(z)
        return variety_diagnostics(x[:DIAGNOSTIC_STUDENTS], x[DIAGNOSTIC_STUDENTS:], teacher, teacher.log_prob,
                                   c.fake_score, c.critic, generator=torch.Generator().manual_seed(seed + 8))

    return probe
