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
from .train.components import balanced_labels, teacher_samples, true_samples
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


def sample(run: str | Path, num: int, seed: int = 0, labels: Tensor | None = None) -> Tensor:
    """``num`` one-step samples from a finished run; sample ``i`` depends only on ``(seed, i)`` (and its
    label: a class-conditional generator's default is ``i % num_classes``, see ``balanced_labels``)."""
    gen, info = load_generator(run)
    z = noise_from_seeds(range(seed * 1_000_003, seed * 1_000_003 + num), info["shape"])
    if labels is None:
        labels = balanced_labels(num, int(info.get("num_classes", 0)))
    with torch.no_grad():
        return torch.cat([gen(zb, yb) for zb, yb in zip(z.split(1024), _split(labels, 1024, len(z)), strict=True)])


def _split(labels: Tensor | None, size: int, n: int) -> tuple[Tensor | None, ...]:
    return labels.split(size) if labels is not None else (None,) * len(range(0, n, size))


def _scorer(teacher: Any, num: int, seed: int, classifier: str = "auto") -> Any:
    """``x -> metrics`` against the law ``teacher`` models: exact metrics for points, feature metrics
    (held-out data, class-balanced labels) for images."""
    split = "test" if len(teacher.shape) == 3 else "train"
    reference = true_samples(teacher, num, seed + 2, split=split)
    if reference is None:
        reference = teacher_samples(teacher, num, seed + 2, torch.device("cpu"))
    if len(teacher.shape) == 3:
        from .metrics.images import make_evaluator

        score = make_evaluator(teacher, reference, classifier)
        labels = balanced_labels(num, teacher.num_classes)
        return (lambda x: score(x, labels)) if score is not None else (lambda x: {})
    return lambda x: evaluate(x, reference, teacher if hasattr(teacher, "log_prob") else None)


def teacher_row(teacher_spec: str, num: int, seed: int = 0, classifier: str = "auto") -> dict[str, Any]:
    """The reference row of every table: the teacher's own 35-NFE Heun sampler, same metrics."""
    teacher = load_teacher(teacher_spec)
    score = _scorer(teacher, num, seed, classifier)
    t0 = time.perf_counter()
    x = teacher_samples(teacher, num, seed + 5, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    return {"method": "teacher (Heun, 35 NFE)", "nfe": 35, **score(x), "sample_s": seconds}


def evaluate_run(run: str | Path, num: int = 2000, seed: int = 0, teacher: str | None = None,
                 classifier: str = "auto") -> dict[str, Any]:
    """Metrics of a finished run's generator against the law its teacher models."""
    info = load_generator(run)[1]
    score = _scorer(load_teacher(teacher or info["teacher"]), num, seed, classifier)
    t0 = time.perf_counter()
    x = sample(run, num, seed)
    seconds = time.perf_counter() - t0
    return {"method": f"student ({info['divergence']}, 1 NFE)", "nfe": 1, **score(x), "sample_s": seconds}


def compare(divergences: list[str], out: str | Path, *, preset: str | None = None, resume: bool = False,
            progress: bool | None = None, **options: Any) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Distill the same teacher with several divergences at equal budget (same seed, steps, batch and
    starting network); returns the comparison rows (teacher reference first) and the run folders, and
    writes ``out/report.md``. ``resume=True`` continues (or just re-reports) each member's run."""
    import json

    from .report import METRIC_ORDER, write_comparison_report

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
    first = json.loads((runs[divergences[0]] / "summary.json").read_text())
    # the teacher's row from the run's own final evaluation (same reference, samples and protocol)
    rows = [{"method": "teacher (Heun, 35 NFE)", "nfe": 35, **first["teacher_metrics"],
             "sample_s": first.get("teacher_sample_s")}]
    for name, folder in runs.items():
        summary = json.loads((folder / "summary.json").read_text())
        rows.append({"method": f"student {name} (1 NFE)", "nfe": 1, **summary["metrics"],
                     "sample_s": summary.get("student_sample_s"), "step_time_s": summary["step_time_s"]})
    reference = first.get("protocol") or ("the law the teacher models (exact mixture samples for an analytic "
                                          "teacher, its data for a trained one)")
    protocol = (f"Metrics of {cfg['eval_samples']} samples each against {reference}; students: EMA generator after "
                f"{cfg['steps']} steps, same seed ({cfg['seed']}), batch ({cfg['batch_size']}), K "
                f"({cfg['fake_score_steps']}) and starting network. `sample_s`: seconds to draw all "
                f"{cfg['eval_samples']} samples on the run's device; `step_time_s`: median seconds per training "
                "iteration.")
    order = ["method", "nfe", *METRIC_ORDER]  # the metric columns in one order, whatever summary.json's is
    rows = [dict(sorted(r.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
            for r in rows]
    write_comparison_report(out, rows, runs, title=f"Di-Bregman vs reverse KL on {cfg['teacher']}",
                            protocol=protocol)
    return rows, runs
