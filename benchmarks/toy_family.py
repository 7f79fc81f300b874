"""Every member of the divergence family on analytic mixtures, several seeds, equal budget.

    python benchmarks/toy_family.py                  # full: 3 mixtures x 8 members x 3 seeds
    python benchmarks/toy_family.py --quick          # 1 mixture, 2 members, 1 seed, few steps (smoke)

Each run is a real ``dibregman.distill`` (same steps, batch, K, networks and starting point); the table
gives mean +- std over seeds of the exact metrics against the mixture, with the teacher's own 35-NFE
sampler as the reference row, and each member's median seconds per iteration relative to reverse KL
measured in the same benchmark run. Results go to ``docs/benchmarks.md`` between markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

MEMBERS = ["reverse_kl", "forward_kl", "pearson", "logistic", "power:0.5", "hellinger", "jeffreys", "softened_rkl"]
MIXTURES = ["ring8_imbalanced", "grid25_imbalanced", "blobs8d_imbalanced"]
METRICS = ["mode_tv", "off_mode", "nll", "w1", "energy", "mmd"]
ROOT = Path(__file__).resolve().parents[1]


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)  # runs go in parallel, one core each
    import dibregman as db

    out = Path(job.pop("out"))
    if (out / "summary.json").is_file():  # finished earlier: reuse (the benchmark can be resumed)
        run = out
    else:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        run = db.distill(out=str(out), progress=False, **job)
    summary = json.loads((run / "summary.json").read_text())
    return {"teacher": job["teacher"], "divergence": job["divergence"], "seed": job["seed"],
            **summary["metrics"], "step_time_s": summary["step_time_s"]}


def teacher_rows(mixtures: list[str], eval_samples: int, seeds: list[int]) -> dict[str, dict]:
    import dibregman as db

    rows = {}
    for m in mixtures:
        per_seed = [db.teacher_row(f"gmm:{m}", eval_samples, s) for s in seeds]
        rows[m] = {k: [r[k] for r in per_seed] for k in METRICS}
    return rows


def fmt(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def table(mixture: str, results: list[dict], teacher: dict) -> str:
    head = "| method | " + " | ".join(METRICS) + " | s/iter vs reverse_kl (parallel runs: rough) |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    lines.append("| teacher (Heun, 35 NFE) | " + " | ".join(fmt(teacher[k]) for k in METRICS) + " | - |")
    rows = [r for r in results if r["teacher"] == f"gmm:{mixture}"]
    base = statistics.median(r["step_time_s"] for r in rows if r["divergence"] == "reverse_kl")
    for div in dict.fromkeys(r["divergence"] for r in rows):
        mine = [r for r in rows if r["divergence"] == div]
        ratio = statistics.median(r["step_time_s"] for r in mine) / base
        lines.append(f"| {div} | " + " | ".join(fmt([r[k] for r in mine]) for k in METRICS) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def ranking(results: list[dict], mixtures: list[str]) -> str:
    """Which members beat reverse KL on mode-weight error and W1, per mixture (means over seeds)."""
    out = []
    for m in mixtures:
        rows = [r for r in results if r["teacher"] == f"gmm:{m}"]
        mean = {d: {k: statistics.fmean(r[k] for r in rows if r["divergence"] == d) for k in METRICS}
                for d in dict.fromkeys(r["divergence"] for r in rows)}
        base = mean["reverse_kl"]
        both = [d for d in mean if d != "reverse_kl" and mean[d]["mode_tv"] < base["mode_tv"]
                and mean[d]["w1"] < base["w1"]]
        best = min(mean, key=lambda d: mean[d]["mode_tv"] + mean[d]["w1"])
        out.append(f"- **{m}**: better than reverse KL on both mode-weight TV and W1 (means): "
                   f"{', '.join(both) or 'none'}; lowest mode_tv + w1: **{best}**.")
    return "\n".join(out)


def write_docs(text: str, marker: str = "toy_family") -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{start}\n{text}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    doc.write_text(new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixtures", default=",".join(MIXTURES))
    p.add_argument("--divergences", default=",".join(MEMBERS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=4000)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_toy"))
    p.add_argument("--quick", action="store_true", help="smoke test: tiny budget, nothing written to docs")
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.mixtures, args.divergences, args.seeds, args.steps, args.eval_samples = (
            "ring8_imbalanced", "reverse_kl,forward_kl", "0", 50, 500)
    mixtures, divs = args.mixtures.split(","), args.divergences.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [{"teacher": f"gmm:{m}", "divergence": d, "seed": s, "steps": args.steps, "preset": "toy",
             "eval_samples": args.eval_samples, "eval_every": args.steps,
             "checkpoint_every": args.steps, "out": f"{args.out}/{m}/{d.replace(':', '_')}/seed{s}"}
            for m in mixtures for s in seeds for d in divs]
    started = datetime.datetime.now(datetime.timezone.utc)
    with ProcessPoolExecutor(args.jobs) as pool:
        results = []
        for i, r in enumerate(pool.map(run_one, jobs), 1):
            results.append(r)
            print(f"[{i}/{len(jobs)}] {r['teacher']} {r['divergence']} seed {r['seed']}: "
                  f"mode_tv {r['mode_tv']:.4f} w1 {r['w1']:.4f} s/iter {r['step_time_s']:.4f}", flush=True)
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    teacher = teacher_rows(mixtures, args.eval_samples, seeds)
    cmd = "python benchmarks/toy_family.py " + " ".join(sys.argv[1:])
    text = ["## Divergence family on analytic mixtures (`benchmarks/toy_family.py`)\n",
            f"Command: `{cmd.strip()}`. Machine: {os.cpu_count()} CPU cores ({platform.machine()}), "
            f"{args.jobs} runs in parallel, one thread each. Date: {started:%Y-%m-%d}. Wall time: {minutes:.0f} min.",
            f"Budget per run: {args.steps} generator steps (K = 2 fake-score/critic updates each), batch 256, "
            f"MLP 3x128, same seed-wise starting network for every member; metrics on {args.eval_samples} "
            f"samples of the EMA generator against exact mixture samples (W1 on 2000 of them); "
            f"mean ± std over seeds {args.seeds}.\n", ranking(results, mixtures), ""]
    for m in mixtures:
        text += [f"### {m}\n", table(m, results, teacher[m]), ""]
    print("\n".join(text))
    if not (args.quick or args.no_docs):
        write_docs("\n".join(text))


if __name__ == "__main__":
    main()
