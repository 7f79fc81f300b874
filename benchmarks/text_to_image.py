"""Text-to-image benchmark on Fashion-MNIST captions: the caption-conditioned teacher (35 NFE) vs one-step
students of several divergences, on the captions they were distilled on and on caption templates the
teacher never saw, and (``--speed``) the images/s of each, decoding included.

    python benchmarks/text_to_image.py                # the documented run (see docs/benchmarks.md)
    python benchmarks/text_to_image.py --stage runs   # only the distillations (cached in --out)
    python benchmarks/text_to_image.py --preset fashion-mnist-latent --seeds 0,1,2 --speed \
        --out runs/bench-latent --docs-marker latent  # the latent (VAE + SD3-shaped flow) teacher

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


def distill_run(name: str, seed: int, args: argparse.Namespace, out: Path) -> Path:
    """One distillation in its own process; skipped when finished, resumed when interrupted."""
    folder = out / (name.replace(":", "_") + (f"_s{seed}" if seed else ""))
    if not (folder / "summary.json").exists():
        cmd = [sys.executable, "-m", "dibregman", "distill", "--preset", args.preset, "--divergence", name,
               "--teacher", args.teacher, "--guidance", str(args.guidance), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--sigma-g", str(args.sigma_g),
               "--eval-samples", str(args.run_eval_samples),
               "--eval-every", str(args.steps), "--device", args.device, "--seed", str(seed), "--out", str(folder),
               "--progress" if sys.stderr.isatty() else "--no-progress"]
        if (folder / "checkpoints").exists():
            cmd.append("--resume")
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"distillation {name} failed: {' '.join(cmd)}")
    return folder


def spread_table(rows: list[dict]) -> str:
    """Per prompt set and student: the mean of each metric over seeds, with its min and max."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["nfe"] == 1:
            groups.setdefault((r["prompts"], r["method"]), []).append(r)
    out = []
    for (ps, method), rs in groups.items():
        row = {"prompts": ps, "method": method, "seeds": len(rs)}
        for k in ("label_acc", "fd", "precision", "recall"):
            v = [r[k] for r in rs]
            row[k] = f"{sum(v) / len(v):.3g} ({min(v):.3g}-{max(v):.3g})"
        out.append(row)
    return format_table(out)


def cached_row(path: Path, make) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    row = make()
    path.write_text(json.dumps(row))
    return row


def images_per_s(draw, repeats: int = 2) -> float:
    """The best of ``repeats`` timed calls of ``draw() -> images`` (the caller warms it up first)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = len(draw())
        best = min(best, time.perf_counter() - t0)
    return n / best


def speed_rows(teacher_spec: str, runs: dict, n: int, guidance: float) -> list[dict]:
    """Images/s of the teacher's 35-NFE sampler and of each one-step student on the same prompts, both decoded
    by the VAE where the teacher is latent, measured one after the other in this process."""
    from dibregman.artifacts import load_codec_of, load_generator
    from dibregman.sampling import batch_for, seeded_noise
    from dibregman.teachers import load_teacher
    from dibregman.train.components import teacher_samples
    from dibregman.train.conditions import conditions_for

    teacher = load_teacher(teacher_spec)
    teacher.guidance = guidance
    conds = conditions_for(teacher, "")
    cpu = torch.device("cpu")
    teacher_samples(teacher, 8, 0, cpu, conds, decode=True)  # warm-up
    rows = [{"method": "teacher (Heun, 35 NFE)",
             "images_per_s": images_per_s(lambda: teacher_samples(teacher, n, 0, cpu, conds, decode=True))}]
    for name, folder in runs.items():
        gen, info = load_generator(folder)
        codec = load_codec_of(folder, info)
        z = seeded_noise(0, n, gen.latent_shape(info["shape"]))
        cond = conds.lookup(conds.cycle(n))
        size = batch_for(info["shape"])

        @torch.no_grad()
        def draw(gen=gen, codec=codec, z=z, cond=cond, size=size) -> torch.Tensor:
            xs = [gen(zb, cb) for zb, cb in zip(z.split(size), cond.split(size), strict=True)]
            return torch.cat([codec.decode(x) if codec is not None else x for x in xs])

        draw()
        rows.append({"method": f"student ({name}, 1 NFE)", "images_per_s": images_per_s(draw)})
    for r in rows:
        r["speed_up"] = r["images_per_s"] / rows[0]["images_per_s"]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fashion-mnist-text", help="the students' distill preset")
    p.add_argument("--teacher", default=None, help="default: the preset's")
    p.add_argument("--divergences", default="reverse_kl,hellinger")
    p.add_argument("--seeds", default="0", help="training seeds of each student, comma separated")
    p.add_argument("--speed", action="store_true", help="also measure images/s (decoding included)")
    p.add_argument("--speed-samples", type=int, default=500)
    p.add_argument("--guidance", type=float, default=None, help="default: the preset's")
    p.add_argument("--steps", type=int, default=None, help="default: the preset's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--sigma-g", type=float, default=None, help="the students' noise level (inf: a flow teacher's "
                   "pure noise, as its pipeline's one-step call); default: the preset's")
    p.add_argument("--run-eval-samples", type=int, default=200, help="each run's own final evaluation")
    p.add_argument("--samples", type=int, default=1000, help="samples per model and prompt set")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench-text")
    p.add_argument("--stage", choices=("all", "runs", "teacher"), default="all")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--docs-marker", default="text", help="the block of docs/benchmarks.md to write")
    args = p.parse_args()
    preset = resolve(DistillConfig, preset=args.preset)
    args.teacher = args.teacher or preset.teacher
    args.guidance = preset.guidance if args.guidance is None else args.guidance
    args.steps = args.steps or preset.steps
    args.batch_size = args.batch_size or preset.batch_size
    args.sigma_g = preset.sigma_g if args.sigma_g is None else args.sigma_g
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    divs = [d for d in args.divergences.split(",") if d]
    n = args.samples

    seeds = [int(v) for v in args.seeds.split(",")]
    runs = {(d, seed): distill_run(d, seed, args, out) for d in divs for seed in seeds} \
        if args.stage in ("all", "runs") else {}
    rows = []
    if args.stage in ("all", "teacher"):
        for ps, spec in PROMPT_SETS.items():
            row = cached_row(out / "rows" / f"teacher_{ps}_{n}.json", lambda spec=spec: api.teacher_row(
                args.teacher, n, 0, prompts=spec, guidance=args.guidance))
            rows.append({"prompts": ps, **row})
    if args.stage != "all":
        return
    for (_, seed), folder in runs.items():
        for ps, spec in PROMPT_SETS.items():
            row = cached_row(out / "rows" / f"{folder.name}_{ps}_{n}.json",
                             lambda spec=spec, folder=folder: api.evaluate_run(folder, n, 0, prompts=spec))
            rows.append({"prompts": ps, "seed": seed, **row})
    rows.sort(key=lambda r: (r["prompts"] != "train", r["nfe"] == 1, r["method"], r.get("seed", -1)))
    keep = ("prompts", "method", "seed", "nfe", "label_acc", "fd", "precision", "recall")
    table = format_table([{k: r.get(k, "-") for k in keep if k != "seed" or len(seeds) > 1} for r in rows],
                         floatfmt=".4g")
    print(table)
    spread = spread_table(rows) if len(seeds) > 1 else ""
    speed = ""
    if args.speed:
        first = {d: folder for (d, seed), folder in runs.items() if seed == seeds[0]}
        speed_path = out / "rows" / f"speed_{args.speed_samples}.json"
        srows = cached_row(speed_path, lambda: speed_rows(args.teacher, first, args.speed_samples, args.guidance))
        speed = format_table(srows, floatfmt=".4g")
    print(spread, speed, sep="\n\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    lines = [
        f"Command: `python benchmarks/text_to_image.py {' '.join(sys.argv[1:])}`".rstrip() + "; machine: "
        f"{os.cpu_count()} CPU cores {platform.machine()}, torch {torch.__version__}, device {args.device}; "
        f"{date.today().isoformat()}; this invocation took {(time.perf_counter() - t_start) / 60:.0f} min (finished "
        "stages are read from the cache).", "",
        f"Teacher `{args.teacher}` with classifier-free guidance {args.guidance:g} (its 35-NFE Heun rows and the "
        f"students' targets); students: preset `{args.preset}`, {args.steps} steps, batch {args.batch_size}, "
        f"sigma_g {args.sigma_g:g}, "
        f"training seeds {args.seeds}, distilled on the teacher's training captions (8 templates x 10 classes).", "",
        table, "",
        *([f"Over the {len(seeds)} training seeds (mean, and min to max):", "", spread, ""] if spread else []),
        *([f"Speed: {args.speed_samples} images on the training captions, best of 2 timed calls after a warm-up, "
           "one after the other in one process, decoding included; the students of the first seed.", "", speed, ""]
          if speed else []),
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
