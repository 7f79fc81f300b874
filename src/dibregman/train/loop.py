"""The distillation loop: one function in commented phases (docs/concepts.md, "The training loop")."""

from __future__ import annotations

import dataclasses
import math
import signal
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import dist
from ..artifacts import build_precond, save_generator
from ..grids import save_grid
from ..io import atomic_open, write_json
from ..losses import critic_loss, fake_score_loss, regression_loss
from ..metrics.images import make_evaluator
from ..metrics.toy import evaluate as evaluate_points
from ..sampling import batch_for, seeded_noise
from ..schedules import SigmaSampler
from ..stats import Stats, append_jsonl, truncate_jsonl
from ..teachers import Teacher, check_teacher, exact_mixture, latent_codec, load_teacher
from ..teachers.objects import fingerprint, object_spec
from .checkpoint import CheckpointError, check_any, entry, list_checkpoints, load_latest, read_meta, save_checkpoint
from .components import (
    balanced_labels,
    build,
    fitted_start,
    generator_loss,
    noise_range,
    reference_teacher_samples,
    resolved_student_sigmas,
    teacher_samples,
    true_samples,
    variety_probe,
)
from .conditions import conditions_for
from .config import ConfigError, DistillConfig, check_resumable, eval_samples, to_dict, validate
from .guard import Interrupted, NonFiniteGuard, deferred_signals, holds_run_lock, keeps_caller_rng, prepare_run_dir

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
    for path in list_checkpoints(out / "checkpoints"):
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
            teacher: Teacher | None = None) -> Path:
    """Distill ``cfg.teacher`` (or the object ``teacher``, which the run records as ``object:<name>``)
    into a one-step (or ``student_steps``-step) generator; returns the run folder.

    The folder gets ``config.json``, ``stats.jsonl``, ``metrics.jsonl``, ``checkpoints/``, and at the end
    ``generator/``, ``samples.npz``, ``summary.json`` and ``report.md``. ``resume=True`` continues from
    the newest valid checkpoint, bit-identically on CPU.
    """
    validate(cfg)
    if teacher is not None:  # checked before anything is made; recorded by name, its fingerprint below
        cfg = dataclasses.replace(cfg, teacher=object_spec(check_teacher(teacher)))
    dist.init()  # under torchrun: join the process group; rank 0 alone writes files
    main = dist.is_main()
    device = dist.resolve_device(cfg.device)
    local = dist.local_slice(cfg.batch_size)  # this process's share of every global batch
    # a bad teacher fails before the run folder is made
    teacher = teacher if teacher is not None else load_teacher(cfg.teacher)
    teacher_digest = fingerprint(teacher)  # recorded in every checkpoint: a resume must see the same teacher
    teacher = teacher.to(device)
    if cfg.guidance != 1.0 and (not (teacher.num_classes or getattr(teacher, "text", None))
                                or not hasattr(teacher, "guidance")):
        raise ConfigError(f"guidance = {cfg.guidance} needs a class- or text-conditional network teacher; "
                          f"{cfg.teacher} is not one (leave guidance at 1)")
    if hasattr(teacher, "guidance"):  # also 1: a teacher object may come from a run with another scale
        teacher.guidance = cfg.guidance
    noise_range(cfg, teacher)  # an empty sigma range fails before the run folder is made
    conds = conditions_for(teacher, cfg.prompts, device)  # read and encoded before the run folder is made
    if conds.text and cfg.critic_data == "data" and generator_loss(cfg).needs_critic:
        try:  # the critic's real images are paired with prompts asking for their class
            conds.for_classes(torch.arange(max(conds.num_classes, 1)))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if len(teacher.shape) == 3 and teacher.network is None:  # only point teachers get a fitted MLP instead
        raise ConfigError(f"{cfg.teacher} is an image teacher without a network for the students to start from; "
                          "distill a teacher trained with `dibregman train-teacher` (net:<folder>) or a diffusers "
                          "folder (diffusers:<folder>)")
    if len(teacher.shape) == 3 and cfg.classifier not in ("auto", "none", "inception"):
        from .classifier import load_classifier

        load_classifier(cfg.classifier)  # a bad classifier folder fails before the run folder is made
    # process 0 makes and locks the folder; if it cannot, the others stop quietly (dist.PeerStopped)
    out = dist.on_main(lambda: prepare_run_dir(Path(cfg.out), resume), Path(cfg.out))
    resuming = resume and bool(list_checkpoints(out / "checkpoints"))  # which one loads is decided below
    if resuming:  # refuse a changed config now, before the fit and the teacher pool cost anything
        check_any(out / "checkpoints", lambda meta: _check_config(meta, cfg, out))
        _check_levels(out, resolved_student_sigmas(cfg, teacher))
        _check_teacher(out, teacher_digest)
    torch.manual_seed(cfg.seed)  # network initialisations
    g = torch.Generator().manual_seed(cfg.seed)  # every random draw of the loop comes from g

    # Phase 0: the network both students start from, then everything else built from the config.
    if teacher.network is not None:
        base = teacher.network
    elif not resuming:
        base = fitted_start(teacher, cfg, device)
    else:  # its fitted weights are in the checkpoint; only the shape is needed
        base = build_precond({"dim": teacher.shape[0], "hidden": cfg.hidden, "depth": cfg.depth}, teacher.sigma_data)
    c = build(cfg, teacher, base, device)
    if cfg.grad_checkpointing:
        for net in (c.generator.denoiser.backbone, c.fake_score.backbone):
            if not hasattr(net, "unet"):
                raise ConfigError("grad_checkpointing works on diffusers U-Net backbones (our UNet, a diffusers "
                                  "teacher's); this network does not support it")
            net.unet.enable_gradient_checkpointing()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    shape, bsz, num_classes = teacher.shape, cfg.batch_size, conds.num_classes
    images = len(shape) == 3
    n_eval = eval_samples(cfg.eval_samples, shape)
    codec = latent_codec(teacher)  # a latent teacher: students make latents, people and metrics see images
    reference = true_samples(teacher, n_eval, cfg.seed + 2, split="test", classes=num_classes)
    if reference is None:
        reference = teacher_samples(teacher, n_eval, cfg.seed + 2, device, conds, decode=True).cpu()
    pool, pool_idx, pairs = None, None, None
    if cfg.regression_weight > 0:  # DMD's regression pairs: unit noise, and the teacher's ODE sample made from it
        x_pairs, z_pairs = teacher_samples(teacher, cfg.teacher_pool, cfg.seed + 1, device, conds, return_noise=True)
        pairs = (z_pairs.to(device), x_pairs.to(device), conds.cycle(len(x_pairs)))
    if c.critic is not None:
        if cfg.critic_data == "teacher":  # the same samples as the pairs' (seed + 1): made once when both are used
            pool = pairs[1] if pairs is not None else teacher_samples(teacher, cfg.teacher_pool, cfg.seed + 1,
                                                                      device, conds)
            pool_idx = conds.cycle(len(pool))
        else:
            pool = true_samples(teacher, cfg.teacher_pool, cfg.seed + 1, classes=num_classes)
            if pool is None:
                raise ConfigError("critic_data = 'data' needs a teacher that knows its data; use critic_data = teacher")
            if codec is not None:  # the critic, like the students, works on the VAE's scaled latents
                pool = codec.to(device).encode(pool.to(device))
            # real images in class order i % classes, each paired with a condition asking for its class
            pool_idx = conds.for_classes(balanced_labels(len(pool), num_classes))
        pool = pool.to(device)
    latent = c.generator.latent_shape(shape)  # a sample's shape, or [steps, *shape] for a few-step student
    eval_z = seeded_noise(cfg.seed, n_eval, latent)  # the noise `dibregman eval --seed <seed>` draws too
    eval_idx = conds.cycle(n_eval)
    eval_y = conds.classes(eval_idx)  # what label accuracy (prompt adherence for text) is measured against
    score = make_evaluator(teacher, reference, cfg.classifier) if images else None
    gmm = exact_mixture(teacher)
    diagnose = variety_probe(gmm, c, cfg.seed) if gmm is not None else None

    def evaluate(x: torch.Tensor) -> dict[str, float]:
        if images:  # without a feature network an image run reports no numbers (make_evaluator said why)
            return score(x, eval_y) if score is not None else {}
        return evaluate_points(x, reference, gmm)

    step, guard = 0, NonFiniteGuard(cfg.nonfinite)

    def restore(state: dict, meta: dict) -> None:  # a missing or mistyped entry is damage (load_latest)
        nonlocal step
        for name, opt in c.optimizers.items():
            opt.load_state_dict(entry(entry(state, "optimizers", dict, "state.pt"), name, dict, "state.pt"))
        g.set_state(entry(state, "rng", torch.Tensor, "state.pt"))
        torch.set_rng_state(entry(state, "torch_rng", torch.Tensor, "state.pt"))
        step, guard.skipped = meta["step"], entry(meta, "nonfinite_skipped", int, "state.json", 0)
        c.ema.num_updates = entry(meta, "ema_updates", int, "state.json")

    loaded = load_latest(out / "checkpoints", c.modules(), lambda meta: _check_config(meta, cfg, out),
                         restore) if resuming else None
    if loaded is not None:
        guard.resumed_from = loaded[0]  # a non-finite first step then says the checkpoint may be damaged
    if main:
        if resume:  # rows logged after the checkpoint (all of them, if none loaded) belong to no run now
            for log in ("stats.jsonl", "metrics.jsonl"):
                truncate_jsonl(out / log, step)
        if loaded is not None:
            print(f"resuming from {loaded[0]} (step {step})", file=sys.stderr)
        write_json(out / "config.json", to_dict(cfg))

    # Every process draws the global batch's randomness from g and keeps its slice: the same run with
    # any number of processes (and with one, exactly the old single-process draws).
    def draw(like: tuple[int, ...] = shape) -> torch.Tensor:
        return torch.randn((bsz, *like), generator=g)[local].to(device)

    def student_batch(y: torch.Tensor | None) -> torch.Tensor:
        """A batch of the student's samples; a few-step student's after a random number of its steps (the
        same on every process), the earlier ones without gradients (DMD2's backward simulation)."""
        steps = c.generator.steps  # one step: no draw, so one-step runs keep their random stream
        upto = int(torch.randint(steps, (1,), generator=g)) + 1 if steps > 1 else None
        return c.generator(draw(latent), y, upto=upto)

    def sigmas(sampler: SigmaSampler) -> torch.Tensor:
        return sampler(bsz, g)[local].to(device)

    def condition() -> torch.Tensor | None:  # uniform labels or prompts (no draw for an unconditional teacher)
        idx = conds.draw(bsz, g)
        return conds.lookup(idx[local], device) if idx is not None else None

    def checkpoint() -> None:
        state = {"optimizers": c.optimizer_state(), "rng": g.get_state(), "torch_rng": torch.get_rng_state()}
        meta = {"config": to_dict(cfg), "nonfinite_skipped": guard.skipped, "ema_updates": c.ema.num_updates,
                "student_sigmas": list(c.generator.sigmas), "teacher_fingerprint": teacher_digest}
        if main:
            save_checkpoint(out / "checkpoints", step, c.modules(), state, meta, cfg.keep_checkpoints)
        dist.barrier()

    @torch.no_grad()
    def sample_ema() -> torch.Tensor:
        size = batch_for(latent)  # bounded activations for image networks
        zs = eval_z.split(size)
        ys = eval_idx.split(size) if eval_idx is not None else (None,) * len(zs)
        xs = (c.ema.module(z.to(device), conds.lookup(y, device)) for z, y in zip(zs, ys, strict=True))
        return torch.cat([(codec.decode(x) if codec is not None else x).cpu() for x in xs])

    stats = Stats(out / "stats.jsonl", write=main, tensorboard=out / "tensorboard" if cfg.tensorboard else None)
    step_times: list[float] = []
    show = (sys.stderr.isatty() if progress is None else progress) and main
    bar = tqdm(total=cfg.steps, initial=step, disable=not show, desc=f"distill {c.generator_loss.divergence.name}")
    with deferred_signals() as interrupt:
        while step < cfg.steps:
            t0 = time.perf_counter()
            # Phase 1: K updates of the fake score (denoising student samples) and of the critic.
            for _ in range(cfg.fake_score_steps):
                y = condition()
                with torch.no_grad(), amp:
                    x = student_batch(y).float()
                if c.generator_loss.mode == "score":  # the discriminator form never asks the fake score
                    sigma = sigmas(c.fake_score_sigmas)
                    with amp:
                        loss = fake_score_loss(c.fake_score, x, sigma, draw(), y).float().mean()
                    guard.step(c.optimizers["fake_score"], loss, c.fake_score, "fake_score", step + 1,
                               cfg.grad_clip, out)
                    stats.add({"loss/fake_score": loss})
                if c.critic is not None:
                    idx = torch.randint(len(pool), (bsz,), generator=g)[local].to(device)
                    sigma = sigmas(c.generator_sigmas)
                    y_pool = conds.lookup(pool_idx[idx.cpu()], device) if pool_idx is not None else None
                    with amp:
                        loss = critic_loss(c.critic, pool[idx], x, sigma, draw(), draw(), c.dre, y, y_pool)
                        loss = loss.float().mean()
                    guard.step(c.optimizers["critic"], loss, c.critic, "critic", step + 1, cfg.grad_clip, out)
                    stats.add({"loss/critic": loss})

            # Phase 2: one generator update along omega(r) * (D_F - D_T).
            if cfg.lr_schedule == "cosine":  # set from the step alone: a resumed run gets the same rates
                for group in c.optimizers["generator"].param_groups:
                    group["lr"] = cfg.lr_generator * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            y = condition()
            with amp:
                x = student_batch(y)
                sigma = sigmas(c.generator_sigmas)
                res = c.generator_loss(x, sigma, draw(), teacher, c.fake_score, c.critic, cond=y, bins=c.bins,
                                       reduce_sum=dist.all_reduce_sum)
                loss = res.loss.float().mean()
                if pairs is not None:
                    j = torch.randint(len(pairs[0]), (bsz,), generator=g)[local].to(device)
                    y_reg = conds.lookup(pairs[2][j.cpu()], device) if pairs[2] is not None else None
                    reg = regression_loss(c.generator.first_step, pairs[0][j], pairs[1][j], y_reg).float().mean()
                    loss = loss + cfg.regression_weight * reg
                    stats.add({"loss/regression": reg})
            guard.step(c.optimizers["generator"], loss, c.generator, "generator", step + 1, cfg.grad_clip, out)

            # Phase 3: EMA of the generator.
            c.ema.update(c.generator)
            step += 1
            step_times.append(time.perf_counter() - t0)

            # Phase 4: maintenance: stats (tensors, read once per log window), evaluation, checkpoints.
            stats.add({"loss/generator": loss, "ratio/omega_mean": res.omega.mean(), "ratio/omega_min": res.omega.min(),
                       "ratio/omega_max": res.omega.max(), "ratio/weight_mean": res.weight.mean(),
                       "time/step_s": step_times[-1]})
            if res.log_r is not None:
                stats.add({"ratio/log_r_mean": res.log_r.mean(), "ratio/log_r_min": res.log_r.min(),
                           "ratio/log_r_max": res.log_r.max()})
            if diagnose is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                stats.add(diagnose())  # exact fake-score and ratio errors (every process: same numbers)
            if step % cfg.log_every == 0 or step == cfg.steps:
                stats.add({"nonfinite/skipped": guard.skipped})  # equal on every process: its mean is itself
                stats.all_reduce()
                stats.flush(step)
            if main and step % cfg.eval_every == 0 and step < cfg.steps:  # the last one is in Finish
                student = sample_ema()
                metrics = evaluate(student)
                append_jsonl(out / "metrics.jsonl", {"step": step, **metrics})
                if images:  # a grid at fixed seeds (and labels) per evaluation
                    save_grid(out / "grids" / f"step-{step:08d}.png", student[:GRID], nrow=max(num_classes, 8))
                bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("mode_tv", "w1", "energy")})
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
            bar.update(1)
            if dist.any_true(interrupt["signum"] is not None):  # SIGINT/SIGTERM: stop here, saved
                if step % cfg.checkpoint_every != 0 and step != cfg.steps:
                    checkpoint()
                bar.close()
                signum = interrupt["signum"] or signal.SIGTERM  # a process that saw none stops with the others
                raise Interrupted(f"{signal.Signals(signum).name} at step {step}: checkpoint saved in "
                                  f"{out / 'checkpoints'}; continue with --resume", signum)
    bar.close()
    stats.close()

    # Finish (rank 0): the EMA generator, its samples beside the teacher's, a summary and the report.
    if not main:
        return out
    info = {"teacher": cfg.teacher, "divergence": c.generator_loss.divergence.name, "shape": list(shape),
            "num_classes": teacher.num_classes, "steps": step, "guidance": cfg.guidance}
    if conds.text:  # what `dibregman sample --prompt` needs to encode new prompts for this generator
        info["text"] = dict(teacher.text)
        info["class_names"] = list(getattr(teacher, "class_names", ()))
    save_generator(out / "generator", c.ema.module, info, codec=codec)
    t0 = time.perf_counter()
    student = sample_ema()
    student_s = time.perf_counter() - t0
    final = evaluate(student)
    truncate_jsonl(out / "metrics.jsonl", step - 1)  # finishing again (a resumed finished run): one final row
    append_jsonl(out / "metrics.jsonl", {"step": step, **final})
    ref_teacher, teacher_s = reference_teacher_samples(teacher, cfg, device, conds)
    with atomic_open(out / "samples.npz") as f:
        extra = {"labels": eval_y.numpy()} if eval_y is not None else {}
        np.savez(f, student=student.numpy(), teacher=ref_teacher.numpy(), data=reference.numpy(), **extra)
    if images:
        save_grid(out / "samples_student.png", student[:GRID], nrow=max(num_classes, 8))
        save_grid(out / "samples_teacher.png", ref_teacher[:GRID], nrow=max(num_classes, 8))
    write_json(out / "summary.json", {
        "name": out.name, "divergence": info["divergence"], "metrics": final, "nfe": c.generator.steps,
        "eval_samples": n_eval,
        "protocol": score.protocol if score is not None else None,
        "teacher_metrics": evaluate(ref_teacher),
        "step_time_s": statistics.median(step_times) if step_times else None, "nonfinite_skipped": guard.skipped,
        "student_sample_s": student_s, "teacher_sample_s": teacher_s})
    from ..report import write_run_report

    write_run_report(out)
    return out
