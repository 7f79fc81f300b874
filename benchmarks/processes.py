"""Seconds per iteration of the same run with 1 and with 2 processes (torchrun, gloo on CPU).

    python benchmarks/processes.py [--steps 300]                  # toy distillation (MLPs)
    python benchmarks/processes.py --workload images --steps 40   # Fashion-MNIST U-Nets: teacher and distillation

Both runs of a pair use the same global batch and one thread per process, one after the other on the same
machine; the table gives the median s/iter each reports and their ratio. On a 2-core machine two
processes split each batch between the cores, and pay an all-reduce of the gradients per update.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from toy_family import write_docs

# name -> (dibregman arguments, what the row says); every run is --steps N with no evaluation or checkpoint
WORKLOADS = {
    "toy": {"distill (MLP 3x128, gmm:ring8_imbalanced, hellinger, global batch 256)": [
        "distill", "--fit-steps", "10", "--eval-every", "100000", "--checkpoint-every", "100000",
        "--eval-samples", "256", "--divergence", "hellinger"]},
    "images": {
        "train-teacher (U-Net 1.05M, fashion-mnist, global batch 64)": [
            "train-teacher", "--preset", "fashion-mnist", "--log-every", "5", "--checkpoint-every", "100000",
            "--eval-samples", "10"],
        "distill (preset fashion-mnist, hellinger, global batch 32)": [
            "distill", "--preset", "fashion-mnist", "--eval-every", "100000", "--checkpoint-every", "100000",
            "--eval-samples", "64", "--classifier", "none"]},
}


def run(out: Path, procs: int, steps: int, args: list[str]) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [*(launcher if procs > 1 else [sys.executable]), "-m", "dibregman", *args, "--steps", str(steps),
           "--no-progress", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if args[0] == "distill":
        return json.loads((out / "summary.json").read_text())["step_time_s"]
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    return statistics.median(r["time/step_s"] for r in rows[1:])  # the first rows hold the warm-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=tuple(WORKLOADS), default="toy")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    import torch

    lines = ["| run | processes | s/iter (median) | ratio to 1 process |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cli) in enumerate(WORKLOADS[args.workload].items()):
            t1 = run(Path(tmp) / f"{i}-one", 1, args.steps, cli)
            t2 = run(Path(tmp) / f"{i}-two", 2, args.steps, cli)
            lines += [f"| {name} | 1 | {t1:.4f} | 1.00 |", f"| {name} | 2 | {t2:.4f} | {t2 / t1:.2f} |"]
    title = "One process vs two" + (" (images)" if args.workload == "images" else "")
    text = "\n".join([
        f"## {title} (`benchmarks/processes.py`)\n",
        f"Command: `python benchmarks/processes.py {' '.join(sys.argv[1:])}`".rstrip() + f". Machine: "
        f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, gloo, one thread per process. "
        f"Date: {datetime.date.today().isoformat()}. {args.steps} iterations per run.\n", *lines])
    print(text)
    if not args.no_docs:
        write_docs(text, marker="processes" if args.workload == "toy" else f"processes_{args.workload}")


if __name__ == "__main__":
    main()
