"""``dibregman`` command line: demo, train-teacher, distill, sample, eval, export, tiny-pipeline.

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
# demo --dataset X: the teacher it distills and the preset it starts from (another --preset keeps the teacher)
DEMO_DATASETS = {"ring": ("gmm:ring8_imbalanced", "demo"), "fashion-mnist": ("net:fashion-mnist", "fashion-mnist"),
                 "fashion-mnist-text": ("net:fashion-mnist-text", "fashion-mnist-text")}

HELP = {  # distill (and demo) options; TEACHER_HELP below overrides the ones train-teacher reads otherwise
    "guidance": "classifier-free guidance scale w of a class- or text-conditional teacher, D_u + w (D_c - D_u); "
                "a number >= 0, 1 = none",
    "prompts": "text teachers: the prompts to distill on: empty (the teacher's training captions), unseen "
               "(held-out caption templates) or a prompt file, one per line",
    "critic_loss": "Bregman density-ratio loss of the critic: a divergence name as for --divergence "
                   "(logistic = the usual classifier)",
    "critic_data": "what stands for the teacher law in the critic: teacher (a pool of its 35-NFE samples, "
                   "data-free) or data (real data)",
    "teacher_pool": "size of that pool: teacher samples (critic_data teacher) or data points (data); integer >= 1",
    "classifier": "images: feature network of FD/KID/precision/recall/label accuracy: auto (the shipped one "
                  "for the data, else Inception when the fid extra is installed), none, or a train-classifier "
                  "folder; the teacher-feature metrics tnet_* are always computed",
    "steps": "generator updates; integer >= 1",
    "batch_size": "samples per batch of the generator, fake score and critic (the global batch under "
                  "torchrun); integer >= 1",
    "fake_score_steps": "K: fake-score and critic updates per generator update; integer >= 1",
    "lr_generator": "Adam learning rate of the generator; > 0 (the default suits toy MLPs, U-Nets want ~1e-4)",
    "lr_fake_score": "Adam learning rate of the fake score; > 0",
    "lr_critic": "Adam learning rate of the critic; > 0",
    "lr_schedule": "the generator's learning rate over the run: constant, or cosine (a half cosine from "
                   "lr_generator to 0 at `steps`, set from the step count; resuming with other steps changes it)",
    "beta1": "Adam beta1 of all three optimisers; in [0, 1)",
    "beta2": "Adam beta2 of all three optimisers; in [0, 1)",
    "ema_decay": "EMA decay of the saved generator; in [0, 1)",
    "grad_clip": "max global gradient norm per network; >= 0, 0 disables",
    "sigma_g": "the generator's fixed noise level: G(z) = D(sigma_g z, sigma_g); in [1e-4, 1e4], or inf: start "
               "from pure noise, a flow teacher's t = 1 (one step; how SD3 and Flux students export)",
    "student_steps": "network calls per sample, 1..16: 1 is a one-step student; N > 1 re-noises and denoises "
                     "its last estimate at N noise levels (DMD2's few-step student, trained by backward simulation)",
    "student_sigma_min": "the last noise level of a few-step student (its levels run from sigma_g down to it on "
                         "EDM's grid); in [0, sigma_g), 0 = 0.16 x the teacher's sigma_data",
    "sigma_min": "lowest noise level of the generator update and the critic; 0 = the teacher's sigma_min",
    "sigma_max": "highest noise level of the generator update and the critic; 0 = the teacher's sigma_max",
    "fake_score_p_mean": "the lognormal noise law (the fake score's by default): log sigma ~ N(p_mean, p_std^2); "
                         "p_mean, any number (EDM's -1.2)",
    "fake_score_p_std": "p_std of that law; > 0 (EDM's 1.2)",
    "generator_t_min": "the karras noise law (the generator and critic updates' by default): sigma from "
                       "Karras-uniform t in [t_min, t_max]; in [0, 1), t = 0 is sigma_max",
    "generator_t_max": "upper end of that t range; in (t_min, 1], t = 1 is sigma_min",
    "weighting": "time weighting of the update: dmd (1/mean|x - D_T|), sigma2 or none",
    "r_clip_min": "lower clip of the ratio r = q/p; > 0 and < 1",
    "r_clip_max": "upper clip of the ratio r = q/p; > 1",
    "omega_normalize": "normalise omega: batch (by its batch mean), bins (per-noise-bin running means) or none",
    "gan_weight": "weight of an added non-saturating GAN term; >= 0, 0 = off (the dmd2 preset: 0.01)",
    "regression_weight": "weight of DMD's regression loss |G(z) - x_T(z)|^2 on teacher_pool pairs of noise and the "
                         "teacher's 35-NFE ODE sample from it (paired once before training); >= 0, 0 = off",
    "regression_pairs": "how many pairs the regression term draws from; integer >= 0, 0 = teacher_pool",
    "generator_mode": "score: omega * (D_F - D_T); discriminator: the critic-only form of the same gradient",
    "hidden": "MLP width: the fitted start network of an analytic teacher and a standalone critic; integer >= 1",
    "depth": "MLP residual blocks of the same networks; integer 1 to 256",
    "fit_steps": "analytic teacher only: steps fitting the MLP the students start from; integer >= 0",
    "seed": "seed of every random draw of the run; integer",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N",
    "precision": "fp32, or bf16 (autocast of the forward passes; weights and optimisers stay fp32)",
    "grad_checkpointing": "U-Nets: recompute activations in backward, less memory, more time; true or false",
    "compile": "torch.compile the generator, fake score, critic and teacher network (the first steps compile; "
               "pays on a GPU, rarely on a CPU; weights and checkpoints as without it); true or false",
    "parallel": "how torchrun processes share the work: ddp (every process holds every network, gradients "
                "averaged) or fsdp (FSDP2: the generator's, fake score's and critic's weights, gradients and "
                "optimiser states sharded across processes; teacher and EMA whole on each)",
    "lora_rank": "0: train full copies of the teacher; R >= 1: the generator and the fake score are rank-R LoRA "
                 "adapters (peft) on the teacher's own frozen weights, one network in memory instead of three; "
                 "needs a network teacher",
    "lora_alpha": "LoRA scale numerator: adapters add (lora_alpha / lora_rank) B A; number >= 0, 0 = lora_rank",
    "tensorboard": "also write the stats as TensorBoard scalars to <out>/tensorboard; true or false",
    "log_every": "steps per line of stats.jsonl (values averaged over the window); integer >= 1",
    "eval_every": "steps between evaluations written to metrics.jsonl (the final one is always written); "
                  "integer >= 1",
    "eval_samples": "samples per evaluation (student, reference and teacher); integer >= 1, or 0: 100000 for "
                    "point teachers (mixture-exact metrics on all, energy/MMD/W1 on the first 5000/2000/2000), "
                    "2000 for images",
    "checkpoint_every": "steps between checkpoints (the last step is always saved); integer >= 1",
    "keep_checkpoints": "how many of the newest checkpoints are kept; integer >= 1",
    "nonfinite": "strict: stop at a NaN/inf loss or gradient; skip: drop such steps and count them",
    "out": "run folder (refused if it already holds a run, unless --resume)",
}
TEACHER_HELP = {
    "data": "toy set (moons, swiss_roll, checkerboard, spirals, grid25, ring8) or a .npy/.csv point cloud "
            "(an MLP teacher), or image data ({images}: a U-Net teacher)",
    "num_points": "points drawn from a toy set (a file uses all its rows); integer >= 1",
    "steps": "training steps; integer >= 1",
    "batch_size": "points or images per step (the global batch under torchrun); integer >= 1",
    "lr": "Adam learning rate; > 0",
    "ema_decay": "EMA decay of the saved weights; in [0, 1)",
    "hidden": "MLP width (point teachers), or the SD3 transformer's width (backbone sd3: a multiple of 32, "
              "32-wide attention heads); integer >= 1",
    "depth": "MLP residual blocks (point teachers), or SD3 joint transformer blocks; integer 1 to 256",
    "backbone": "auto (an MLP for points, a U-Net for images) or sd3 (a diffusers SD3Transformer2DModel trained "
                "by rectified flow as Stable Diffusion 3 is; caption-conditioned: needs --text-encoder "
                "minilm+pooled)",
    "patch_size": "backbone sd3: side of its square patches (tokens = (side / patch_size)^2); integer >= 1",
    "vae": "a diffusers AutoencoderKL folder (e.g. from `dibregman train-vae`): train on its scaled latents of "
           "the images, a latent teacher saved with its VAE; empty = pixels",
    "base_channels": "U-Net: channels of the first level; integer >= 1",
    "channel_mult": "U-Net: channel multiplier per level, comma separated (e.g. 1,2,2); each level after the "
                    "first halves the resolution",
    "layers_per_block": "U-Net: residual blocks per level; integer >= 1",
    "attention": "U-Net: self-attention in the bottleneck; true or false",
    "conditional": "class-conditional when the images have labels; true or false",
    "text_encoder": "condition on captions of the labels instead: minilm or a local tokenizer + text encoder "
                    "folder, either with +pooled to add the sentence embedding (backbone sd3); empty = labels",
    "label_dropout": "share of labels (or captions) dropped to no label (trains classifier-free guidance); "
                     "in [0, 1)",
    "seed": "seed of every random draw (data, weights, batches, noise, evaluation); integer",
    "eval_samples": "points: samples of the final energy distance to the data; images: samples in the "
                    "teacher folder's samples.png; integer >= 1",
    "keep_checkpoints": "how many of the newest checkpoints are kept; integer >= 1",
    "out": "run folder; the teacher is written to <out>/teacher (refused if it holds a run, unless --resume)",
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
    p.add_argument("--preset", choices=sorted(PRESETS[kind]), metavar="NAME",
                   help=f"start from a named set of option values: {', '.join(PRESETS[kind])} "
                        "(`dibregman list` shows them; docs/usage.md lists their values)")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of options (flags override it)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: only on a terminal)")
    group = p.add_argument_group("options (also valid as keys of --config files)")
    texts = {**HELP, **registered_help()}
    if kind == "teacher":
        texts = {**texts, **TEACHER_HELP, "data": TEACHER_HELP["data"].format(images=image_specs())}
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(flag, dest=f.name, default=None, metavar=type(f.default).__name__.upper(),
                           help=f"{texts.get(f.name, '')} (default: {str(f.default) or 'empty'})".strip())


def registered_help() -> dict[str, str]:
    """The help of the options whose values are a plug-in point's names, from its registry (so a name registered
    by your code shows up here too)."""
    from .divergences import DIVERGENCES
    from .teachers import TEACHER_FORMATS
    from .train.critics import CRITIC_HEADS
    from .train.sigmas import SIGMA_SAMPLERS

    members = ", ".join(DIVERGENCES.get(n).usage for n in DIVERGENCES)
    return {"teacher": "what to distill: " + TEACHER_FORMATS.describe(", "),
            "divergence": f"generator divergence: {members} (reverse_kl is DMD's), or your own convex h as "
                          "py:<module>:<function>",
            "critic_head": "the critic: " + CRITIC_HEADS.describe(", "),
            "generator_sigmas": "noise law of the generator and critic updates: " + SIGMA_SAMPLERS.describe(", "),
            "fake_score_sigmas": "noise law of the fake score's denoising loss: " + SIGMA_SAMPLERS.describe(", ")}


def image_specs() -> str:
    """The ``--data`` forms of the registered image sources (so one of your own shows up too)."""
    from .data.images import IMAGE_SOURCES

    return ", ".join(IMAGE_SOURCES.get(n).usage for n in IMAGE_SOURCES) + ", file.npz"


def _resolve(args: argparse.Namespace, cls: type) -> Any:
    overrides = {f.name: getattr(args, f.name) for f in fields(cls)}
    return resolve(cls, preset=args.preset, file=args.config, overrides=overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dibregman", description="Distill a diffusion teacher into a "
                     "one-step (or few-step) generator by Bregman density-ratio matching.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="reverse KL (DMD) vs the default Di-Bregman divergence on an imbalanced "
                       "8-mode ring (or --dataset fashion-mnist: from the shipped teacher), equal budget; prints the "
                       "table and writes a report")
    p.add_argument("--divergences", default=",".join(DEMO_DIVERGENCES),
                   help="comma-separated divergences to compare at equal budget, each as for --divergence "
                        f"(default: {','.join(DEMO_DIVERGENCES)}; demo ignores --divergence)")
    p.add_argument("--dataset", choices=tuple(DEMO_DATASETS), default=None,
                   help="the teacher to compare on, with its preset: ring (default; the analytic 2-D test bed, "
                        "about 3.5 min), fashion-mnist (images from the shipped teacher, about 12 min on 2 CPU "
                        "cores), fashion-mnist-text (text-to-image from the shipped caption-conditioned teacher; "
                        "label_acc is prompt adherence). --preset changes the schedule, not the teacher")
    _add_config_options(p, DistillConfig, "distill")

    p = sub.add_parser("train-teacher", help="train a diffusion teacher: an MLP on a toy set or a point cloud, a U-Net "
                       "on images (class- or caption-conditioned)")
    _add_config_options(p, TeacherConfig, "teacher")

    p = sub.add_parser("distill", help="distill a teacher into a one-step (or few-step, --student-steps) generator")
    _add_config_options(p, DistillConfig, "distill")

    sub.add_parser("list", help="list the divergences, presets, built-in mixtures and toy data sets")

    p = sub.add_parser("sample", help="draw samples from a finished run's generator")
    p.add_argument("run", help="run folder written by distill (or its generator/ subfolder)")
    p.add_argument("--num", type=int, default=1000, help="how many samples; integer >= 1")
    p.add_argument("--seed", type=int, default=0, help="noise draw: sample i depends on (seed, i) alone")
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
    p.add_argument("--data", required=True, help=f"image data spec: {image_specs()}")
    p.add_argument("--out", required=True, help="folder for the classifier")
    p.add_argument("--epochs", type=int, default=8, help="passes over the training split; integer >= 1")
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its newest "
                   "checkpoint (the same arguments); bit-exact")

    p = sub.add_parser("train-vae", help="train a small AutoencoderKL on an image data set: the VAE of a latent "
                       "teacher (train-teacher --vae)")
    p.add_argument("--data", required=True, help=f"image data spec: {image_specs()}")
    p.add_argument("--out", required=True, help="folder to write: <out>/vae (the diffusers VAE), vae.json, "
                   "reconstructions.png; while training a run folder (stats.jsonl, checkpoints/); refused if it "
                   "holds a finished VAE, or a started run unless --resume")
    p.add_argument("--steps", type=int, default=2000, help="training steps; integer >= 1")
    p.add_argument("--batch-size", type=int, default=64, help="images per step; integer >= 1")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine decay to 0); > 0")
    p.add_argument("--channels", default="16,32,64", help="channels per level, comma separated; each level "
                   "after the first halves the image side (16,32,64: 28 px -> 7x7 latents)")
    p.add_argument("--latent-channels", type=int, default=4, help="channels of the latents; integer >= 1")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term (summed over the latent) "
                   "against the mean absolute reconstruction error; >= 0")
    p.add_argument("--seed", type=int, default=0, help="initialisation, batches and posterior noise")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its newest "
                   "checkpoint (the same arguments); bit-exact")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar on stderr (default: only on a terminal)")

    p = sub.add_parser("export", help="write a finished image run's generator as a diffusers pipeline folder")
    p.add_argument("run", help="run folder written by distill (or its generator/ subfolder)")
    p.add_argument("--out", required=True, help="folder to write: DiffusionPipeline.from_pretrained(out) loads a "
                   "Stable Diffusion, SDXL, PixArt-Sigma, SD3 or Flux student's (its teacher's own class; SD3 and "
                   "Flux students of distill --sigma-g inf), "
                   "DiffusionPipeline.from_pretrained(out, trust_remote_code=True) one of our networks' students")
    p.add_argument("--lora", action="store_true", help="a run of distill --lora-rank R with a Stable Diffusion "
                   "1.x/2.x, SDXL, SD3 or Flux teacher: write its adapters alone as diffusers LoRA weights "
                   "(pytorch_lora_weights.safetensors) for the teacher pipeline's load_lora_weights, instead of the "
                   "whole student")

    p = sub.add_parser("tiny-pipeline", help="write a tiny random-weight diffusers pipeline folder (a few hundred kB) "
                       "to try commands on before a real one: --teacher diffusers:<out>")
    p.add_argument("family", choices=("sd", "sdxl", "sd3", "flux", "pixart", "pixart-alpha"), help="sd: Stable "
                   "Diffusion 1.x (CLIP, UNet, VAE); sdxl: two CLIPs and added size conditions; sd3: SD3 transformer, "
                   "flow matching; flux: Flux transformer with a guidance embedding, CLIP and T5; pixart: PixArt-Sigma "
                   "transformer, T5 with its attention mask; pixart-alpha: the same saved as PixArt-Alpha (T5 at 120 "
                   "tokens)")
    p.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")

    p = sub.add_parser("eval", help="metrics of a finished run against its teacher, with the teacher's row")
    p.add_argument("run", help="run folder written by distill")
    p.add_argument("--num", type=int, default=None, help="samples per model (default: as many as the run's own "
                   "final evaluation, so with the run's --seed its summary.json numbers come back)")
    p.add_argument("--seed", type=int, default=0, help="noise and reference draw; sample i depends on (seed, i)")
    p.add_argument("--teacher", default=None, help="evaluate against another teacher spec")
    p.add_argument("--classifier", default="auto", help="images: auto (the shipped classifier of the data set), none, "
                   "inception (FID Inception-v3, needs the fid extra) or a train-classifier folder; the teacher-"
                   "feature tnet_* metrics are always computed")
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
        cfg = _resolve_demo(args) if args.command == "demo" else _resolve(args, cls)
        if args.command == "distill":
            _check_preset_teacher(args.preset, cfg.teacher)
        if args.dry_run:
            if isinstance(cfg, DistillConfig) and cfg.teacher.startswith("gmm:"):  # cheap: read it as the run would
                from .teachers import load_teacher

                load_teacher(cfg.teacher)
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
            summary = out.summary
            rows = [{"method": "teacher (Heun, 35 NFE)", **summary["teacher_metrics"]},
                    {"method": f"student {api.method_label(to_dict(cfg), summary['divergence'])} "
                               f"({summary.get('nfe', 1)} NFE)",
                     **summary["metrics"]}]
            print(format_table(rows, markdown=False))
            print(f"run folder: {out} (report: {out.report})")
        else:
            divs = [d.strip() for d in args.divergences.split(",") if d.strip()]
            opts = {k: v for k, v in to_dict(cfg).items() if k not in ("divergence", "out")}
            rows, _ = api.compare(divs, cfg.out, resume=args.resume, progress=args.progress, **opts)
            if not rows:  # not rank 0 under torchrun
                return 0
            print(format_table(rows, markdown=False))
            for key, what in (("mode_tv", "mode-weight error (mode_tv"), ("fd", "Frechet distance on classifier "
                              "features (fd")):  # the headline, in one line
                if key in rows[0]:  # one training seed: say so, and where the spread over seeds is
                    print(f"{what}, lower is better; one training seed): "
                          + ", ".join(f"{r['method'].split(' (')[0]} {r[key]:.4f}" for r in rows)
                          + "; spread over seeds and sample draws: docs/benchmarks.md")
            print(f"report: {Path(cfg.out) / 'report.md'}")
        return 0
    if args.command == "list":
        print(listing())
        return 0
    if args.command == "sample":
        _check_sample_args(args)  # before any sampling: sizes, seed, label and output name
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
        folder = train_classifier(args.data, args.out, epochs=args.epochs, seed=args.seed, command=command,
                                  resume=args.resume)
        print(f"classifier folder: {folder} (use it with --classifier {folder})")
        return 0
    if args.command == "train-vae":
        from .train.vae import train_vae

        try:
            channels = tuple(int(c) for c in args.channels.split(","))
        except ValueError:
            raise UserError(f"--channels must be positive integers separated by commas, e.g. 16,32,64; got "
                            f"{args.channels!r}") from None
        command = shlex.join(["dibregman", *(sys.argv[1:] if argv is None else argv)])
        folder = train_vae(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           channels=channels, latent_channels=args.latent_channels,
                           kl_weight=args.kl_weight, seed=args.seed, device=args.device, progress=args.progress,
                           command=command, resume=args.resume)
        print(f"VAE folder: {folder} (use it with train-teacher --vae {folder})")
        return 0
    if args.command == "tiny-pipeline":
        from .tiny import make_tiny_pipeline

        folder = make_tiny_pipeline(args.family, args.out)
        print(f"tiny {args.family} pipeline (random weights): {folder} (use it with --teacher diffusers:{folder})")
        return 0
    if args.command == "export":
        from .export import export_diffusers, export_lora

        if args.lora:
            folder = export_lora(args.run, args.out)
            print(f"diffusers LoRA weights: {folder} (the teacher pipeline's load_lora_weights({str(folder)!r}); see "
                  "its README.md)")
            return 0
        folder = export_diffusers(args.run, args.out)
        remote = ", trust_remote_code=True" if list(Path(folder).glob("*.py")) else ""
        print(f"diffusers folder: {folder} (DiffusionPipeline.from_pretrained({str(folder)!r}{remote}); its "
              "README.md has the exact call)")
        return 0
    num = api.run_eval_samples(args.run) if args.num is None else args.num
    if not 2 <= num <= 10**7:  # eval: two samples per set for the pairwise metrics; bounded sums
        raise UserError(f"--num must be an integer in 2..10000000; got {num}")
    if not 0 <= args.seed < 2**40:
        raise UserError(f"--seed must be an integer in [0, 2**40); got {args.seed}")
    rows = [api.teacher_row(args.teacher or _run_teacher(args.run), num, args.seed, args.classifier,
                            args.prompts, args.guidance),
            api.evaluate_run(args.run, num, args.seed, args.teacher, args.classifier, args.prompts)]
    print(json.dumps(rows, indent=2) if args.json else format_table(rows, markdown=False))
    return 0


def _named_teacher(args: argparse.Namespace) -> tuple[str, str] | None:
    """The teacher the command line, the config file or the preset names, and where (highest first)."""
    from .train.config import read_file

    if args.teacher is not None:
        return args.teacher, "--teacher"
    if args.config is not None and "teacher" in (values := read_file(args.config)):
        return str(values["teacher"]), f"--config {args.config}"
    if args.preset is not None and "teacher" in PRESETS["distill"].get(args.preset, {}):
        return PRESETS["distill"][args.preset]["teacher"], f"--preset {args.preset}"
    return None


def _resolve_demo(args: argparse.Namespace) -> DistillConfig:
    """``demo``'s config. The rule: ``--dataset`` names the teacher (ring: gmm:ring8_imbalanced,
    fashion-mnist: net:fashion-mnist, fashion-mnist-text: net:fashion-mnist-text) and its preset;
    another ``--preset`` changes the schedule but never the teacher, and a preset, file or flag naming
    another teacher is refused. Without ``--dataset`` the teacher that a flag, file or preset names is
    compared (none named: the ring). The run folder is ``--out`` (flag or file), else ``runs/demo`` or
    ``runs/demo-<dataset>``."""
    from .train.config import read_file

    named = _named_teacher(args)
    dataset = args.dataset
    if dataset is None and named is None:
        dataset = "ring"
    if dataset is not None:
        want, preset = DEMO_DATASETS[dataset]
        if named is not None and named[0] != want:
            raise ConfigError(f"demo --dataset {dataset} distills {want}, but {named[1]} names teacher "
                              f"{named[0]!r}; drop one of them (without --dataset, demo compares the teacher "
                              "you name)")
        args.preset = args.preset or preset
        cfg = _resolve(args, DistillConfig)
        cfg.teacher = want
    else:
        args.preset = args.preset or "demo"
        cfg = _resolve(args, DistillConfig)
    _check_preset_teacher(args.preset, cfg.teacher)
    out_named = args.out is not None or (args.config is not None and "out" in read_file(args.config))
    if not out_named:
        dataset = dataset or next((d for d, (t, _) in DEMO_DATASETS.items() if t == cfg.teacher), "ring")
        cfg.out = "runs/demo" if dataset == "ring" else f"runs/demo-{dataset}"
    return cfg


def _check_preset_teacher(preset: str | None, teacher: str) -> None:
    """An image preset (``tiny-images``) on a point teacher would distill the 2-D ring: refuse it."""
    if preset is not None and preset.endswith("-images") and teacher.startswith("gmm:"):
        raise ConfigError(f"preset {preset!r} is sized for image teachers and names none, so it would distill "
                          f"the point mixture {teacher}; add --teacher net:<image teacher> (e.g. net:fashion-mnist "
                          "or a train-teacher folder) or use --preset tiny for a point teacher")


def listing() -> str:
    """What names the options accept, from the registries themselves (so it cannot go stale)."""
    from .assets import shipped_names
    from .data.images import IMAGE_SOURCES
    from .data.toy2d import TOY_SETS
    from .divergences import DIVERGENCES
    from .nets import BACKBONES
    from .teachers import TEACHER_FORMATS
    from .teachers.gmm import BUILTINS
    from .train.critics import CRITIC_HEADS
    from .train.sigmas import SIGMA_SAMPLERS

    lines = ["divergences (--divergence, --critic-loss): " + DIVERGENCES.describe()
             + "; your own convex h: py:<module>:<function>",
             "teacher formats (--teacher <format>:<argument>): " + TEACHER_FORMATS.describe(),
             "critic heads (--critic-head): " + CRITIC_HEADS.describe(),
             "sigma samplers (--generator-sigmas, --fake-score-sigmas): " + SIGMA_SAMPLERS.describe(),
             "backbones (saved arch kinds): " + BACKBONES.describe(),
             "built-in mixtures (--teacher gmm:<name>, or gmm:<spec.json|.toml>): " + ", ".join(BUILTINS),
             "toy data sets (train-teacher --data, or a .npy/.csv file): " + ", ".join(TOY_SETS),
             "image data (train-teacher --data, train-classifier --data): " + IMAGE_SOURCES.describe()
             + "; <file>.npz",
             "shipped teachers (--teacher net:<name>): " + ", ".join(shipped_names("teacher"))]
    def what(name: str, values: dict[str, Any]) -> str:
        if "teacher" in values:
            return f"{name} (teacher {values['teacher']})"
        if "data" in values:
            return f"{name} (data {values['data']})"
        return f"{name} (names no teacher: give --teacher)" if name.endswith("-images") else name

    lines += [f"{kind} presets (--preset): " + ", ".join(what(n, v) for n, v in presets.items())
              for kind, presets in PRESETS.items()]
    lines.append("demo --dataset: " + ", ".join(f"{d} ({t}, preset {p})" for d, (t, p) in DEMO_DATASETS.items()))
    lines.append("image metrics (--classifier): auto (the shipped classifier of the data set, else Inception on a GPU "
                 "with the fid extra), none, a train-classifier folder; eval also takes inception; the teacher-feature "
                 "tnet_* metrics are always computed")
    return "\n".join(lines)


def _run_teacher(run_dir: str) -> str:
    from .artifacts import load_generator

    teacher = load_generator(run_dir)[1].get("teacher")
    if not isinstance(teacher, str):
        raise UserError(f"{run_dir} does not record its teacher; pass --teacher")
    return teacher


def _check_sample_args(args: argparse.Namespace) -> None:
    """``sample``'s options, checked against the generator before anything is drawn."""
    import math

    from .artifacts import load_generator
    from .sampling import _memory_bytes
    from .train.config import MAX_SEED

    if Path(args.out).suffix not in (".npz", ".png"):
        raise UserError(f"--out must end in .npz or .png; got {args.out}")
    if args.num < 1:
        raise UserError(f"--num must be a positive integer; got {args.num}")
    if args.prompt and any(not p.strip() for p in args.prompt):  # as an empty line of a prompt file is refused
        raise UserError("--prompt is empty; give the text of a prompt (or no --prompt: the training captions)")
    if not 0 <= args.seed < MAX_SEED:
        raise UserError(f"--seed must be an integer in [0, 2**40); got {args.seed}")
    gen, info = load_generator(args.run)
    shown = (info.get("latent") or {}).get("image_shape") or info["shape"]  # a latent student's decoded images
    need = args.num * (gen.steps * math.prod(info["shape"]) + math.prod(shown)) * 4  # noise per step, samples
    if need > _memory_bytes():
        raise UserError(f"--num {args.num} needs {need / 2**30:.1f} GiB for noise and samples of shape "
                        f"{shown}, "
                        f"more than this machine's {_memory_bytes() / 2**30:.1f} GiB; draw fewer (several calls with "
                        "other --seed values give other samples)")
    if args.label is not None:
        k = int(info.get("num_classes") or 0)
        if not k:
            raise UserError(f"--label is for class-conditional generators; {args.run} has no classes (leave it out)")
        if not 0 <= args.label < k:
            raise UserError(f"--label must be a class number in 0..{k - 1}; got {args.label}")


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
    from .dist import PeerStopped, reports, shutdown
    from .integrity import CheckpointError
    from .train.guard import NonFiniteError

    try:  # the process group is left whatever the exit (dist.shutdown)
        try:
            sys.exit(run(argv))
        except PeerStopped:  # under torchrun: process 0 prints the line; give it the time to (torchrun stops the rest)
            import time

            time.sleep(2)
            sys.exit(2)
        except (ConfigError, UserError, CheckpointError, NonFiniteError, ValueError, OSError) as e:
            if os.environ.get("DIBREGMAN_TRACEBACK"):
                raise
            message = " ".join((_os_message(e) if isinstance(e, OSError) else str(e)).splitlines())
            # undecodable argv bytes arrive as lone surrogates: escape them rather than fail while reporting
            line = f"dibregman: error: {message or type(e).__name__}".encode("utf-8", "backslashreplace").decode()
            if reports():  # under torchrun every process meets the same error: process 0 alone prints it
                print(line, file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt as e:  # Interrupted (a checkpoint was saved) carries the signal's number
            if reports():
                print(f"dibregman: {e or 'interrupted'}", file=sys.stderr)
            sys.exit(128 + getattr(e, "signum", 2))
    finally:
        shutdown()


def _os_message(e: OSError) -> str:
    """Our own OSErrors (RunIOError, FileNotFoundError with a message) read well as they are; a raw
    one from a library (``[Errno 28] No space left on device: 'x'``) gets its file and a fix."""
    from .io import _HINTS, RunIOError, describe_write_error

    if isinstance(e, RunIOError) or e.errno is None:
        return str(e)
    if e.filename is None:  # a library's write (matplotlib, PIL) that names no file: still say what to do
        cause, fix = _HINTS.get(e.errno, (None, None))
        if cause is None:
            return str(e)
        return (f"{cause} while writing a run file (the library did not name it); {fix}; a run that finished its "
                "training keeps its checkpoints, and --resume redoes only its finish")
    if e.errno == errno.ENOENT:
        return f"{e.filename} does not exist; check the path"
    return describe_write_error(e, e.filename, doing="accessing")
