"""Host syncs per distillation step on a GPU: ``torch.cuda.set_sync_debug_mode("warn")`` makes CUDA warn at
every synchronising call; the warnings of ``--steps`` steps of the ``fashion-mnist`` preset are counted (after
two warm-up steps) and printed with where they came from. Part of ``benchmarks/gpu_check.sh``.

    python benchmarks/gpu_syncs.py [--steps 10] [key=value ...]   # e.g. precision=bf16 lora_rank=16
"""

from __future__ import annotations

import argparse
import collections
import json
import traceback
import warnings
from pathlib import Path

import torch

from dibregman.teachers import load_teacher
from dibregman.train.conditions import conditions_for
from dibregman.train.config import DistillConfig, resolve
from dibregman.train.state import build_state
from dibregman.train.step import distill_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("overrides", nargs="*", help="config options as key=value (JSON values)")
    args = p.parse_args()
    overrides = {"classifier": "none", "out": "unused", "device": "cuda"}
    for item in args.overrides:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    cfg = resolve(DistillConfig, preset="fashion-mnist", overrides=overrides)
    device = torch.device("cuda")
    teacher = load_teacher(cfg.teacher).to(device)
    s = build_state(cfg, teacher, conditions_for(teacher, cfg.prompts, device), Path("unused"), device, slice(None),
                    "gpu-check", resuming=False)
    for _ in range(2):
        distill_step(s)
    s.guard.check()
    torch.cuda.synchronize()
    sites: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "dibregman" in f.filename]
        sites[f"{frames[-1].filename.split('dibregman/')[-1]}:{frames[-1].lineno}" if frames else "?"] += 1

    old = warnings.showwarning
    warnings.showwarning = record
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(args.steps):
            distill_step(s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    s.guard.check()
    print(json.dumps({"options": {k: v for k, v in overrides.items() if k not in ("classifier", "out")},
                      "steps": args.steps, "syncs": sum(sites.values()),
                      "syncs_per_step": sum(sites.values()) / args.steps, "where": dict(sites)}))


if __name__ == "__main__":
    main()
