"""Train an EDM teacher (an MLP behind ``Precond``) on a point cloud, with exact resume.

Run folder ``cfg.out``: ``config.json``, ``stats.jsonl`` (``loss/teacher``, ``time/step_s``),
``checkpoints/step-XXXXXXXX/`` (the same format as distillation, see ``checkpoint.py``), and at the end
``teacher/`` (see ``teachers/trained.py``), usable as ``--teacher net:<out>/teacher``.

One CPU ``torch.Generator`` seeded from ``cfg.seed`` draws everything (data, initial weights, batches,
sigmas, noise, evaluation), so a run is a function of its config, and a resumed run is bit-identical to
an uninterrupted one on the same device.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data.toy2d import load_points
from ..dist import resolve_device
from ..io import write_json
from ..losses import denoising_loss
from ..nets.mlp import MLP
from ..precond import Precond
from ..sampling import nfe, sample
from ..schedules import LogNormal
from ..stats import Stats, truncate_jsonl
from ..teachers.trained import save_teacher
from .checkpoint import load_latest, save_checkpoint
from .config import ConfigError, TeacherConfig, check_resumable, validate
from .ema import EMA
from .guard import Interrupted, NonFiniteGuard, deferred_signals, prepare_run_dir


def train_teacher(cfg: TeacherConfig, progress: bool | None = None, *, resume: bool = False,
                  command: str | None = None) -> Path:
    """Train, checkpoint and evaluate a teacher; returns the teacher folder ``cfg.out/teacher``.

    ``resume=True`` continues from the newest checkpoint in ``cfg.out`` (``cfg.steps`` may be raised).
    ``command`` (the CLI line) is recorded in ``teacher.json``."""
    validate(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train-teacher runs in one process (multi-process teacher training is not built yet); "
                          "start it without torchrun")
    device = resolve_device(cfg.device)

    # Setup: everything below is drawn from `gen`, in this order, on every (re)start.
    gen = torch.Generator().manual_seed(cfg.seed)
    points = load_points(cfg.data, cfg.num_points, gen)  # bad data fails before the run folder is made
    out = prepare_run_dir(Path(cfg.out), resume)
    num, dim = points.shape
    sigma_data = float(points.std())
    with torch.random.fork_rng(devices=[]):  # nn.Linear initialises from the global RNG: seed it from ours
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        net = Precond(MLP(dim, cfg.hidden, cfg.depth), sigma_data)
    net.to(device).train()
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    points = points.to(device)
    sigma_sampler = LogNormal()
    guard = NonFiniteGuard("strict", resume_hint=None)  # no skip mode for teachers

    step = 0
    loaded = load_latest(out / "checkpoints", {"teacher": net, "ema": ema.module},
                         lambda meta: check_resumable(meta.get("config", {}), cfg, str(out))) if resume else None
    if loaded is not None:
        start, state, meta = loaded
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["rng"])
        step, ema.num_updates = meta["step"], meta["ema_updates"]
        truncate_jsonl(out / "stats.jsonl", step)
        print(f"resuming from {start} (step {step})", file=sys.stderr)
    elif resume:  # killed before its first checkpoint: start over, without the old attempt's log rows
        truncate_jsonl(out / "stats.jsonl", 0)
    write_json(out / "config.json", asdict(cfg))

    def save(at: int) -> None:
        save_checkpoint(out / "checkpoints", at, {"teacher": net, "ema": ema.module},
                        {"optimizer": opt.state_dict(), "rng": gen.get_state()},
                        {"config": asdict(cfg), "ema_updates": ema.num_updates}, cfg.keep_checkpoints)

    stats = Stats(out / "stats.jsonl")
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=cfg.steps, initial=step, disable=not show, desc="teacher", dynamic_ncols=True)
    with deferred_signals() as interrupt:
        while step < cfg.steps:
            t0 = time.perf_counter()
            idx = torch.randint(num, (cfg.batch_size,), generator=gen)
            sigma = sigma_sampler(cfg.batch_size, gen)
            n = torch.randn(cfg.batch_size, dim, generator=gen)
            loss = denoising_loss(net, points[idx.to(device)], sigma.to(device), n.to(device)).mean()
            guard.step(opt, loss, net, "teacher", step + 1, 0.0, out)
            ema.update(net)
            step += 1

            # Maintenance: stats, checkpoints.
            stats.add({"loss/teacher": loss.item(), "time/step_s": time.perf_counter() - t0})
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                bar.set_postfix(loss=f"{stats.flush(step)['loss/teacher']:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save(step)
            if interrupt["signum"] is not None:  # SIGINT/SIGTERM: stop at this step boundary, saved
                save(step)
                bar.close()
                raise Interrupted(f"{signal.Signals(interrupt['signum']).name} at step {step}: checkpoint saved in "
                                  f"{out / 'checkpoints'}; continue with --resume", interrupt["signum"])
    bar.close()

    # Evaluation and the teacher folder (after the last checkpoint, so resume does not see its draws).
    metrics = _evaluate(ema.module, points, gen, cfg.eval_samples)
    # a data file is recorded by absolute path: the teacher is distilled from other working directories
    data = str(Path(cfg.data).resolve()) if Path(cfg.data).suffix in (".npy", ".csv") else cfg.data
    meta = {"data": data, "shape": [dim], "metrics": metrics, "train_config": asdict(cfg)}
    if command is not None:
        meta["command"] = command
    return save_teacher(out / "teacher", ema.module, meta)


@torch.no_grad()
def _evaluate(net: Precond, points: torch.Tensor, gen: torch.Generator, count: int) -> dict[str, Any]:
    """Energy distance between ``count`` 35-NFE Heun samples of the teacher and ``count`` data points."""
    from ..metrics.toy import energy_distance

    count = min(count, len(points))
    device = points.device
    noise = torch.randn(count, points.shape[1], generator=gen).to(device)
    samples = sample(net.eval(), noise, num_steps=18)
    data = points[torch.randperm(len(points), generator=gen)[:count].to(device)]
    return {"energy_distance": float(energy_distance(samples.cpu(), data.cpu())), "eval_samples": count,
            "eval_nfe": nfe("heun", 18)}
