"""``dibregman`` command line: demo, train-teacher, distill, sample, eval.

Options of ``distill`` and ``train-teacher`` are generated from the config dataclasses, so the CLI, the
config files and the Python API accept exactly the same names.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from .train.config import PRESETS, ConfigError, DistillConfig, TeacherConfig, resolve, to_dict

DEMO_DIVERGENCES = ("reverse_kl", "hellinger")  # the baseline and the default Di-Bregman member
DEMO_DATASETS = ("ring", "fashion-mnist", "fashion-mnist-text")  # --dataset X runs the distill preset "demo" or X

HELP = {
    "teacher": "gmm:<built-in or spec.json/.toml> (analytic mixture), net:<folder from train-teacher>, "
               "net:fashion-mnist (shipped), diffusers:<local folder>, edm:<EDM network-snapshot .pkl>",
    "divergence": "generator divergence: reverse_kl (DMD), forward_kl, pearson, logistic, power:<alpha>, "
                  "hellinger, jeffreys, softened_rkl, or your own convex h as py:<module>:<function>",
    "critic_loss": "Bregman density-ratio loss of the critic (logistic = the usual classifier)",
    "critic_data": "what stands for the teacher law in the critic: teacher (its 35-NFE samples) or data",
    "fake_score_steps": "K: fake-score and critic updates per generator update",
    "weighting": "time weighting of the update: dmd (1/mean|x - D_T|), sigma2, none",
    "r_clip_min": "lower clip of the ratio r = q/p", "r_clip_max": "upper clip of the ratio r = q/p",
    "omega_normalize": "normalise omega by its batch mean, by per-noise-bin running means, or not",
    "gan_weight": "weight of an added non-saturating GAN term (0: off)",
    "generator_mode": "score: omega * (D_F - D_T); discriminator: the critic-only form of the same gradient",
    "fit_steps": "analytic teacher only: steps fitting the MLP the students start from",
    "nonfinite": "strict: stop at a NaN/inf loss or gradient; skip: drop such steps and count them",
    "data": "toy set (moons, swiss_roll, checkerboard, spirals, grid25, ring8) or a .npy/.csv point cloud",
    "out": "run folder (refused if it already holds a run, unless --resume)",
    "device": "auto, cpu, cuda or cuda:N",
}


class UserError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line, like every other user error (see ``main``)."""

    def error(self, message: str) -> NoReturn:
        if message.endswith("expected one argument"):  # argparse takes "-1e-3" for a flag
            message += "; write a value that starts with '-' as --option=VALUE"
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_config_options(p: argparse.ArgumentParser, cls: type, kind: str) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS[kind]), help="start from a named preset")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of options (flags override it)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only on a terminal)")
    group = p.add_argument_group("options (also valid as keys of --config files)")
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(flag, dest=f.name, default=None, metavar=type(f.default).__name__.upper(),
                           help=f"{HELP.get(f.name, '')} (default: {f.default})".strip())


def _resolve(args: argparse.Namespace, cls: type) -> Any:
    overrides = {f.name: getattr(args, f.name) for f in fields(cls)}
    return resolve(cls, preset=args.preset, file=args.config, overrides=overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dibregman", description="Distill a diffusion teacher into a "
                     "one-step generator by Bregman density-ratio matching.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="reverse KL (DMD) vs the default Di-Bregman divergence on an imbalanced "
                       "8-mode ring (or --dataset fashion-mnist: from the shipped teacher), equal budget; prints the "
                       "table and writes a report")
    p.add_argument("--divergences", default=",".join(DEMO_DIVERGENCES),
                   help=f"comma-separated members to compare (default: {','.join(DEMO_DIVERGENCES)})")
    p.add_argument("--dataset", choices=DEMO_DATASETS, default="ring",
                   help="ring: the analytic 2-D test bed (about 2 min); fashion-mnist: images from the shipped "
                        "teacher (about 12 min on 2 CPU cores); fashion-mnist-text: text-to-image from the shipped "
                        "caption-conditioned teacher (label_acc is prompt adherence)")
    _add_config_options(p, DistillConfig, "distill")

    p = sub.add_parser("train-teacher", help="train a diffusion teacher: an MLP on a toy set or a point cloud, a U-Net "
                       "on images (class- or caption-conditioned)")
    _add_config_options(p, TeacherConfig, "teacher")

    p = sub.add_parser("distill", help="distill a teacher into a one-step generator")
    _add_config_options(p, DistillConfig, "distill")

    sub.add_parser("list", help="list the divergences, presets, built-in mixtures and toy data sets")

    p = sub.add_parser("sample", help="draw samples from a finished run's one-step generator")
    p.add_argument("run", help="run folder written by distill (or its generator/ subfolder)")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=None,
                   help="class-conditional generator: every sample of this class (default: sample i has class i mod K)")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="text generator: a prompt (repeat for several; sample i gets prompt i mod N)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="text generator: a prompt file (one per line), or 'unseen' (default: the training captions)")
    p.add_argument("--out", default="samples.npz", help="output .npz (arrays 'x', and 'labels' when conditional); "
                   "a .png gets an image grid (images) or a scatter plot (points)")

    p = sub.add_parser("train-classifier", help="train the feature classifier image metrics use (FD, KID, "
                       "label accuracy) on an image data set")
    p.add_argument("--data", required=True, help="image data spec (fashion-mnist, mnist, digits, cifar10:<dir>, "
                   "folder:<dir>, file.npz)")
    p.add_argument("--out", required=True, help="folder for the classifier")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("export", help="write a finished image run's generator as a diffusers pipeline folder")
    p.add_argument("run", help="run folder written by distill (or its generator/ subfolder)")
    p.add_argument("--out", required=True, help="folder to write (DiffusionPipeline.from_pretrained(out, "
                   "trust_remote_code=True) loads it)")

    p = sub.add_parser("eval", help="metrics of a finished run against its teacher, with the teacher's row")
    p.add_argument("run", help="run folder written by distill")
    p.add_argument("--num", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", default=None, help="evaluate against another teacher spec")
    p.add_argument("--classifier", default="auto", help="images: feature classifier folder (auto: the shipped one)")
    p.add_argument("--prompts", default="", help="text generators: evaluate on a prompt file (with classes), or "
                   "'unseen' (caption templates the teacher never saw); default: the training captions")
    p.add_argument("--guidance", type=float, default=1.0, help="the teacher row's classifier-free guidance scale")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from . import api, dist
    from .report import format_table

    if args.command in ("demo", "distill", "train-teacher"):
        cls = TeacherConfig if args.command == "train-teacher" else DistillConfig
        if args.command == "demo" and args.preset is None:
            args.preset = "demo" if args.dataset == "ring" else args.dataset
        cfg = _resolve(args, cls)
        if args.dry_run:
            print(json.dumps(to_dict(cfg), indent=2))
            return 0
        if args.command == "train-teacher":
            command = shlex.join(["dibregman", *(sys.argv[1:] if argv is None else argv)])
            folder = api.train_teacher(cfg, resume=args.resume, progress=args.progress, command=command)
            if dist.is_main():  # under torchrun, rank 0 reports
                print(f"teacher folder: {folder} (distill it with --teacher net:{folder})")
        elif args.command == "distill":
            out = api.distill(cfg, resume=args.resume, progress=args.progress)
            if not dist.is_main():  # under torchrun, rank 0 reports
                return 0
            summary = json.loads((out / "summary.json").read_text())
            rows = [{"method": "teacher (Heun, 35 NFE)", **summary["teacher_metrics"]},
                    {"method": f"student {summary['divergence']} (1 NFE)", **summary["metrics"]}]
            print(format_table(rows, markdown=False))
            print(f"run folder: {out} (report: {out / 'report.md'})")
        else:
            if args.dataset != "ring" and args.out is None:
                cfg.out = f"runs/demo-{args.dataset}"
            divs = [d.strip() for d in args.divergences.split(",") if d.strip()]
            opts = {k: v for k, v in to_dict(cfg).items() if k not in ("divergence", "out")}
            rows, _ = api.compare(divs, cfg.out, resume=args.resume, progress=args.progress, **opts)
            if not rows:  # not rank 0 under torchrun
                return 0
            print(format_table(rows, markdown=False))
            for key, what in (("mode_tv", "mode-weight error (mode_tv"), ("fd", "Frechet distance on classifier "
                              "features (fd")):  # the headline, in one line
                if key in rows[0]:
                    print(f"{what}, lower is better): "
                          + ", ".join(f"{r['method'].split(' (')[0]} {r[key]:.4f}" for r in rows))
            print(f"report: {Path(cfg.out) / 'report.md'}")
        return 0
    if args.command == "list":
        print(listing())
        return 0
    if args.command == "sample":
        labels = None
        if args.label is not None:
            import torch

            labels = torch.full((args.num,), args.label)
        if args.prompt and args.prompts:
            raise UserError("give --prompt or --prompts, not both")
        x = api.sample(args.run, args.num, args.seed, labels=labels, prompts=args.prompt or args.prompts)
        _write_samples(Path(args.out), x, labels)
        print(f"wrote {args.num} samples to {args.out}")
        return 0
    if args.command == "train-classifier":
        from .train.classifier import train_classifier

        command = shlex.join(["dibregman", *(sys.argv[1:] if argv is None else argv)])
        folder = train_classifier(args.data, args.out, epochs=args.epochs, seed=args.seed, command=command)
        print(f"classifier folder: {folder} (use it with --classifier {folder})")
        return 0
    if args.command == "export":
        from .export import export_diffusers

        folder = export_diffusers(args.run, args.out)
        print(f"diffusers folder: {folder} (DiffusionPipeline.from_pretrained({str(folder)!r}, "
              "trust_remote_code=True))")
        return 0
    rows = [api.teacher_row(args.teacher or _run_teacher(args.run), args.num, args.seed, args.classifier,
                            args.prompts, args.guidance),
            api.evaluate_run(args.run, args.num, args.seed, args.teacher, args.classifier, args.prompts)]
    print(json.dumps(rows, indent=2) if args.json else format_table(rows, markdown=False))
    return 0


def listing() -> str:
    """What names the options accept, from the registries themselves (so it cannot go stale)."""
    from .assets import shipped_names
    from .data.images import SOURCES as IMAGE_SOURCES
    from .data.toy2d import TOY_SETS
    from .divergences import REGISTRY
    from .teachers.gmm import BUILTINS

    lines = ["divergences (--divergence, --critic-loss): " + ", ".join(REGISTRY)
             + "; power takes alpha as power:<alpha>; your own convex h: py:<module>:<function>",
             "built-in mixtures (--teacher gmm:<name>, or gmm:<spec.json|.toml>): " + ", ".join(BUILTINS),
             "toy data sets (train-teacher --data, or a .npy/.csv file): " + ", ".join(TOY_SETS),
             "image data (train-teacher --data, train-classifier --data): "
             + ", ".join(f"{name}:<folder>" if name in ("cifar10", "folder") else name for name in IMAGE_SOURCES)
             + ", <file>.npz",
             "shipped teachers (--teacher net:<name>): " + ", ".join(shipped_names("teacher"))]
    lines += [f"{kind} presets: " + ", ".join(names) for kind, names in PRESETS.items()]
    return "\n".join(lines)


def _run_teacher(run_dir: str) -> str:
    from .artifacts import load_generator

    teacher = load_generator(run_dir)[1].get("teacher")
    if not isinstance(teacher, str):
        raise UserError(f"{run_dir} does not record its teacher; pass --teacher")
    return teacher


def _write_samples(path: Path, x: Any, labels: Any = None) -> None:
    import numpy as np

    if path.suffix == ".png" and x.ndim == 4:
        from .grids import save_grid

        save_grid(path, x, nrow=10)
    elif path.suffix == ".png":
        from .report import scatter_png

        scatter_png(path, x.numpy())
    elif path.suffix == ".npz":
        from .io import atomic_open

        with atomic_open(path) as f:
            np.savez(f, x=x.numpy(), **({"labels": labels.numpy()} if labels is not None else {}))
    else:
        raise UserError(f"--out must end in .npz or .png; got {path}")


def main(argv: list[str] | None = None) -> None:
    """The console entry point: a user error (bad option, file or folder; full disk; a non-finite run)
    prints one ``dibregman: error: ...`` line and exits with 2; ``DIBREGMAN_TRACEBACK=1`` re-raises."""
    from .train.checkpoint import CheckpointError
    from .train.guard import NonFiniteError

    try:
        sys.exit(run(argv))
    except (ConfigError, UserError, CheckpointError, NonFiniteError, ValueError, OSError) as e:
        if os.environ.get("DIBREGMAN_TRACEBACK"):
            raise
        message = " ".join((_os_message(e) if isinstance(e, OSError) else str(e)).splitlines())
        # undecodable argv bytes arrive as lone surrogates: escape them rather than fail while reporting
        line = f"dibregman: error: {message or type(e).__name__}".encode("utf-8", "backslashreplace").decode()
        print(line, file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Interrupted (a checkpoint was saved) carries the signal's number
        print(f"dibregman: {e or 'interrupted'}", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", 2))


def _os_message(e: OSError) -> str:
    """Our own OSErrors (RunIOError, FileNotFoundError with a message) read well as they are; a raw
    one from a library (``[Errno 28] No space left on device: 'x'``) gets its file and a fix."""
    from .io import RunIOError, describe_write_error

    if isinstance(e, RunIOError) or e.errno is None or e.filename is None:
        return str(e)
    if e.errno == errno.ENOENT:
        return f"{e.filename} does not exist; check the path"
    return describe_write_error(e, e.filename, doing="accessing")
