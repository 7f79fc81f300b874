"""Which recipe keeps the teacher's variety on images? Fashion-MNIST, the ``fashion-mnist`` preset plus one
variant's options, over training seeds, every student scored on the same protocol.

    python benchmarks/image_recipe.py [--variants base,lr3e-5,reg1,lora16] [--seeds 0,1,2] [--samples 5000]

Each distillation is ``db.distill(preset="fashion-mnist", seed=..., **VARIANTS[name])`` (the shipped teacher,
Hellinger, 300 steps, batch 32). Afterwards every student draws ``--samples`` images with the same sample seed
(7), and they, the teacher's own 35-NFE samples (made once, cached) and as many held-out test images are scored
on the shipped classifier's features: FD, precision and recall (k = 3), label accuracy. Runs and samples are
cached in ``--out``: an interrupted benchmark continues. ``--stage teacher`` makes only the teacher's samples
(run it beside ``--stage runs`` in two one-thread processes on a CPU). Results go to docs/benchmarks.md
between the ``image_recipe`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy_family import fmt, write_docs

import dibregman as db
from dibregman.metrics.classifier import ClassifierFeatures, shipped_classifier
from dibregman.metrics.fid import fd_from_features, precision_recall
from dibregman.teachers import load_teacher
from dibregman.train.components import balanced_labels, teacher_samples, true_samples

# each variant: the options it changes from the preset (hellinger, lr_generator 1e-4, lr_fake_score 5e-4,
# ema_decay 0.95, cosine rate, no regression term, full fine-tuning); the first ones were measured before the
# preset's rate became cosine, so they name the constant rate they ran at
VARIANTS: dict[str, dict] = {
    "base": {"lr_schedule": "constant"},  # the preset before the cosine rate
    "lr3e-5": {"lr_generator": 3e-5, "lr_schedule": "constant"},
    "cos": {"lr_schedule": "cosine"},
    "ema0.99": {"ema_decay": 0.99, "lr_schedule": "constant"},
    "reg1": {"regression_weight": 1.0, "regression_pairs": 1000, "lr_schedule": "constant"},
    "reg4": {"regression_weight": 4.0, "regression_pairs": 1000, "lr_schedule": "constant"},
    "lora16": {"lora_rank": 16, "lr_schedule": "constant"},
    "reg1_cos": {"regression_weight": 1.0, "regression_pairs": 1000, "lr_schedule": "cosine"},
    "lr3e-5_cos": {"lr_generator": 3e-5, "lr_schedule": "cosine"},
    "reverse_kl": {"divergence": "reverse_kl", "lr_schedule": "constant"},
    "ttur4_cos": {"fake_score_steps": 4},  # DMD2's two time-scale rule: more fake-score updates per generator one
    "sg10_cos": {"sigma_g": 10.0},  # the generator's noise level: its input nearer pure noise
    "sg1_cos": {"sigma_g": 1.0},
    "ttur2_cos": {"fake_score_steps": 2},
    "cos_long": {"steps": 800},  # ttur4_cos's wall time (2.6x a step) spent on more generator steps instead
    # DMD2's GAN term on real data (the critic already reads real images: critic_data = data)
    "gan0.01_cos": {"gan_weight": 0.01},
    "gan0.1_cos": {"gan_weight": 0.1},
    # f-distill's clip, which bounds p/q (not our r = q/p) to [0.1, 20]: r in [0.05, 10]
    "fclip_cos": {"r_clip_min": 0.05, "r_clip_max": 10.0},
    # the fake score trained on the generator update's noise law, as DMD2 and FastGen do
    "fskarras_cos": {"fake_score_sigmas": "karras"},
    "fskarras_long": {"fake_score_sigmas": "karras", "steps": 800},
    # between the two laws: a lognormal that draws a sigma above 2.5 a fifth of the time (EDM's: 4%)
    "fswide_cos": {"fake_score_p_mean": -0.4, "fake_score_p_std": 1.6},
    "fskarras_k2": {"fake_score_sigmas": "karras", "fake_score_steps": 2},
}
METRICS = ("fd", "precision", "recall", "label_acc", "tone")


def tone_spread(x: np.ndarray, classes: np.ndarray) -> float:
    """How much the images' overall brightness varies within a class: the std of each image's mean pixel among
    the images the classifier puts in one class, averaged over classes (the students' garments looked one grey
    tone per class where the teacher's range from light to dark)."""
    means = x.reshape(len(x), -1).mean(1)
    return float(np.mean([means[classes == c].std() for c in np.unique(classes) if (classes == c).sum() > 1]))


def cached(path: Path, make) -> np.ndarray:
    if path.exists():
        return np.load(path)["x"]
    x = make()
    np.savez(path, x=x)
    return x


def distill(name: str, seed: int, args: argparse.Namespace) -> Path:
    run = Path(args.out) / f"{name}-seed{seed}"
    if not (run / "summary.json").exists():
        t0 = time.perf_counter()
        options = {"steps": args.steps, **VARIANTS[name]}  # a variant may set its own number of steps
        db.distill(preset="fashion-mnist", seed=seed, eval_samples=100, eval_every=10**6, out=str(run),
                   resume=run.exists(), progress=False, **options)
        (run / "bench.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="base,lr3e-5,reg1,lora16", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--samples", type=int, default=5000, help="samples per model, and held-out test images")
    p.add_argument("--out", default="runs/bench-image-recipe")
    p.add_argument("--stage", choices=("all", "runs", "teacher"), default="all")
    p.add_argument("--marker", default="image_recipe", help="the docs/benchmarks.md block to write")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = args.samples
    teacher = load_teacher("net:fashion-mnist")
    if args.stage in ("all", "teacher"):
        teacher_x = cached(out / f"teacher_{n}.npz",
                           lambda: teacher_samples(teacher, n, 11, torch.device("cpu")).numpy())
    if args.stage in ("all", "runs"):  # seeds outermost: a slow spell of the machine hits every variant alike
        runs = {(v, s): distill(v, s, args) for s in seeds for v in variants}
    if args.stage != "all":
        return

    clf = ClassifierFeatures.load(shipped_classifier("fashion-mnist"))
    ref_feats = clf(true_samples(teacher, n, 2, split="test"))
    labels = balanced_labels(n, teacher.num_classes).numpy()

    def scores(x: np.ndarray) -> dict:
        xt = torch.from_numpy(x)
        feats = clf(xt)
        prec, rec = precision_recall(ref_feats, feats)
        predicted = np.asarray(clf.predict(xt))
        return {"fd": fd_from_features(feats, ref_feats), "precision": prec, "recall": rec,
                "label_acc": float(np.mean(predicted == labels[:len(x)])), "tone": tone_spread(x, predicted)}

    teacher_row = scores(teacher_x)
    per_run = {}
    for key, run in runs.items():
        x = cached(out / f"{run.name}_{n}.npz", lambda run=run: db.sample(run, n, seed=7).numpy())
        summary = json.loads((run / "summary.json").read_text())
        per_run[key] = {**scores(x), "step_s": summary["step_time_s"]}
        print(key, {k: round(v, 4) for k, v in per_run[key].items()}, file=sys.stderr)
    (out / "results.json").write_text(json.dumps({"teacher": teacher_row, "runs": [
        {"variant": v, "seed": s, **r} for (v, s), r in per_run.items()]}, indent=2))

    head = "| variant | options | " + " | ".join(METRICS) + " | s/iter |"
    lines = [f"Command: `python benchmarks/image_recipe.py {' '.join(sys.argv[1:])}`. Machine: {os.cpu_count()} "
             f"CPU cores {platform.machine()}, torch {torch.__version__}; {datetime.date.today().isoformat()}. "
             f"Preset `fashion-mnist` ({args.steps} steps) plus each variant's options; training seeds "
             f"{args.seeds} (mean ± std over them); {n} samples per model (sample seed 7) against {n} held-out "
             "test images on the shipped classifier's features; `tone`: the std of the images' mean pixel within "
             "a (predicted) class, averaged over classes (the teacher's variety of light and dark garments).", "",
             head, "|---|---|" + "--:|" * (len(METRICS) + 1),
             "| teacher (Heun, 35 NFE) | - | " + " | ".join(f"{teacher_row[k]:.4f}" for k in METRICS) + " | - |"]
    for v in variants:
        rows = [per_run[v, s] for s in seeds]
        options = ", ".join(f"`{k}={val}`" for k, val in VARIANTS[v].items()) or "the preset"
        lines.append(f"| {v} | {options} | " + " | ".join(fmt([r[k] for r in rows]) for k in METRICS)
                     + f" | {statistics.median(r['step_s'] for r in rows):.3f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        write_docs(text, marker=args.marker)


if __name__ == "__main__":
    main()
