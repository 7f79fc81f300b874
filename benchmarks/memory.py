"""Peak memory and seconds per iteration of full fine-tuning against LoRA students (``lora_rank``), side by side.

    python benchmarks/memory.py [--steps 6] [--ranks 16,64] [--large-channels 128] [--no-docs]

Each configuration runs in its own process (so one's peak cannot hide in another's), one after another:
the teacher is loaded, the process's peak RSS is reset (``/proc/self/clear_refs``), then the run's state is
built (``train.state.build_state``: generator, fake score, critic, EMA, optimisers) and ``distill_step`` runs
once to warm up and ``--steps`` times timed. Reported: the peak RSS above the loaded teacher (what the
distillation itself adds: networks, optimiser states, activations) and the whole process's peak; where CUDA
is present, ``torch.cuda.max_memory_allocated`` too. Two teachers: the image preset's (the shipped
Fashion-MNIST U-Net, 1.0M parameters) and a larger U-Net of the same family (``--large-channels``; 128 gives
16.7M parameters) with untrained weights, which changes nothing about memory or time. The recipe is the
``fashion-mnist`` distill preset's, at the batch sizes asked for. With ``--write-docs`` the table replaces the one in
docs/benchmarks.md between the ``memory`` markers.
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


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(spec: dict) -> dict:
    import torch

    from dibregman.teachers import load_teacher
    from dibregman.train.conditions import conditions_for
    from dibregman.train.config import DistillConfig, resolve
    from dibregman.train.state import build_state
    from dibregman.train.step import distill_step

    torch.set_num_threads(spec["threads"])
    overrides = {"teacher": spec["teacher"], "lora_rank": spec["rank"], "precision": spec["precision"],
                 "classifier": "none", "out": "unused", "device": spec["device"], "batch_size": spec["batch_size"],
                 "grad_checkpointing": spec["grad_checkpointing"]}
    cfg = resolve(DistillConfig, preset="fashion-mnist", overrides=overrides)
    device = torch.device("cuda" if spec["device"] == "cuda" else "cpu")
    teacher = load_teacher(cfg.teacher).to(device)
    conds = conditions_for(teacher, cfg.prompts, device)
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from here
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s = build_state(cfg, teacher, conds, Path("unused"), device, slice(None), "benchmark", resuming=False)
    built = _rss_kib("VmRSS")
    distill_step(s)  # warm-up: allocator, optimiser states
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        distill_step(s)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / spec["steps"]
    trainable = sum(p.numel() for m in (s.c.generator, s.c.fake_score, s.c.critic) if m is not None
                    for p in m.parameters() if p.requires_grad)
    out = {"peak_above_teacher_mib": (_rss_kib("VmHWM") - before) / 1024, "built_mib": (built - before) / 1024,
           "peak_mib": _rss_kib("VmHWM") / 1024,
           "s_per_iter": seconds, "trainable_params": trainable,
           "teacher_params": sum(p.numel() for p in teacher.network.parameters())}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def large_teacher(folder: Path, channels: int) -> str:
    """A U-Net teacher of ``channels`` base channels on Fashion-MNIST, one training step (untrained weights)."""
    import dibregman as db

    if not (folder / "teacher").exists():
        db.train_teacher(preset="fashion-mnist", steps=1, base_channels=channels, channel_mult="1,2,2",
                         eval_samples=8, out=str(folder), progress=False)
    return f"net:{folder / 'teacher'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed iterations per configuration")
    p.add_argument("--ranks", default="16,64", help="LoRA ranks beside full fine-tuning (0), comma-separated")
    p.add_argument("--large-channels", type=int, default=128, help="base channels of the larger U-Net; 0: skip it")
    p.add_argument("--precisions", default="fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--batch-sizes", default="32", help="comma-separated global batch sizes (the preset's is 32)")
    p.add_argument("--grad-checkpointing", default="no", choices=("no", "yes", "both"),
                   help="recompute U-Net activations: in no row, every row, or both ways")
    p.add_argument("--teachers", default="preset,large", help="which teachers: preset, large, or both")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--write-docs", action="store_true",
                   help="replace the table in docs/benchmarks.md (its rows may come from several invocations)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    from dibregman.assets import shipped

    ranks = [0, *(int(r) for r in args.ranks.split(",") if r)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teachers = {"image preset": f"net:{shipped('fashion-mnist', 'teacher')}"}
        if "preset" not in args.teachers.split(","):
            teachers.clear()
        if args.large_channels and "large" in args.teachers.split(","):
            teachers["larger U-Net"] = large_teacher(Path(tmp) / "large",
                                                                                  args.large_channels)
        for name, teacher in teachers.items():
            checkpointing = {"no": (False,), "yes": (True,), "both": (False, True)}[args.grad_checkpointing]
            for precision, batch, ckpt in ((p, int(b), c) for p in args.precisions.split(",")
                                           for b in args.batch_sizes.split(",") for c in checkpointing):
                for rank in ranks:
                    spec = {"teacher": teacher, "rank": rank, "precision": precision, "steps": args.steps,
                            "threads": args.threads, "device": args.device, "batch_size": batch,
                            "grad_checkpointing": ckpt}
                    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                                          capture_output=True, text=True)
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    rows.append({"teacher": name, "precision": precision, "batch": batch, "ckpt": ckpt, "rank": rank,
                                 **result})
                    print(json.dumps(rows[-1]), file=sys.stderr)
    lines = ["## Memory and step time: full fine-tuning vs LoRA (`benchmarks/memory.py`)\n",
             f"Command: `python benchmarks/memory.py {' '.join(sys.argv[1:])}`. Machine: {os.cpu_count()} CPU cores "
             f"{platform.machine()}, {args.device}, {args.threads} threads, date "
             f"{datetime.date.today().isoformat()}. Recipe: the `fashion-mnist` distill preset (K = 1, critic head "
             "on the fake score) at the batch shown; one process per row, the mean of "
             f"{args.steps} timed iterations after one warm-up. Memory: peak RSS above the loaded teacher "
             "(networks, optimiser states, activations of the run) and, of it, what the state holds once built "
             "(the networks, before optimiser states and activations); ratios to full fine-tuning of the same "
             "teacher, precision and batch.\n",
             "| teacher (params) | precision | batch | grad ckpt | LoRA rank | trainable params | built (MiB) | "
             "peak above teacher (MiB) | ratio | s/iter | ratio |",
             "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        full = next(x for x in rows if (x["teacher"], x["precision"], x["batch"], x["ckpt"], x["rank"])
                    == (r["teacher"], r["precision"], r["batch"], r["ckpt"], 0))
        mem, step = r["peak_above_teacher_mib"], r["s_per_iter"]
        lines.append(f"| {r['teacher']} ({r['teacher_params'] / 1e6:.1f}M) | {r['precision']} | {r['batch']} | "
                     f"{'yes' if r['ckpt'] else 'no'} | {r['rank'] or 'full'} | {r['trainable_params']:,} | "
                     f"{r['built_mib']:.0f} | {mem:.0f} | "
                     f"{mem / full['peak_above_teacher_mib']:.2f} | {step:.3f} | {step / full['s_per_iter']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        from toy_family import write_docs

        write_docs(text, marker="memory")


if __name__ == "__main__":
    main()
