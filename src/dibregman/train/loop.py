"""Distillation: the checks before a run folder is made, the state built once (``state.py``), the run driver
stepping ``distill_step`` (``step.py``, ``driver.py``), the run's own evaluation, and the finished run's files
(docs/concepts.md, "The training loop")."""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import dist
from ..artifacts import save_generator
from ..grids import save_grid
from ..integrity import CheckpointError
from ..io import atomic_open, write_json
from ..metrics.images import make_evaluator
from ..metrics.toy import evaluate as evaluate_points
from ..run_folder import RunFolder
from ..sampling import batch_for, seeded_noise
from ..stats import append_jsonl, truncate_jsonl
from ..teachers import Teacher, check_teacher, class_names, exact_mixture, latent_codec, load_teacher, set_guidance
from ..teachers.objects import fingerprint, object_spec
from .checkpoint import check_any, list_checkpoints, load_latest, read_meta, save_checkpoint
from .components import (
    generator_loss,
    noise_range,
    reference_teacher_samples,
    resolved_student_sigmas,
    teacher_samples,
    true_samples,
    variety_probe,
)
from .conditions import Conditions, conditions_for
from .config import ConfigError, DistillConfig, check_resumable, eval_samples, to_dict, validate
from .driver import RunDriver
from .guard import holds_run_lock, keeps_caller_rng, prepare_run_dir
from .sigmas import sigma_sampler
from .state import DistillState, build_state
from .step import distill_step

GRID = 80  # images per sample grid: 8 per class for 10 classes


def _check_config(meta: dict, cfg: DistillConfig, out: Path) -> None:
    """A checkpoint's config against ``cfg``; where it records the student's noise levels, those are compared
    (``_check_levels``) rather than the ``student_sigma_min`` they were resolved from."""
    saved = meta.get("config", {})
    if isinstance(meta.get("student_sigmas"), list):
        saved = {**saved, "student_sigma_min": cfg.student_sigma_min}
    check_resumable(saved, cfg, str(out))


def _recorded(out: Path, key: str) -> list:
    """``key`` of each readable checkpoint's meta (unreadable ones are damage, for ``load_latest``; checkpoints
    from before an entry was recorded give None)."""
    values = []
    for path in list_checkpoints(out / RunFolder.CHECKPOINTS):
        try:
            values.append(read_meta(path).get(key))
        except CheckpointError:
            continue
    return values


def _check_teacher(out: Path, digest: str) -> None:
    """The teacher's fingerprint recorded by the run's checkpoints against the one loaded now: a teacher folder
    retrained in place, or a py: function that builds another network, would silently change the target."""
    for saved in _recorded(out, "teacher_fingerprint"):
        if isinstance(saved, str) and saved != digest:
            raise ConfigError(f"cannot resume {out}: its teacher has changed since the run started (fingerprint "
                              f"{saved}, now {digest}: other weights, or other answers of a function teacher); "
                              "resume with the teacher it was distilled from, or use another --out for a new run")


def _check_levels(out: Path, levels: tuple[float, ...]) -> None:
    """The student's noise levels recorded by the run's checkpoints against this config's: the automatic last
    level is resolved from the teacher by code that may change between versions."""
    for saved in _recorded(out, "student_sigmas"):
        numbers = isinstance(saved, list) and all(isinstance(v, int | float) for v in saved)
        if numbers and [float(v) for v in saved] != list(levels):
            raise ConfigError(f"cannot resume {out}: its student was trained at noise levels {saved}, this config "
                              f"gives {list(levels)} (the automatic last level may differ between versions); set "
                              f"student_sigma_min to {saved[-1]} to resume it, or use another --out for a new run")


@holds_run_lock
@keeps_caller_rng
def distill(cfg: DistillConfig, resume: bool = False, progress: bool | None = None,
            teacher: Teacher | None = None, on_finish: Callable[[Path], None] | None = None) -> Path:
    """Distill ``cfg.teacher`` (or the object ``teacher``, which the run records as ``object:<name>``)
    into a one-step (or ``student_steps``-step) generator; returns the run folder.

    The folder gets ``config.json``, ``stats.jsonl``, ``metrics.jsonl``, ``checkpoints/``, and at the end
    ``generator/``, ``samples.npz`` and ``summary.json``; then ``on_finish(folder)`` runs on process 0 before
    the folder's lock is released (``db.distill`` writes the report there, ``report.py``).
    ``resume=True`` continues from the newest valid checkpoint, bit-identically on CPU.
    """
    if teacher is not None:  # checked before anything is made; recorded by name, its fingerprint below
        spec = object_spec(check_teacher(teacher))
        cfg = cfg if cfg.teacher == spec else dataclasses.replace(cfg, teacher=spec)
    validate(cfg)  # once: a config the CLI or the API validated is not checked again
    dist.init()  # under torchrun: join the process group; rank 0 alone writes files
    device = dist.resolve_device(cfg.device)
    # a bad teacher fails before the run folder is made
    teacher = teacher if teacher is not None else load_teacher(cfg.teacher)
    digest = fingerprint(teacher)
    teacher = teacher.to(device)
    conds = _checked_conditions(cfg, teacher, device)
    # process 0 makes and locks the folder; if it cannot, the others stop quietly (dist.PeerStopped)
    out = dist.on_main(lambda: prepare_run_dir(Path(cfg.out), resume), Path(cfg.out))
    resuming = resume and bool(list_checkpoints(out / RunFolder.CHECKPOINTS))  # which one loads is decided below
    if resuming:  # refuse a changed config now, before the fit and the teacher pool cost anything
        check_any(out / RunFolder.CHECKPOINTS, lambda meta: _check_config(meta, cfg, out))
        _check_levels(out, resolved_student_sigmas(cfg, teacher))
        _check_teacher(out, digest)
    try:
        s = build_state(cfg, teacher, conds, out, device, dist.local_slice(cfg.batch_size), digest, resuming)
        ev = Evaluation.build(s)
        loaded = load_latest(out / RunFolder.CHECKPOINTS, s.c.modules(), lambda meta: _check_config(meta, cfg, out),
                             s.restore) if resuming else None
        if loaded is not None:
            s.guard.resumed_from = loaded[0]  # a non-finite first step then says the checkpoint may be damaged
        driver = RunDriver(out, cfg.steps, cfg.log_every, cfg.checkpoint_every, progress=progress,
                           tensorboard=cfg.tensorboard, desc=f"distill {s.c.generator_loss.divergence.name}",
                           logs=(RunFolder.STATS, RunFolder.METRICS))
        driver.begin(s.step, to_dict(cfg), resume, loaded[0] if loaded is not None else None)

        def update(_: int) -> None:
            for record in distill_step(s).logs:
                driver.stats.add(record)

        def extra(step: int, logging: bool) -> dict:
            values = {"nonfinite/skipped": s.guard.skipped} if logging else {}  # equal on every process
            if ev.diagnose is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                values.update(ev.diagnose())  # exact fake-score and ratio errors (every process: same numbers)
            return values

        def save(step: int) -> None:
            save_checkpoint(out / RunFolder.CHECKPOINTS, step, s.c.modules(), *s.checkpoint(), cfg.keep_checkpoints)

        driver.run(s.step, update, save, extra=extra, after=ev.during_training, check=s.guard.check,
                   whole_state=s.c.whole_state)
        if not dist.is_main():
            return out
        _finish(s, ev, driver.step_times)
        if on_finish is not None:  # still holding the run folder's lock
            on_finish(out)
        return out
    finally:
        if cfg.parallel == "fsdp":
            from .sharding import release

            release()  # a process group of one that sharding made


def _checked_conditions(cfg: DistillConfig, teacher: Teacher, device: torch.device) -> Conditions:
    """The teacher's conditions (labels, encoded prompts), after the checks that need the loaded teacher: all
    before the run folder is made."""
    try:
        set_guidance(teacher, cfg.guidance)
    except ValueError as e:
        raise ConfigError(f"{cfg.teacher}: {e}") from None
    network = teacher.network
    if math.isinf(cfg.sigma_g) and (network is None or network.parameterisation.at_pure_noise() is None):
        kind = "an analytic teacher (its students are EDM MLPs)" if network is None else \
            f"a {network.parameterisation.kind} network"
        raise ConfigError(f"sigma_g = inf starts the student from pure noise, which only a flow-matching teacher's "
                          f"network has a limit at; {cfg.teacher} has {kind}: give a finite sigma_g")
    sigma_range = noise_range(cfg, teacher)  # an empty sigma range fails here
    for key in ("generator_sigmas", "fake_score_sigmas"):  # and a sampler of your own that draws no noise levels
        sigma_sampler(cfg, key, *sigma_range)
    conds = conditions_for(teacher, cfg.prompts, device)
    if conds.text and cfg.critic_data == "data" and generator_loss(cfg).needs_critic:
        try:  # the critic's real images are paired with prompts asking for their class
            conds.for_classes(torch.arange(max(conds.num_classes, 1)))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.lora_rank:
        from ..lora import require_peft

        if teacher.network is None:
            raise ConfigError(f"lora_rank puts adapters on the teacher's network; {cfg.teacher} has none (an "
                              "analytic teacher's students start from a small fitted MLP: train it fully, "
                              "lora_rank = 0)")
        try:
            require_peft()
        except ImportError as e:
            raise ConfigError(str(e)) from None
    if len(teacher.shape) == 3 and teacher.network is None:  # only point teachers get a fitted MLP instead
        raise ConfigError(f"{cfg.teacher} is an image teacher without a network for the students to start from; "
                          "distill a teacher trained with `dibregman train-teacher` (net:<folder>) or a diffusers "
                          "folder (diffusers:<folder>)")
    if len(teacher.shape) == 3 and cfg.classifier not in ("auto", "none", "inception"):
        from .classifier import load_classifier

        load_classifier(cfg.classifier)  # a bad classifier folder fails here
    return conds


@dataclass
class Evaluation:
    """The run's own evaluation: the EMA generator's samples at fixed noise (``seeded_noise(seed)``, what
    ``dibregman eval --seed <seed>`` draws) scored against held-out data or the exact law."""
    s: DistillState
    reference: torch.Tensor  # data (or the teacher's samples, for a teacher that knows none), decoded
    z: torch.Tensor
    idx: torch.Tensor | None  # conditions, cycling
    y: torch.Tensor | None  # what label accuracy (prompt adherence for text) is measured against
    score: Callable[..., dict[str, float]] | None
    gmm: Any
    diagnose: Callable[[], dict[str, float]] | None
    codec: Any

    @classmethod
    def build(cls, s: DistillState) -> Evaluation:
        cfg, teacher, conds = s.cfg, s.teacher, s.conds
        n = eval_samples(cfg.eval_samples, teacher.shape)
        reference = true_samples(teacher, n, cfg.seed + 2, split="test", classes=conds.num_classes)
        if reference is None:
            reference = teacher_samples(teacher, n, cfg.seed + 2, s.device, conds, decode=True).cpu()
        idx = conds.cycle(n)
        score = make_evaluator(teacher, reference, cfg.classifier) if len(teacher.shape) == 3 else None
        gmm = exact_mixture(teacher)
        return cls(s, reference, seeded_noise(cfg.seed, n, s.latent), idx, conds.classes(idx), score, gmm,
                   variety_probe(gmm, s.c, cfg.seed) if gmm is not None else None, latent_codec(teacher))

    @property
    def images(self) -> bool:
        return len(self.s.teacher.shape) == 3

    def __call__(self, x: torch.Tensor) -> dict[str, float]:
        if self.images:  # without a feature network an image run reports no numbers (make_evaluator said why)
            return self.score(x, self.y) if self.score is not None else {}
        return evaluate_points(x, self.reference, self.gmm)

    @torch.no_grad()
    def sample(self, generator: torch.nn.Module | None = None) -> torch.Tensor:
        """``generator``'s (by default the EMA's) samples of the evaluation noise, decoded, on the CPU (batches
        bounded in size)."""
        s = self.s
        generator = s.c.ema.module if generator is None else generator
        zs = self.z.split(batch_for(s.latent))
        ys = self.idx.split(batch_for(s.latent)) if self.idx is not None else (None,) * len(zs)
        xs = (generator(z.to(s.device), s.conds.lookup(y, s.device)) for z, y in zip(zs, ys, strict=True))
        return torch.cat([(self.codec.decode(x) if self.codec is not None else x).cpu() for x in xs])

    def during_training(self, step: int, _row: dict | None) -> dict | None:
        """Every ``eval_every`` steps but the last (that one is the final table): a metrics row and a grid."""
        cfg = self.s.cfg
        if step % cfg.eval_every or step >= cfg.steps:
            return None
        self.s.guard.check()  # on every process (the same flags): a non-finite generator is not evaluated
        if not dist.is_main():
            return None
        student = self.sample()
        metrics = self(student)
        append_jsonl(self.s.out / RunFolder.METRICS, {"step": step, **metrics})
        if self.images:  # a grid at fixed seeds (and labels) per evaluation
            save_grid(self.s.out / "grids" / f"step-{step:08d}.png", student[:GRID],
                      nrow=max(self.s.conds.num_classes, 8))
        return {k: v for k, v in metrics.items() if k in ("mode_tv", "w1", "energy")}


def _finish(s: DistillState, ev: Evaluation, step_times: list[float]) -> Path:
    """Rank 0, after the last step: the EMA generator, its samples beside the teacher's, a summary."""
    cfg, teacher, conds, out = s.cfg, s.teacher, s.conds, s.out
    info = {"teacher": cfg.teacher, "divergence": s.c.generator_loss.divergence.name, "shape": list(teacher.shape),
            "num_classes": teacher.num_classes, "steps": s.step, "guidance": cfg.guidance}
    if conds.text:  # what `dibregman sample --prompt` needs to encode new prompts for this generator
        info["text"] = dict(teacher.text)
        info["class_names"] = list(class_names(teacher))
    ema = s.c.ema.module
    if s.c.shared is not None:  # a LoRA student is the plain network, its adapters merged in: saved and scored
        from ..lora import merged

        ema = merged(ema)
    save_generator(out / RunFolder.GENERATOR, ema, info, codec=ev.codec)
    t0 = time.perf_counter()
    student = ev.sample(ema)
    student_s = time.perf_counter() - t0
    final = ev(student)
    truncate_jsonl(out / RunFolder.METRICS, s.step - 1)  # finishing again (a resumed finished run): one final row
    append_jsonl(out / RunFolder.METRICS, {"step": s.step, **final})
    ref_teacher, teacher_s = reference_teacher_samples(teacher, cfg, s.device, conds)
    with atomic_open(out / RunFolder.SAMPLES) as f:
        extra = {"labels": ev.y.numpy()} if ev.y is not None else {}
        np.savez(f, student=student.numpy(), teacher=ref_teacher.numpy(), data=ev.reference.numpy(), **extra)
    if ev.images:
        save_grid(out / "samples_student.png", student[:GRID], nrow=max(conds.num_classes, 8))
        save_grid(out / "samples_teacher.png", ref_teacher[:GRID], nrow=max(conds.num_classes, 8))
    write_json(out / RunFolder.SUMMARY, {
        "name": out.name, "divergence": info["divergence"], "metrics": final, "nfe": s.c.generator.steps,
        "eval_samples": len(ev.z), "protocol": ev.score.protocol if ev.score is not None else None,
        "teacher_metrics": ev(ref_teacher),
        "step_time_s": statistics.median(step_times) if step_times else None, "nonfinite_skipped": s.guard.skipped,
        "student_sample_s": student_s, "teacher_sample_s": teacher_s})
    return out
