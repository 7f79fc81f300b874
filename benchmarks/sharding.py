"""Per-process memory and step time of DDP against FSDP2 (``parallel = fsdp``), two processes side by side.

    python benchmarks/sharding.py [--procs 2] [--steps 3] [--batch-size 8] [--large-channels 128] [--write-docs]

For each teacher (the image preset's shipped 1.0M-parameter U-Net, and a 16.7M-parameter U-Net of the same
family with untrained weights) and each mode, ``torchrun --nproc_per_node <procs>`` runs this file's worker:
every process builds the run's state (``train.state.build_state``, the ``fashion-mnist`` distill preset at
``--batch-size``), runs one warm-up step and ``--steps`` timed ones. Reported per process (the largest over
processes): the bytes its tensors hold, counted exactly, for the trainable networks' parameters, gradients
and Adam moments (what FSDP shards), and for the whole state besides (teacher, EMA: whole in both modes);
its peak RSS; seconds per step. With ``--write-docs`` the table replaces the one in docs/benchmarks.md
between the ``sharding`` markers.
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _bytes(tensors) -> int:
    from dibregman.train.sharding import local

    return sum(local(t).numel() * t.element_size() for t in tensors if t is not None)


def worker(spec: dict) -> None:
    import torch

    from dibregman import dist
    from dibregman.teachers import load_teacher
    from dibregman.train.conditions import conditions_for
    from dibregman.train.config import DistillConfig, resolve
    from dibregman.train.state import build_state
    from dibregman.train.step import distill_step

    torch.set_num_threads(1)
    dist.init()
    overrides = {"teacher": spec["teacher"], "parallel": spec["mode"], "classifier": "none", "out": "unused",
                 "batch_size": spec["batch_size"]}
    cfg = resolve(DistillConfig, preset="fashion-mnist", overrides=overrides)
    device = torch.device("cpu")
    teacher = load_teacher(cfg.teacher).to(device)
    s = build_state(cfg, teacher, conditions_for(teacher, cfg.prompts, device), Path("unused"), device,
                    dist.local_slice(cfg.batch_size), "benchmark", resuming=False)
    distill_step(s)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        distill_step(s)
    s.guard.check()
    dist.barrier()
    seconds = (time.perf_counter() - t0) / spec["steps"]
    nets = s.c.trained()
    params = [p for m in nets.values() for p in m.parameters() if p.requires_grad]
    moments = [v for o in s.c.optimizers.values() for st in o.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.ndim > 0]
    trainable = _bytes(params) + _bytes(p.grad for p in params) + _bytes(moments)
    whole = _bytes(teacher.network.parameters()) + _bytes(s.c.ema.module.parameters())
    peak = int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("VmHWM:"))) * 1024
    values = torch.tensor([trainable, whole, peak, seconds], dtype=torch.float64)
    dist.all_reduce(values, "max")
    if dist.is_main():
        print(json.dumps({"trainable_mib": values[0].item() / 2**20, "whole_mib": values[1].item() / 2**20,
                          "peak_rss_mib": values[2].item() / 2**20, "s_per_iter": values[3].item(),
                          "teacher_params": sum(p.numel() for p in teacher.network.parameters())}))
    dist.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=2, help="processes per run (torchrun --nproc_per_node)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (memory of the state does not depend on it)")
    p.add_argument("--large-channels", type=int, default=128, help="base channels of the larger U-Net; 0: skip it")
    p.add_argument("--write-docs", action="store_true", help="write the table to docs/benchmarks.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    from memory import large_teacher

    from dibregman.assets import shipped

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teachers = {"image preset": f"net:{shipped('fashion-mnist', 'teacher')}"}
        if args.large_channels:
            teachers["larger U-Net"] = large_teacher(Path(tmp) / "large", args.large_channels)
        for name, teacher in teachers.items():
            for mode in ("ddp", "fsdp"):
                spec = {"teacher": teacher, "mode": mode, "steps": args.steps, "batch_size": args.batch_size}
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.procs}",
                       __file__, "--worker", json.dumps(spec)]
                done = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
                rows.append({"teacher": name, "mode": mode, **json.loads(done.stdout.strip().splitlines()[-1])})
                print(json.dumps(rows[-1]), file=sys.stderr)
    lines = ["## Sharding: DDP against FSDP2 (`benchmarks/sharding.py`)\n",
             f"Command: `python benchmarks/sharding.py {' '.join(sys.argv[1:])}`. Machine: {os.cpu_count()} CPU cores "
             f"{platform.machine()}, gloo, {args.procs} processes of 1 thread, fp32, date "
             f"{datetime.date.today().isoformat()}. Recipe: the `fashion-mnist` distill preset at global batch "
             f"{args.batch_size}, the mean of {args.steps} timed steps after one warm-up. Per process, the largest "
             "over processes: \"trainable\" counts the bytes of the generator's, fake score's and critic's "
             "parameters, gradients and Adam moments held by that process (exact, from the tensors); \"whole\" the "
             "teacher and the EMA, which every process holds in both modes; peak RSS is the whole process's.\n",
             "| teacher (params) | parallel | trainable per process (MiB) | ratio | whole (MiB) | peak RSS (MiB) | "
             "s/iter | ratio |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        ddp = next(x for x in rows if x["teacher"] == r["teacher"] and x["mode"] == "ddp")
        lines.append(f"| {r['teacher']} ({r['teacher_params'] / 1e6:.1f}M) | {r['mode']} | {r['trainable_mib']:.1f} | "
                     f"{r['trainable_mib'] / ddp['trainable_mib']:.2f} | {r['whole_mib']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['s_per_iter']:.3f} | {r['s_per_iter'] / ddp['s_per_iter']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        from toy_family import write_docs

        write_docs(text, marker="sharding")


if __name__ == "__main__":
    main()
