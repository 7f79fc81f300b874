"""Seconds per training iteration of every divergence, as a ratio to reverse KL, measured side by side.

    python benchmarks/step_time.py [--steps 150] [--rounds 3] [--teacher gmm:ring8_imbalanced] [--preset demo]

Members run one after another in one process, interleaved over rounds (round 1: every member, then
round 2, ...), so slow drifts of a shared machine hit all of them alike; each number is the median of
the per-round medians. An iteration is K = 2 fake-score (and critic) updates plus one generator update.
Reverse KL trains no critic (it is DMD), which is where the extra cost of the other members comes from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from toy_family import MEMBERS, write_docs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="gmm:ring8_imbalanced")
    p.add_argument("--divergences", default=",".join(MEMBERS),
                   help="comma-separated members; a member may carry options after '@', e.g. "
                        "hellinger@critic_head=fake_score (several joined by '+')")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--preset", default=None, help="a distill preset the runs start from (e.g. demo); default: none")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    import torch

    import dibregman as db
    from dibregman.train.config import coerce

    torch.set_num_threads(args.threads)
    divs = args.divergences.split(",")
    times: dict[str, list[float]] = {d: [] for d in divs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, d in enumerate(divs):
                name, _, extra = d.partition("@")
                options = {k: coerce(db.DistillConfig, k, v)  # text values, converted as the CLI converts them
                           for k, v in (kv.split("=", 1) for kv in extra.split("+") if kv)}
                run = db.distill(preset=args.preset, teacher=args.teacher, divergence=name, steps=args.steps,
                                 fit_steps=10, eval_every=10**6, eval_samples=256, checkpoint_every=10**6,
                                 out=f"{tmp}/{r}_{i}", progress=False, **options)
                times[d].append(json.loads((run / "summary.json").read_text())["step_time_s"])
    base = statistics.median(times["reverse_kl"])
    date = datetime.date.today().isoformat()
    lines = ["## Step time of each member (`benchmarks/step_time.py`)\n",
             f"Command: `python benchmarks/step_time.py {' '.join(sys.argv[1:])}`. Machine: {os.cpu_count()} CPU "
             f"cores ({platform.machine()}), torch {torch.__version__}, {args.threads} thread(s). Date: {date}. "
             f"Teacher {args.teacher}, preset {args.preset or 'none (the defaults: one-step students)'}, batch "
             f"256, MLP 3x128, {args.steps} iterations x {args.rounds} interleaved rounds per member.\n",
             "| member | s/iter (median) | ratio to reverse_kl |", "|---|---|---|"]
    for d in divs:
        med = statistics.median(times[d])
        lines.append(f"| {d} | {med:.4f} | {med / base:.2f} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_docs:
        write_docs(text, marker="step_time")


if __name__ == "__main__":
    main()
