"""The Python API: the same runs as the CLI in a few lines.

    import dibregman as db
    run = db.distill(teacher="gmm:ring8_imbalanced", divergence="forward_kl", steps=1000, out="runs/fkl")
    x = db.sample(run, 1000)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from . import dist
from .artifacts import load_codec_of, load_generator
from .metrics.toy import evaluate
from .run_folder import RunFolder
from .sampling import batch_for, seeded_noise
from .teachers import Teacher, check_teacher, exact_mixture, load_teacher, set_guidance
from .teachers.objects import object_spec
from .text.prompts import PromptSet
from .train.components import balanced_labels, teacher_samples, true_samples
from .train.conditions import Conditions, conditions_for
from .train.config import ConfigError, DistillConfig, TeacherConfig, eval_samples, resolve
from .train.loop import distill as _distill

Tensor = torch.Tensor

__all__ = ["compare", "distill", "evaluate_run", "load_generator", "read_run", "sample", "teacher_row", "train_teacher"]


def _layered(cls: type, config: Any, preset: str | None, options: dict[str, Any]) -> Any:
    """A config object already holds every field, so a preset beside it would be silently overridden."""
    if config is not None and preset is not None:
        raise ConfigError("pass either a config object or a preset, not both (a config sets every option)")
    base = dataclasses.asdict(config) if config is not None else {}
    return resolve(cls, preset=preset, overrides={**base, **options})


def distill(config: DistillConfig | None = None, *, preset: str | None = None, resume: bool = False,
            progress: bool | None = None, teacher: str | Teacher | None = None, **options: Any) -> RunFolder:
    """Run a distillation; ``options`` override fields of ``config`` (or of the defaults/preset). Returns the
    run folder (``RunFolder``: a path that also reads the run's ``config``, ``summary``, ``metrics``,
    ``stats``).

    ``teacher`` is a spec string (``gmm:``, ``net:``, ``diffusers:``, ``edm:``, ``py:``) or any object meeting
    the teacher contract (``dibregman.teachers.Teacher``; wrap a plain module or function with
    ``dibregman.ModuleTeacher``). An object is checked before anything runs and recorded in the run as
    ``object:<name>`` (its fingerprint in the checkpoints); resuming takes the same object again."""
    obj = None
    if isinstance(teacher, str):
        options["teacher"] = teacher
    elif teacher is not None:
        obj = teacher
        options["teacher"] = object_spec(obj)  # what the run records; the object is checked by the loop
    cfg = _layered(DistillConfig, config, preset, options)
    return RunFolder(_distill(cfg, resume=resume, progress=progress, teacher=obj, on_finish=_report))


def _report(run: Path) -> None:
    """The run's report, from its finished files (``report.py`` sits above the training layer, so the loop is
    handed this instead of importing it; matplotlib loads only here)."""
    from .report import write_run_report

    write_run_report(run)


def train_teacher(config: TeacherConfig | None = None, *, preset: str | None = None, resume: bool = False,
                  progress: bool | None = None, command: str | None = None, **options: Any) -> Path:
    """Train a network teacher on a toy set or a point cloud; returns the folder usable as ``net:<folder>``."""
    from .train.teacher import train_teacher as _train

    cfg = _layered(TeacherConfig, config, preset, options)
    return _train(cfg, resume=resume, progress=progress, command=command)


def sample(run: str | Path, num: int, seed: int = 0, labels: Tensor | None = None,
           prompts: str | list[str] | Conditions | None = None, device: str | torch.device = "cpu",
           batch_size: int | None = None, decode: bool = True) -> Tensor:
    """``num`` samples from a finished run (a network call each, per step of a few-step student); sample ``i``
    depends only on ``(seed, i)`` and its condition: a class-conditional generator's label (default
    ``i % num_classes``, see ``balanced_labels``), a text generator's prompt ``i % len(prompts)`` (a list, a
    prompt file, ``unseen``, or an encoded ``Conditions`` table; default: the teacher's training captions).
    ``device``: where the generator runs (``cpu``, ``cuda``, ``cuda:N``, ``auto``; the noise is drawn on the
    CPU, so the samples are the same on any device up to float rounding); the result is on ``device``, in
    network calls of ``batch_size`` samples (default: 1024, fewer for large samples, ``sampling.batch_for``).
    A latent generator's samples are decoded by the VAE saved with it (images in [-1, 1]); ``decode=False``
    returns the latents themselves."""
    from .dist import resolve_device

    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    gen, info = load_generator(run)
    gen = gen.to(device)
    z = seeded_noise(seed, num, gen.latent_shape(info["shape"]))  # [steps, *shape] each for a few-step student
    cond = None
    if info.get("text"):
        if labels is not None:
            raise ValueError("this generator is text-conditional: pass prompts, not labels")
        conds = prompts if isinstance(prompts, Conditions) else generator_conditions(info, prompts)
        cond = conds.lookup(conds.cycle(num))
    elif prompts is not None:
        raise ValueError("prompts are for text-conditional generators; this one takes "
                         + ("labels" if info.get("num_classes") else "no condition"))
    else:
        cond = labels if labels is not None else balanced_labels(num, int(info.get("num_classes", 0)))
    batch_size = batch_size or batch_for(info["shape"])
    codec = load_codec_of(run, info) if decode else None
    if codec is not None:
        codec = codec.to(device)
    with torch.no_grad():
        xs = (gen(zb.to(device), yb.to(device) if yb is not None else None)
              for zb, yb in zip(z.split(batch_size), _split(cond, batch_size, len(z)), strict=True))
        return torch.cat([codec.decode(x) if codec is not None else x for x in xs])


def generator_conditions(info: dict[str, Any], prompts: str | list[str] | None = None) -> Conditions:
    """The prompt table of a text generator (``info`` from ``load_generator``): ``prompts`` as a list of
    strings, a prompt file, ``unseen``, or (None) the teacher's training captions."""
    from types import SimpleNamespace

    if isinstance(prompts, list | tuple):
        prompts = PromptSet(list(prompts), torch.full((len(prompts),), -1), ())
    source = SimpleNamespace(text=info["text"], class_names=info.get("class_names", ()), num_classes=0)
    return conditions_for(source, prompts if prompts is not None else "")


def _split(labels: Tensor | None, size: int, n: int) -> tuple[Tensor | None, ...]:
    return labels.split(size) if labels is not None else (None,) * len(range(0, n, size))


def _scorer(teacher: Any, num: int, seed: int, classifier: str = "auto", conds: Conditions | None = None) -> Any:
    """``x -> metrics`` against the law ``teacher`` models: exact metrics for points, feature metrics
    (held-out data, class-balanced; label accuracy against what sample ``i``'s condition asks for) for images."""
    conds = conds if conds is not None else Conditions(teacher.num_classes)
    split = "test" if len(teacher.shape) == 3 else "train"
    reference = true_samples(teacher, num, seed + 2, split=split, classes=conds.num_classes)
    if reference is None:
        reference = teacher_samples(teacher, num, seed + 2, torch.device("cpu"), conds, decode=True)
    if len(teacher.shape) == 3:
        from .metrics.images import make_evaluator

        score = make_evaluator(teacher, reference, classifier)
        labels = conds.classes(conds.cycle(num))
        return (lambda x: score(x, labels)) if score is not None else (lambda x: {})
    return lambda x: evaluate(x, reference, exact_mixture(teacher))


def _teacher(teacher: str | Teacher) -> Teacher:
    return load_teacher(teacher) if isinstance(teacher, str) else check_teacher(teacher)


def teacher_row(teacher_spec: str | Teacher, num: int, seed: int = 0, classifier: str = "auto", prompts: str = "",
                guidance: float = 1.0) -> dict[str, Any]:
    """The reference row of every table: the teacher's own 35-NFE Heun sampler, same metrics (a text
    teacher on ``prompts``, see ``DistillConfig.prompts``; ``guidance``: its classifier-free guidance).
    ``teacher_spec``: a spec string or a teacher object."""
    teacher = _teacher(teacher_spec)
    set_guidance(teacher, guidance)  # also 1: an object may carry another run's scale
    conds = conditions_for(teacher, prompts)
    score = _scorer(teacher, num, seed, classifier, conds)
    t0 = time.perf_counter()
    x = teacher_samples(teacher, num, seed + 5, torch.device("cpu"), conds, decode=True)
    seconds = time.perf_counter() - t0
    return {"method": "teacher (Heun, 35 NFE)", "nfe": 35, **score(x), "sample_s": seconds}


def run_eval_samples(run: str | Path) -> int:
    """How many samples the run's own final evaluation used (its ``summary.json``), or the automatic count
    for its generator's shape (``DistillConfig.eval_samples``): what ``evaluate_run`` draws by default."""
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return int(RunFolder(run).summary["eval_samples"])
    return eval_samples(0, load_generator(run)[1]["shape"])


def evaluate_run(run: str | Path, num: int | None = None, seed: int = 0, teacher: str | Teacher | None = None,
                 classifier: str = "auto", prompts: str = "") -> dict[str, Any]:
    """Metrics of a finished run's generator against the law its teacher models (a text generator on
    ``prompts``: its teacher's training captions by default, ``unseen``, or a prompt file). With the run's
    seed and ``num`` (default: ``run_eval_samples(run)``) these are the samples and the reference set of the
    run's own final evaluation, so its ``summary.json`` metrics come back. ``teacher`` (a spec or an object)
    replaces the run's own; a run distilled from an object needs it."""
    gen, info = load_generator(run)
    num = run_eval_samples(run) if num is None else num
    the_teacher = _teacher(teacher if teacher is not None else info["teacher"])
    set_guidance(the_teacher, float(info.get("guidance", 1.0)))  # the law the run was distilled towards
    conds = conditions_for(the_teacher, prompts)
    score = _scorer(the_teacher, num, seed, classifier, conds)
    t0 = time.perf_counter()
    x = sample(run, num, seed, prompts=conds if info.get("text") else None)  # the scorer's table, encoded once
    seconds = time.perf_counter() - t0
    bad = int((~torch.isfinite(x.reshape(len(x), -1)).all(1)).sum())
    if bad:  # metrics of NaN samples can read as perfect (an all-NaN student scored w1 0): refuse instead
        raise ValueError(f"{bad} of the {len(x)} samples of {run} hold NaN or inf: its generator is damaged or "
                         "diverged; re-create it with `dibregman distill --resume` on its run folder, or retrain")
    label = method_label(_run_config(run), info["divergence"])
    return {"method": f"student ({label}, {gen.steps} NFE)", "nfe": gen.steps, **score(x), "sample_s": seconds}


def read_run(run: str | Path) -> dict[str, Any]:
    """A run folder's records: ``config``, ``summary`` (dicts), ``stats`` and ``metrics`` (lists of
    dicts, one per line of ``stats.jsonl`` / ``metrics.jsonl``, each with its ``step``) and ``samples``
    (the arrays of ``samples.npz``); what is missing is empty. See ``report.read_run``."""
    from .report import read_run as _read

    return _read(run)


def method_label(config: dict[str, Any], divergence: str | None = None) -> str:
    from .report import method_label as _label

    return _label(config, divergence)


def _run_config(run: str | Path) -> dict[str, Any]:
    """The run's ``config.json`` (``run`` may be its ``generator/`` subfolder), or ``{}``."""
    return RunFolder(run).config or RunFolder(Path(run).parent).config


def compare(divergences: list[str], out: str | Path, *, preset: str | None = None, resume: bool = False,
            progress: bool | None = None, **options: Any) -> tuple[list[dict[str, Any]], dict[str, RunFolder]]:
    """Distill the same teacher with several divergences at equal budget (same seed, steps, batch and
    starting network); returns the comparison rows (teacher reference first) and the run folders, and
    writes ``out/report.md``. ``resume=True`` continues (or just re-reports) each member's run."""
    from .report import METRIC_ORDER, write_comparison_report

    out = Path(out)
    runs: dict[str, RunFolder] = {}
    for name in divergences:
        folder = out / name.replace(":", "_")
        runs[name] = distill(preset=preset, resume=resume, progress=progress, divergence=name, out=str(folder),
                             **options)
    if not dist.is_main():  # under torchrun, rank 0 compares and reports
        return [], runs
    cfg, first = runs[divergences[0]].config, runs[divergences[0]].summary
    # the teacher's row from the run's own final evaluation (same reference, samples and protocol)
    rows = [{"method": "teacher (Heun, 35 NFE)", "nfe": 35, **first["teacher_metrics"],
             "sample_s": first.get("teacher_sample_s")}]
    for name, folder in runs.items():
        summary = folder.summary
        label = method_label(folder.config, name)
        nfe = summary.get("nfe", 1)
        rows.append({"method": f"student {label} ({nfe} NFE)", "nfe": nfe, **summary["metrics"],
                     "sample_s": summary.get("student_sample_s"), "step_time_s": summary["step_time_s"]})
    reference = first.get("protocol") or ("the law the teacher models (exact mixture samples for an analytic "
                                          "teacher, its data for a trained one)")
    n_eval = first.get("eval_samples", cfg["eval_samples"])
    protocol = (f"Metrics of {n_eval} samples each against {reference}; students: EMA generator after "
                f"{cfg['steps']} steps, same seed ({cfg['seed']}), batch ({cfg['batch_size']}), K "
                f"({cfg['fake_score_steps']}) and starting network. `sample_s`: seconds to draw all "
                f"{n_eval} samples on the run's device; `step_time_s`: median seconds per training "
                "iteration.")
    order = ["method", "nfe", *METRIC_ORDER]  # the metric columns in one order, whatever summary.json's is
    rows = [dict(sorted(r.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
            for r in rows]
    write_comparison_report(out, rows, runs, title=f"Di-Bregman vs reverse KL on {cfg['teacher']}",
                            protocol=protocol)
    return rows, runs
