"""The Python API: the same runs as the CLI in a few lines.

    import dibregman as db
    run = db.distill(teacher="gmm:ring8_imbalanced", divergence="forward_kl", steps=1000, out="runs/fkl")
    x = db.sample(run, 1000)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from .artifacts import load_generator
from .metrics.toy import evaluate
from .sampling import noise_from_seeds
from .teachers import load_teacher
from .train.components import teacher_samples, true_samples
from .train.config import ConfigError, DistillConfig, TeacherConfig, resolve
from .train.loop import distill as _distill

Tensor = torch.Tensor


def _layered(cls: type, config: Any, preset: str | None, options: dict[str, Any]) -> Any:
    """A config object already holds every field, so a preset beside it would be silently overridden."""
    if config is not None and preset is not None:
        raise ConfigError("pass either a config object or a preset, not both (a config sets every option)")
    base = dataclasses.asdict(config) if config is not None else {}
    return resolve(cls, preset=preset, overrides={**base, **options})


def distill(config: DistillConfig | None = None, *, preset: str | None = None, resume: bool = False,
            progress: bool | None = None, **options: Any) -> Path:
    """Run a distillation; ``options`` override fields of ``config`` (or of the defaults/preset)."""
    cfg = _layered(DistillConfig, config, preset, options)
    return _distill(cfg, resume=resume, progress=progress)


def train_teacher(config: TeacherConfig | None = None, *, preset: str | None = None, resume: bool = False,
                  progress: bool | None = None, command: str | None = None, **options: Any) -> Path:
    """Train a network teacher on a toy set or a point cloud; returns the folder usable as ``net:<folder>``."""
    from .train.teacher import train_teacher as _train

    cfg = _layered(TeacherConfig, config, preset, options)
    return _train(cfg, resume=resume, progress=progress, command=command)


def sample(run: str | Path, num: int, seed: int = 0) -> Tensor:
    """``num`` one-step samples from a finished run; sample ``i`` depends only on ``(seed, i)``."""
    gen, info = load_generator(run)
    z = noise_from_seeds(range(seed * 1_000_003, seed * 1_000_003 + num), info["shape"])
    with torch.no_grad():
        return gen(z)


def teacher_row(teacher_spec: str, num: int, seed: int = 0) -> dict[str, Any]:
    """The reference row of every table: the teacher's own 35-NFE Heun sampler, same metrics."""
    teacher = load_teacher(teacher_spec)
    reference = true_samples(teacher, num, seed + 2)
    t0 = time.perf_counter()
    x = teacher_samples(teacher, num, seed + 5, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {"method": "teacher (Heun, 35 NFE)", "nfe": 35}
    if reference is not None:
        row.update(evaluate(x, reference, teacher if hasattr(teacher, "log_prob") else None))
    row["sample_s"] = seconds
    return row


def evaluate_run(run: str | Path, num: int = 2000, seed: int = 0, teacher: str | None = None) -> dict[str, Any]:
    """Metrics of a finished run's generator against the law its teacher models."""
    info = load_generator(run)[1]
    spec = teacher or info["teacher"]
    t = load_teacher(spec)
    reference = true_samples(t, num, seed + 2)
    if reference is None:
        reference = teacher_samples(t, num, seed + 2, torch.device("cpu"))
    t0 = time.perf_counter()
    x = sample(run, num, seed)
    seconds = time.perf_counter() - t0
    return {"method": f"student ({info['divergence']}, 1 NFE)", "nfe": 1,
            **evaluate(x, reference, t if hasattr(t, "log_prob") else None), "sample_s": seconds}


def compare(divergences: list[str], out: str | Path, *, preset: str | None = None, resume: bool = False,
            progress: bool | None = None, **options: Any) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Distill the same teacher with several divergences at equal budget (same seed, steps, batch and
    starting network); returns the comparison rows (teacher reference first) and the run folders, and
    writes ``out/report.md``. ``resume=True`` continues (or just re-reports) each member's run."""
    import json

    from .report import write_comparison_report

    out = Path(out)
    runs: dict[str, Path] = {}
    for name in divergences:
        folder = out / name.replace(":", "_")
        runs[name] = distill(preset=preset, resume=resume, progress=progress, divergence=name, out=str(folder),
                             **options)
    from . import dist

    if not dist.is_main():  # under torchrun, rank 0 compares and reports
        return [], runs
    cfg = json.loads((runs[divergences[0]] / "config.json").read_text())
    rows = [teacher_row(cfg["teacher"], cfg["eval_samples"], cfg["seed"])]
    z = torch.randn(cfg["eval_samples"], *load_generator(runs[divergences[0]])[1]["shape"])
    for name, folder in runs.items():
        summary = json.loads((folder / "summary.json").read_text())
        gen = load_generator(folder)[0]
        with torch.no_grad():
            t0 = time.perf_counter()
            gen(z)
            seconds = time.perf_counter() - t0
        rows.append({"method": f"student {name} (1 NFE)", "nfe": 1, **summary["metrics"], "sample_s": seconds,
                     "step_time_s": summary["step_time_s"]})
    protocol = (f"Metrics of {cfg['eval_samples']} samples against {cfg['eval_samples']} samples of the law the "
                f"teacher models (exact mixture samples for an analytic teacher, its data for a trained one); "
                f"students: EMA generator after {cfg['steps']} steps, same seed ({cfg['seed']}), batch "
                f"({cfg['batch_size']}), K ({cfg['fake_score_steps']}) and starting network. `sample_s`: seconds "
                f"to draw all samples on the CPU; `step_time_s`: median seconds per training iteration.")
    write_comparison_report(out, rows, runs, title=f"Di-Bregman vs reverse KL on {cfg['teacher']}",
                            protocol=protocol)
    return rows, runs
