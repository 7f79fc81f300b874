"""Text-to-image benchmark on Fashion-MNIST captions: the caption-conditioned teacher (35 NFE) vs one-step
students of several divergences, on the captions they were distilled on and on caption templates the
teacher never saw.

    python benchmarks/text_to_image.py                # the documented run (see docs/benchmarks.md)
    python benchmarks/text_to_image.py --stage runs   # only the distillations (cached in --out)

Prompt adherence is the project's Fashion-MNIST classifier's accuracy on each generated image against
the class its prompt asks for; FD, precision and recall use the same classifier's features against
held-out fashion-mnist:test images (class-balanced). Every stage is cached in ``--out``, so an interrupted
benchmark continues where it stopped.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_family import write_docs

from dibregman import api
from dibregman.report import format_table
from dibregman.train.config import DistillConfig, resolve

PROMPT_SETS = {"train": "", "unseen": "unseen"}  # DistillConfig.prompts values


def distill_run(name: str, args: argparse.Namespace, out: Path) -> Path:
    """One distillation in its own process; skipped when finished, resumed when interrupted."""
    folder = out / name.replace(":", "_")
    if not (folder / "summary.json").exists():
        cmd = [sys.executable, "-m", "dibregman", "distill", "--preset", "fashion-mnist-text", "--divergence", name,
               "--teacher", args.teacher, "--guidance", str(args.guidance), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--eval-samples", str(args.run_eval_samples),
               "--eval-every", str(args.steps), "--device", args.device, "--out", str(folder),
               "--progress" if sys.stderr.isatty() else "--no-progress"]
        if (folder / "checkpoints").exists():
            cmd.append("--resume")
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"distillation {name} failed: {' '.join(cmd)}")
    return folder


def cached_row(path: Path, make) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    row = make()
    path.write_text(json.dumps(row))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="net:fashion-mnist-text")
    p.add_argument("--divergences", default="reverse_kl,hellinger")
    p.add_argument("--guidance", type=float, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--run-eval-samples", type=int, default=200, help="each run's own final evaluation")
    p.add_argument("--samples", type=int, default=1000, help="samples per model and prompt set")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench-text")
    p.add_argument("--stage", choices=("all", "runs", "teacher"), default="all")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--docs-marker", default="text", help="the block of docs/benchmarks.md to write")
    args = p.parse_args()
    preset = resolve(DistillConfig, preset="fashion-mnist-text")
    args.guidance = preset.guidance if args.guidance is None else args.guidance
    args.steps = args.steps or preset.steps
    args.batch_size = args.batch_size or preset.batch_size
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    divs = [d for d in args.divergences.split(",") if d]
    n = args.samples

    runs = {d: distill_run(d, args, out) for d in divs} if args.stage in ("all", "runs") else {}
    rows = []
    if args.stage in ("all", "teacher"):
        for ps, spec in PROMPT_SETS.items():
            row = cached_row(out / "rows" / f"teacher_{ps}_{n}.json", lambda spec=spec: api.teacher_row(
                args.teacher, n, 0, prompts=spec, guidance=args.guidance))
            rows.append({"prompts": ps, **row})
    if args.stage != "all":
        return
    for folder in runs.values():
        for ps, spec in PROMPT_SETS.items():
            row = cached_row(out / "rows" / f"{folder.name}_{ps}_{n}.json",
                             lambda spec=spec, folder=folder: api.evaluate_run(folder, n, 0, prompts=spec))
            rows.append({"prompts": ps, **row})
    rows.sort(key=lambda r: (r["prompts"] != "train", r["nfe"] == 1))
    keep = ("prompts", "method", "nfe", "label_acc", "fd", "precision", "recall")  # speed: benchmarks/images.py
    table = format_table([{k: r[k] for k in keep if k in r} for r in rows], floatfmt=".4g")
    print(table)
    (out / "results.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    lines = [
        f"Command: `python benchmarks/text_to_image.py {' '.join(sys.argv[1:])}`".rstrip() + "; machine: "
        f"{os.cpu_count()} CPU cores {platform.machine()}, torch {torch.__version__}, device {args.device}; "
        f"{date.today().isoformat()}; this invocation took {(time.perf_counter() - t_start) / 60:.0f} min (finished "
        "stages are read from the cache).", "",
        f"Teacher `{args.teacher}` with classifier-free guidance {args.guidance:g} (its 35-NFE Heun rows and the "
        f"students' targets); students: preset `fashion-mnist-text`, {args.steps} steps, batch {args.batch_size}, "
        "distilled on the teacher's training captions (8 templates x 10 classes).", "",
        table, "",
        f"Protocol: {n} samples per row; sample i gets prompt i mod P of its prompt set (`train`: the 8 training "
        "templates x 10 classes, `unseen`: 5 templates the teacher never saw x 10 classes, e.g. \"a close-up shot "
        "of a sneaker\"). `label_acc` is **prompt adherence**: the shipped Fashion-MNIST classifier's accuracy "
        "against the class the prompt asks for. `fd`, `precision`, `recall` (k = 3): that classifier's features vs "
        f"{n} class-balanced fashion-mnist:test images.",
    ]
    if not args.no_docs:
        write_docs("\n".join(lines), marker=args.docs_marker)


if __name__ == "__main__":
    main()
