"""Does a LoRA student look like a fully fine-tuned one after the same steps? Fashion-MNIST, the image preset,
full fine-tuning (``lora_rank = 0``) beside LoRA ranks, over training seeds.

    python benchmarks/lora_quality.py [--ranks 16] [--seeds 0,1,2] [--steps 300] [--eval-samples 1000]

Each distillation is the ``fashion-mnist`` preset (the shipped teacher, Hellinger, 300 steps) with only
``lora_rank`` and ``seed`` changed; its own final evaluation (``summary.json``: ``--eval-samples`` EMA samples
against as many held-out test images, on the shipped classifier's features) gives FD, precision, recall and
label accuracy, and its median step time. Runs are cached in ``--out``: an interrupted benchmark continues.
Results go to docs/benchmarks.md between the ``lora_quality`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

METRICS = ("fd", "precision", "recall", "label_acc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="16", help="LoRA ranks beside full fine-tuning, comma-separated")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--divergence", default="hellinger")
    p.add_argument("--out", default="runs/bench-lora")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    import dibregman as db

    ranks = [0, *(int(r) for r in args.ranks.split(",") if r)]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[int, list[dict]] = {r: [] for r in ranks}
    for seed in seeds:  # interleaved: a slow spell of the machine hits every rank alike
        for rank in ranks:
            run = Path(args.out) / f"rank{rank}-seed{seed}"
            if not (run / "summary.json").exists():
                db.distill(preset="fashion-mnist", lora_rank=rank, seed=seed, steps=args.steps,
                           divergence=args.divergence, eval_samples=args.eval_samples, eval_every=10**6,
                           out=str(run), resume=run.exists(), progress=False)
            summary = json.loads((run / "summary.json").read_text())
            metrics = summary["metrics"]
            results[rank].append({**metrics, "step_s": summary["step_time_s"], "teacher": summary["teacher_metrics"]})
            print(rank, seed, {k: round(v, 4) for k, v in metrics.items()}, file=sys.stderr)

    def cell(rank: int, key: str) -> str:
        values = [r[key] for r in results[rank] if key in r]
        if not values:
            return "-"
        return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    teacher = results[0][0]["teacher"]
    keys = [k for k in METRICS if any(k in r for r in results[0])]
    lines = ["## LoRA students against full fine-tuning (`benchmarks/lora_quality.py`)\n",
             f"Command: `python benchmarks/lora_quality.py {' '.join(sys.argv[1:])}`. Machine: {os.cpu_count()} CPU "
             f"cores {platform.machine()}, date {datetime.date.today().isoformat()}. Preset `fashion-mnist` "
             f"({args.divergence}, {args.steps} steps), training seeds {args.seeds}: mean (min-max) over seeds of "
             f"each run's own final evaluation ({args.eval_samples} samples vs as many held-out test images, the "
             "shipped classifier's features; FD at this sample size is biased upward, compare rows, not papers).\n",
             "| model | " + " | ".join(keys) + " | s/iter |",
             "|---|" + "--:|" * (len(keys) + 1),
             "| teacher (35 NFE, seed 0's draw) | " + " | ".join(
                 f"{teacher[k]:.3f}" for k in keys) + " | - |"]
    for rank in ranks:
        name = "full fine-tuning" if rank == 0 else f"LoRA rank {rank}"
        lines.append(f"| {name} | " + " | ".join(cell(rank, k) for k in keys) + f" | {cell(rank, 'step_s')} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        from toy_family import write_docs

        write_docs(text, marker="lora_quality")


if __name__ == "__main__":
    main()
