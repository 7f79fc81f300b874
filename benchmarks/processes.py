"""Seconds per iteration of the same distillation with 1 and with 2 processes (torchrun, gloo on CPU).

    python benchmarks/processes.py [--steps 300]

Both runs use the same global batch (256) and one thread per process, one after the other on the same
machine; the table gives the median s/iter each reports and their ratio. On a 2-core machine two
processes split each batch between the cores, and pay an all-reduce of the gradients per update.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from toy_family import write_docs


def run(out: Path, procs: int, steps: int, divergence: str) -> float:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [*(launcher if procs > 1 else [sys.executable]), "-m", "dibregman", "distill", "--steps", str(steps),
           "--fit-steps", "10", "--eval-every", "100000", "--checkpoint-every", "100000", "--eval-samples", "256",
           "--divergence", divergence, "--no-progress", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((out / "summary.json").read_text())["step_time_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--divergence", default="hellinger")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t1 = run(Path(tmp) / "one", 1, args.steps, args.divergence)
        t2 = run(Path(tmp) / "two", 2, args.steps, args.divergence)
    import torch

    text = "\n".join([
        "## One process vs two (`benchmarks/processes.py`)\n",
        f"Command: `python benchmarks/processes.py {' '.join(sys.argv[1:])}`. Machine: {os.cpu_count()} CPU cores "
        f"({platform.machine()}), torch {torch.__version__}, gloo, one thread per process. "
        f"Date: {datetime.date.today().isoformat()}. Teacher gmm:ring8_imbalanced, {args.divergence}, global batch "
        f"256, MLP 3x128, {args.steps} iterations.\n",
        "| processes | s/iter (median) | ratio to 1 process |", "|---|---|---|",
        f"| 1 | {t1:.4f} | 1.00 |", f"| 2 | {t2:.4f} | {t2 / t1:.2f} |"])
    print(text)
    if not args.no_docs:
        write_docs(text, marker="processes")


if __name__ == "__main__":
    main()
