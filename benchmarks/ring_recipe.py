"""Which recipe keeps the teacher's variety on the exact test bed (``gmm:ring8_imbalanced``, the demo's budget).

    python benchmarks/ring_recipe.py --variants base,k5 --members hellinger,reverse_kl --seeds 0,1,2
    python benchmarks/ring_recipe.py --list                 # the variants and their options
    python benchmarks/ring_recipe.py --quick                # smoke: 1 variant, 1 member, 60 steps

Every run is a real ``dibregman.distill`` from the ``demo`` preset at one step (``BASE``) plus the variant's
options (one core each, ``--jobs`` at a time). Each finished generator is then evaluated on ``--draws``
independent sample draws of 100,000 samples (``db.evaluate_run(run, 100000, seed=d)``: its own noise and its own
reference set per draw), so every cell says mean +- std over draws (one training seed) or over training seeds
(the mean over draws of each seed). The exact diagnostics of the last evaluation step (``diag/*`` in
``stats.jsonl``) are kept too. Results are appended to ``--results`` (JSON lines, reused when the same run is
asked for again) and the table goes to stdout and, with ``--write-docs``, to ``docs/benchmarks.md`` between this
script's markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_family import write_docs  # noqa: E402

TEACHER = "gmm:ring8_imbalanced"
METRICS = ["mode_tv", "off_mode", "nll", "w1", "energy", "mmd"]
DIAG = ["fake_score_err@0.05", "fake_score_err@1", "update_cos@0.05", "update_cos@1", "log_r_corr@0.05",
        "log_r_corr@0.5"]
# the demo preset trains two-step students now; the variants below were measured from one step
BASE = {"student_steps": 1}
VARIANTS: dict[str, dict] = {
    "base": {},
    "k5": {"fake_score_steps": 5},
    "fs_lr3x": {"lr_fake_score": 3e-3},
    "gen_lr_half": {"lr_generator": 5e-4},
    "ema999": {"ema_decay": 0.999},
    "clip_fdistill": {"r_clip_min": 0.05, "r_clip_max": 10.0},
    "head_fake": {"critic_head": "fake_score"},
    "wide": {"hidden": 256},
    "sigma_g1": {"sigma_g": 1.0},
    "t_low": {"generator_t_max": 0.995},
    "t_high": {"generator_t_min": 0.3},
    "batch1k": {"batch_size": 1024},
    "bins": {"omega_normalize": "bins"},
    "data": {"critic_data": "data"},
    "reg0.25": {"regression_weight": 0.25},
    "reg1": {"regression_weight": 1.0},
    "reg4": {"regression_weight": 4.0},
    "reg1_k5": {"regression_weight": 1.0, "fake_score_steps": 5},
    "reg1_wide": {"regression_weight": 1.0, "hidden": 256},
    "gan0.05": {"gan_weight": 0.05},
    "reg1_gan0.05": {"regression_weight": 1.0, "gan_weight": 0.05},
    "reg4_cos": {"regression_weight": 4.0, "lr_schedule": "cosine"},
    # few-step students (DMD2's backward simulation) on the reg4_cos recipe (the demo's)
    "reg4_cos_steps2": {"regression_weight": 4.0, "lr_schedule": "cosine", "student_steps": 2,
                        "student_sigma_min": 0.64},  # the first default: half the ring's sigma_data
    "reg4_cos_steps4": {"regression_weight": 4.0, "lr_schedule": "cosine", "student_steps": 4,
                        "student_sigma_min": 0.64},
    "reg4_cos_steps2_lo": {"regression_weight": 4.0, "lr_schedule": "cosine", "student_steps": 2,
                           "student_sigma_min": 0.2},
    "reg4_cos_steps2_lo0.1": {"regression_weight": 4.0, "lr_schedule": "cosine", "student_steps": 2,
                              "student_sigma_min": 0.1},
    "reg4_cos_steps4_lo": {"regression_weight": 4.0, "lr_schedule": "cosine", "student_steps": 4,
                           "student_sigma_min": 0.2},
    # on the demo's recipe (two steps ending at 0.2): one fake-score update per step; DMD2's GAN term; width
    "steps2_k1": {"regression_weight": 4.0, "lr_schedule": "cosine", "student_steps": 2, "student_sigma_min": 0.2,
                  "fake_score_steps": 1},
    "steps2_gan0.01": {"regression_weight": 4.0, "lr_schedule": "cosine", "student_steps": 2,
                       "student_sigma_min": 0.2, "gan_weight": 0.01},
    "steps2_wide": {"regression_weight": 4.0, "lr_schedule": "cosine", "student_steps": 2, "student_sigma_min": 0.2,
                    "hidden": 256},
    # the critic as a head on the fake score's last hidden layer (DMD2's choice on images): no network of its own
    "steps2_fshead": {"regression_weight": 4.0, "lr_schedule": "cosine", "student_steps": 2, "student_sigma_min": 0.2,
                      "critic_head": "fake_score"},
    # the fake score trained on the generator update's noise law (DMD2 and FastGen use one law for both): EDM's
    # lognormal rarely draws the large sigmas where the update decides the mode weights
    "steps2_fskarras": {"regression_weight": 4.0, "lr_schedule": "cosine", "student_steps": 2,
                        "student_sigma_min": 0.2, "critic_head": "fake_score", "fake_score_sigmas": "karras"},
}


def run_key(variant: str, member: str, seed: int, steps: int | None) -> str:
    return f"{variant}|{member}|{seed}|{steps or 'preset'}"


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    import dibregman as db

    out = Path(job["out"])
    options = {**BASE, **VARIANTS[job["variant"]], **({"steps": job["steps"]} if job["steps"] else {})}
    if not (out / "summary.json").is_file():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        db.distill(preset="demo", divergence=job["member"], seed=job["seed"], out=str(out), progress=False, **options)
    summary = json.loads((out / "summary.json").read_text())
    draws = [db.evaluate_run(out, 100_000, seed=d) for d in range(job["draws"])]
    diag = {}
    for line in (out / "stats.jsonl").read_text().splitlines():
        row = json.loads(line)
        if any(k.startswith("diag/") for k in row):
            diag = {k[5:]: v for k, v in row.items() if k.startswith("diag/")}
    return {"key": job["key"], "variant": job["variant"], "member": job["member"], "seed": job["seed"],
            "draws": [{k: d[k] for k in METRICS} for d in draws], "diag": diag,
            "step_time_s": summary["step_time_s"]}


def teacher_draws(draws: int) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    import dibregman as db

    return [{k: db.teacher_row(TEACHER, 100_000, seed=d)[k] for k in METRICS} for d in range(draws)]


def fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) < 2 else f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def table(results: list[dict], teacher: list[dict]) -> str:
    """One row per (variant, member): mean +- std over training seeds of each seed's mean over draws (one
    seed: over draws); the teacher row: over draws."""
    head = ("| variant | member | seeds | " + " | ".join(METRICS) + " | "
            + " | ".join(DIAG) + " | s/iter |")
    lines = [head, "|" + "---|" * (len(METRICS) + len(DIAG) + 4)]
    lines.append("| teacher (Heun, 35 NFE) | - | - | " + " | ".join(fmt([d[k] for d in teacher]) for k in METRICS)
                 + " | " + " | ".join("-" for _ in DIAG) + " | - |")
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["member"]), []).append(r)
    for (variant, member), rs in groups.items():
        if len(rs) == 1:
            cells = [fmt([d[k] for d in rs[0]["draws"]]) for k in METRICS]
        else:
            cells = [fmt([statistics.fmean(d[k] for d in r["draws"]) for r in rs]) for k in METRICS]
        diag = [fmt([r["diag"][k] for r in rs]) if all(k in r["diag"] for r in rs) else "-" for k in DIAG]
        step = statistics.median(r["step_time_s"] for r in rs)
        lines.append(f"| {variant} | {member} | {len(rs)} | " + " | ".join(cells) + " | " + " | ".join(diag)
                     + f" | {step:.4f} |")
    spread = [statistics.fmean(statistics.stdev(d[k] for d in r["draws"]) for r in results) for k in METRICS]
    if all(len(r["draws"]) > 1 for r in results):
        lines.append("| sample-draw spread (mean over runs of the std over draws) | | | "
                     + " | ".join(f"{v:.4f}" for v in spread) + " | " + " | ".join("" for _ in DIAG) + " | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="base", help="comma-separated names from --list")
    p.add_argument("--members", default="hellinger,reverse_kl", help="comma-separated divergences")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=None, help="override the preset's 2000 steps")
    p.add_argument("--draws", type=int, default=3, help="sample draws of 100,000 per generator")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one core each)")
    p.add_argument("--runs", default="/tmp/dibregman-ring-recipe", help="folder for the runs")
    p.add_argument("--results", default="/tmp/dibregman-ring-recipe/results.jsonl")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    p.add_argument("--write-docs", metavar="MARKER", default=None,
                   help="also write the table to docs/benchmarks.md between <!-- MARKER:start/end --> markers")
    p.add_argument("--quick", action="store_true", help="smoke test: base, hellinger, seed 0, 60 steps, 1 draw")
    args = p.parse_args()
    if args.list:
        for name, opts in VARIANTS.items():
            print(f"{name}: {opts}")
        return
    if args.quick:
        args.variants, args.members, args.seeds, args.steps, args.draws = "base", "hellinger", "0", 60, 1
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; see --list")
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    done = {}
    if results_path.is_file():
        for line in results_path.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    jobs = []
    for v in variants:
        for m in args.members.split(","):
            for s in (int(x) for x in args.seeds.split(",")):
                key = run_key(v, m, s, args.steps)
                if key not in done or len(done[key]["draws"]) < args.draws:
                    out = Path(args.runs) / key.replace("|", "_").replace(":", "-")
                    jobs.append({"key": key, "variant": v, "member": m, "seed": s, "steps": args.steps,
                                 "draws": args.draws, "out": str(out)})
    with ProcessPoolExecutor(args.jobs) as pool:
        teacher_future = pool.submit(teacher_draws, args.draws)
        for row in pool.map(run_one, jobs):
            done[row["key"]] = row
            with results_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"done {row['key']}", file=sys.stderr, flush=True)
        teacher = teacher_future.result()
    keys = {run_key(v, m, int(s), args.steps) for v in variants for m in args.members.split(",")
            for s in args.seeds.split(",")}
    results = [done[k] for k in done if k in keys]
    command = "python benchmarks/ring_recipe.py " + " ".join(sys.argv[1:])
    text = (f"Command: `{command}`; {datetime.date.today()}, {platform.machine()}, one core per run, "
            f"{args.jobs} runs at a time; {args.draws} draws of 100,000 samples per generator; training seeds "
            f"{args.seeds}.\n\n{table(results, teacher)}")
    print(text)
    if args.write_docs:
        write_docs(text, marker=args.write_docs)


if __name__ == "__main__":
    main()
