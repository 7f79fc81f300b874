"""``DistillState``: everything a distillation step reads and changes (networks, optimisers, EMA, the training
random stream, the step), built once from the teacher and the config by ``build_state``; and what of it a
checkpoint holds.

The seed plan (every stream derives from ``cfg.seed``): the global torch RNG at ``seed`` initialises the
networks; ``g`` (a CPU generator at ``seed``) draws every training batch, noise, sigma and condition in a
fixed order; the teacher pool and DMD's regression pairs are the teacher's samples of ``seed + 1``, the
evaluation's reference ``seed + 2``, the point teacher's fit ``seed + 3``, the final table's teacher row
``seed + 5``; the evaluation noise is ``sampling.seeded_noise(seed, ...)`` (what ``dibregman eval --seed``
draws) and the exact diagnostics use ``seed + 7`` and ``seed + 8``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import build_precond
from ..nets import checkpointable
from ..schedules import SigmaSampler
from ..teachers import Teacher, latent_codec
from .checkpoint import entry
from .components import Components, balanced_labels, build, fitted_start, teacher_samples, true_samples
from .conditions import Conditions
from .config import ConfigError, DistillConfig, to_dict
from .guard import NonFiniteGuard

Tensor = torch.Tensor


@dataclass
class DistillState:
    cfg: DistillConfig
    teacher: Teacher
    c: Components
    conds: Conditions
    g: torch.Generator  # every random draw of the training steps
    device: torch.device
    local: slice  # this process's share of each global batch
    amp: contextlib.AbstractContextManager
    guard: NonFiniteGuard
    out: Path
    teacher_digest: str  # recorded in every checkpoint: a resume must see the same teacher
    pool: Tensor | None = None  # the critic's "real" samples
    pool_idx: Tensor | None = None  # and their conditions
    pairs: tuple[Tensor, Tensor, Tensor | None] | None = None  # DMD's regression pairs: noise, sample, condition
    step: int = 0

    @property
    def latent(self) -> tuple[int, ...]:
        """A sample's noise shape, or ``[steps, *shape]`` for a few-step student."""
        return self.c.generator.latent_shape(self.teacher.shape)

    # Every process draws the global batch's randomness from g and keeps its slice: the same run with
    # any number of processes (and with one, exactly the single-process draws).
    def draw(self, like: tuple[int, ...] | None = None) -> Tensor:
        like = self.teacher.shape if like is None else like
        return torch.randn((self.cfg.batch_size, *like), generator=self.g)[self.local].to(self.device)

    def indices(self, n: int) -> Tensor:
        """Uniform indices into ``n`` rows (a pool), this process's share; on the CPU, where the pools'
        conditions are (reading them back from a GPU would make the step wait for it)."""
        return torch.randint(n, (self.cfg.batch_size,), generator=self.g)[self.local]

    def sigmas(self, sampler: SigmaSampler) -> Tensor:
        return sampler(self.cfg.batch_size, self.g)[self.local].to(self.device)

    def condition(self) -> Tensor | None:
        """Uniform labels or prompts (no draw for an unconditional teacher)."""
        idx = self.conds.draw(self.cfg.batch_size, self.g)
        return self.conds.lookup(idx[self.local], self.device) if idx is not None else None

    def student_batch(self, y: Tensor | None) -> Tensor:
        """A batch of the student's samples; a few-step student's after a random number of its steps (the
        same on every process), the earlier ones without gradients (DMD2's backward simulation)."""
        steps = self.c.generator.steps  # one step: no draw, so one-step runs keep their random stream
        upto = int(torch.randint(steps, (1,), generator=self.g)) + 1 if steps > 1 else None
        return self.c.generator(self.draw(self.latent), y, upto=upto)

    def checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The tensors (``state.pt``) and the JSON (``state.json``) a checkpoint holds besides the weights."""
        state = {"optimizers": self.c.optimizer_state(), "rng": self.g.get_state(),
                 "torch_rng": torch.get_rng_state()}
        meta = {"config": to_dict(self.cfg), "nonfinite_skipped": self.guard.skipped,
                "ema_updates": self.c.ema.num_updates, "student_sigmas": list(self.c.generator.sigmas),
                "teacher_fingerprint": self.teacher_digest}
        return state, meta

    def restore(self, state: dict, meta: dict) -> None:
        """The inverse of ``checkpoint``; a missing or mistyped entry is damage (``load_latest``)."""
        for name in self.c.optimizers:
            self.c.load_optimizer_state(name, entry(entry(state, "optimizers", dict, "state.pt"), name, dict,
                                                    "state.pt"))
        self.g.set_state(entry(state, "rng", torch.Tensor, "state.pt"))
        torch.set_rng_state(entry(state, "torch_rng", torch.Tensor, "state.pt"))
        self.step, self.guard.skipped = meta["step"], entry(meta, "nonfinite_skipped", int, "state.json", 0)
        self.c.ema.num_updates = entry(meta, "ema_updates", int, "state.json")


def build_state(cfg: DistillConfig, teacher: Teacher, conds: Conditions, out: Path, device: torch.device,
                local: slice, teacher_digest: str, resuming: bool) -> DistillState:
    """The networks both students start from and everything built from the config (before a resume loads its
    checkpoint into them)."""
    torch.manual_seed(cfg.seed)  # network initialisations
    g = torch.Generator().manual_seed(cfg.seed)
    if teacher.network is not None:
        base = teacher.network
    elif not resuming:
        base = fitted_start(teacher, cfg, device)
    else:  # its fitted weights are in the checkpoint; only the shape is needed
        base = build_precond({"dim": teacher.shape[0], "hidden": cfg.hidden, "depth": cfg.depth}, teacher.sigma_data)
    c = build(cfg, teacher, base, device)
    if cfg.grad_checkpointing:
        for net in (c.generator.denoiser.backbone, c.fake_score.backbone):
            if not checkpointable(net):
                raise ConfigError("grad_checkpointing works on diffusers U-Net backbones (our UNet, a diffusers "
                                  "teacher's); this network does not support it")
            net.unet.enable_gradient_checkpointing()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    guard = NonFiniteGuard(cfg.nonfinite, deferred=True)  # strict: checked before each log row and checkpoint
    s = DistillState(cfg, teacher, c, conds, g, device, local, amp, guard, out, teacher_digest)
    _pools(s)
    if cfg.compile:  # after the pools: the teacher's samples in them are the eager teacher's, compiled or not
        _compile(c, teacher)
    return s


def _compile(c: Components, teacher: Teacher) -> None:
    """``torch.compile`` of every network a step calls, in place (``nn.Module.compile``: parameters, state dicts,
    checkpoints and the EMA's copy are untouched), and of the fake score's one-pass forward with features (the
    critic head on the fake score reads it). The first calls of each shape compile."""
    # a student from pure noise calls its backbone through Precond.from_pure_noise, not the denoiser's forward
    student = c.generator.denoiser.backbone if math.isinf(c.generator.sigma_g) else c.generator.denoiser
    for net in (student, c.fake_score, c.critic, teacher.network):
        if net is not None:
            net.compile()
    if hasattr(c.fake_score, "forward_with_features"):
        c.fake_score.forward_with_features = torch.compile(c.fake_score.forward_with_features)


def _pools(s: DistillState) -> None:
    """The critic's real samples and DMD's regression pairs (both of ``seed + 1``: made once when both are used)."""
    cfg, teacher, conds, device = s.cfg, s.teacher, s.conds, s.device
    n_pairs = cfg.regression_pairs or cfg.teacher_pool
    if cfg.regression_weight > 0:  # unit noise, and the teacher's ODE sample made from it
        x_pairs, z_pairs = teacher_samples(teacher, n_pairs, cfg.seed + 1, device, conds, return_noise=True)
        s.pairs = (z_pairs.to(device), x_pairs.to(device), conds.cycle(len(x_pairs)))
    if s.c.critic is None:
        return
    if cfg.critic_data == "teacher":
        shared = s.pairs is not None and n_pairs == cfg.teacher_pool
        pool = s.pairs[1] if shared else teacher_samples(teacher, cfg.teacher_pool, cfg.seed + 1, device, conds)
        s.pool_idx = conds.cycle(len(pool))
    else:
        pool = true_samples(teacher, cfg.teacher_pool, cfg.seed + 1, classes=conds.num_classes)
        if pool is None:
            raise ConfigError("critic_data = 'data' needs a teacher that knows its data; use critic_data = teacher")
        codec = latent_codec(teacher)
        if codec is not None:  # the critic, like the students, works on the VAE's scaled latents
            pool = codec.to(device).encode(pool.to(device))
        # real images in class order i % classes, each paired with a condition asking for its class
        s.pool_idx = conds.for_classes(balanced_labels(len(pool), conds.num_classes))
    s.pool = pool.to(device)
