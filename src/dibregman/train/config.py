"""Typed run configurations, presets, and their loading and checking.

Precedence, lowest first: dataclass defaults < preset < config file (JSON or TOML) < explicit options.
Every value is checked before any work starts; a bad one raises ``ConfigError`` naming the fix.
"""

from __future__ import annotations

import collections
import dataclasses
import difflib
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..nets.arch import MAX_LEVELS, MAX_REPEATS

if TYPE_CHECKING:
    from ..divergences import Divergence


class ConfigError(ValueError):
    """A user error in a configuration: the message says what to change."""


@dataclass
class DistillConfig:
    # what to distill
    teacher: str = "gmm:ring8_imbalanced"  # gmm:<builtin or .json/.toml>, net:<teacher folder>, diffusers:<folder>
    guidance: float = 1.0  # classifier-free guidance scale of a conditional teacher (1: none)
    prompts: str = ""  # text teachers: "" its training captions, "unseen" held-out templates, or a prompt file
    divergence: str = "hellinger"  # a registered member (default chosen in docs/benchmarks.md), or py:<mod>:<fn>
    critic_loss: str = "logistic"  # the Bregman DRE loss of the critic (logistic = classifier)
    critic_data: str = "teacher"  # teacher: the teacher's 35-NFE samples (data-free); data: real data
    teacher_pool: int = 20000  # how many teacher samples stand for p when critic_data = teacher
    # the critic: a head on the fake score's features (default: on the ring as good as its own network, a truer
    # log r and 17% less time per step, 3 seeds, docs/benchmarks.md), on the teacher's, or a standalone network
    critic_head: str = "fake_score"
    classifier: str = "auto"  # images: feature net for FD/KID/label accuracy; auto (shipped), none, or a folder
    # schedule
    steps: int = 2000
    batch_size: int = 256
    fake_score_steps: int = 2  # K fake-score and critic updates per generator update
    lr_generator: float = 1e-3  # for toy-sized MLPs; large image networks want far smaller rates
    lr_fake_score: float = 1e-3
    lr_critic: float = 1e-3
    # the generator's rate: constant | cosine (half cosine to 0 at `steps`; the demo preset's: on the ring it cut
    # the off-mode mass from 0.070 to 0.054 over 3 seeds). Not the default: it depends on `steps`, so a run
    # continued with more steps (--resume --steps N) would change its past rates
    lr_schedule: str = "constant"
    beta1: float = 0.0
    beta2: float = 0.99
    ema_decay: float = 0.99
    grad_clip: float = 10.0  # max global grad norm per network; 0 disables
    # generator update
    sigma_g: float = 2.5
    # a few-step student (DMD2's backward simulation): its noise levels run from sigma_g down to
    # student_sigma_min on EDM's grid (0: 0.16 x the teacher's sigma_data); 1 step ignores it
    student_steps: int = 1
    student_sigma_min: float = 0.0
    sigma_min: float = 0.0  # noise range of the generator update and the critic; 0: the teacher's own
    sigma_max: float = 0.0
    fake_score_p_mean: float = -1.2  # the fake score's noise law: log sigma ~ N(p_mean, p_std^2) (EDM's)
    fake_score_p_std: float = 1.2
    generator_t_min: float = 0.02  # generator loss: sigma from Karras-uniform t in [t_min, t_max]
    generator_t_max: float = 0.98
    generator_sigmas: str = "karras"  # the noise law of the generator and critic updates (train/sigmas.py)
    fake_score_sigmas: str = "lognormal"  # the fake score's
    weighting: str = "dmd"  # dmd | sigma2 | none
    r_clip_min: float = 0.1  # clip the ratio r = q/p to [r_clip_min, r_clip_max] (f-distill's [0.1, 20])
    r_clip_max: float = 20.0
    omega_normalize: str = "batch"  # batch | bins | none
    gan_weight: float = 0.0
    # DMD's regression loss |G(z) - ODE_T(z)|^2 on teacher_pool paired samples: on the ring it brings the mode
    # weights to the teacher's (mode_tv 0.031 -> 0.007 over 3 seeds) and halves the energy distance (benchmarks.md)
    regression_weight: float = 4.0
    regression_pairs: int = 0  # how many such pairs; 0: teacher_pool
    generator_mode: str = "score"  # score | discriminator
    # networks (MLPs for low-dimensional data)
    hidden: int = 128
    depth: int = 3
    fit_steps: int = 1500  # analytic teacher only: steps to fit the network the students start from
    # bookkeeping
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward passes; weights and optimisers stay fp32)
    grad_checkpointing: bool = False  # U-Nets: recompute activations in backward (less memory, more time)
    compile: bool = False  # torch.compile the networks a step calls (in place: checkpoints are unchanged)
    parallel: str = "ddp"  # torchrun: ddp (whole networks everywhere) | fsdp (trainable state sharded)
    lora_rank: int = 0  # > 0: generator and fake score are LoRA adapters of this rank on the frozen teacher
    lora_alpha: float = 0.0  # the adapters' scale is lora_alpha / lora_rank; 0 = lora_rank (scale 1)
    tensorboard: bool = False  # also write the stats as TensorBoard scalars to <out>/tensorboard
    log_every: int = 25
    eval_every: int = 500
    eval_samples: int = 0  # samples per evaluation; 0 = auto: 100000 for point teachers, 2000 for images
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    nonfinite: str = "strict"  # strict: stop at the last good checkpoint; skip: drop the step, count it
    out: str = "runs/distill"


@dataclass
class TeacherConfig:
    data: str = "moons"  # a toy set or .npy/.csv point cloud (an MLP), or an image source (a U-Net)
    num_points: int = 20000  # points drawn from a toy set (a file uses all its rows)
    steps: int = 4000
    batch_size: int = 512
    lr: float = 1e-3
    ema_decay: float = 0.999
    hidden: int = 128  # MLP (point clouds); the SD3 transformer's width
    depth: int = 3  # MLP residual blocks; SD3 transformer blocks
    backbone: str = "auto"  # auto: MLP for points, U-Net for images; sd3: a diffusers SD3Transformer2DModel
    patch_size: int = 1  # sd3: side of its square patches
    vae: str = ""  # an AutoencoderKL folder: train on its scaled latents of the images (a latent teacher)
    base_channels: int = 32  # U-Net (images): channels of the first level
    channel_mult: str = "1,2,2"  # per level, comma separated; each level after the first halves the resolution
    layers_per_block: int = 1
    attention: bool = False  # self-attention in the bottleneck
    conditional: bool = True  # class-conditional when the data has labels
    text_encoder: str = ""  # minilm or a local folder: condition on captions of the labels instead (text/)
    label_dropout: float = 0.1  # labels dropped to "no label" (trains classifier-free guidance)
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 autocast
    grad_checkpointing: bool = False
    tensorboard: bool = False
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    eval_samples: int = 2000
    out: str = "runs/teacher"


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "distill": {
        "toy": {},
        # two-step students: on the ring they leave 0.019 of the mass between the modes where one step leaves
        # 0.054, at equal mode weights (3 seeds, docs/benchmarks.md, few-step students)
        "demo": {"steps": 2000, "eval_every": 500, "checkpoint_every": 500, "lr_schedule": "cosine",
                 "student_steps": 2, "out": "runs/demo"},
        "tiny": {"steps": 6, "batch_size": 32, "teacher_pool": 256, "fit_steps": 20, "hidden": 32,
                 "depth": 1, "log_every": 2, "eval_every": 3, "eval_samples": 128, "checkpoint_every": 3},
        "dmd": {"divergence": "reverse_kl"},
        "dmd2": {"divergence": "reverse_kl", "gan_weight": 0.01, "regression_weight": 0.0},  # DMD2 drops it
        # images on 2 CPU cores: the shipped Fashion-MNIST teacher, real data standing for p (no 35-NFE pool
        # to sample), the critic as a head on the fake score's bottleneck (DMD2), one fake-score update per
        # generator update with a 5x learning rate (two time scales: the fake score must track the student;
        # it raised recall from 0.55 to 0.60-0.69 at equal cost in a 300-step trial, docs/benchmarks.md)
        "fashion-mnist": {"teacher": "net:fashion-mnist", "steps": 300, "batch_size": 32, "fake_score_steps": 1,
                          "lr_generator": 1e-4, "lr_fake_score": 5e-4, "lr_critic": 5e-4, "ema_decay": 0.95,
                          "critic_data": "data", "teacher_pool": 10000, "critic_head": "fake_score", "log_every": 10,
                          "eval_every": 100, "eval_samples": 1000, "checkpoint_every": 100,
                          # DMD's regression term on 1000 pairs: recall 0.81 but FD 1.43 (benchmarks.md, image_recipe)
                          "regression_weight": 0.0,
                          # cosine decay of the generator's rate: recall 0.78 +- 0.01 against 0.72 +- 0.02, FD
                          # 1.01 +- 0.04 against 1.10 +- 0.33 (3 seeds, benchmarks.md, image_recipe)
                          "lr_schedule": "cosine",
                          # fake_score_sigmas = karras gives the teacher's within-class tone and recall 0.82 +- 0.00
                          # but FD 1.63 +- 0.05 (3 seeds, benchmarks.md "Where the variety goes"): kept lognormal
                          # --steps 800: FD 0.76 +- 0.07, below the teacher's 0.82, at the same recall (0.79 +- 0.01;
                          # 3 seeds, benchmarks.md, "The fake score's lag and the number of steps"), 2.7x the time
                          "out": "runs/distill-fmnist"},
        # text-to-image on 2 CPU cores: the shipped caption-conditioned teacher, its 80 training captions as
        # prompts, otherwise the fashion-mnist recipe; no guidance: with guidance 2 the students' recall fell to
        # 0.34-0.43 (docs/benchmarks.md, text-to-image)
        "fashion-mnist-text": {"teacher": "net:fashion-mnist-text", "steps": 300, "batch_size": 32,
                               "fake_score_steps": 1, "lr_generator": 1e-4, "lr_fake_score": 5e-4, "lr_critic": 5e-4,
                               "ema_decay": 0.95, "critic_data": "data", "teacher_pool": 10000,
                               "critic_head": "fake_score", "log_every": 10, "eval_every": 100, "eval_samples": 1000,
                               "checkpoint_every": 100, "regression_weight": 0.0, "out": "runs/distill-fmnist-text"},
        # latent text-to-image: the shipped SD3-shaped flow teacher on VAE latents (decoded for every metric),
        # with the fashion-mnist-text recipe
        "fashion-mnist-latent": {"teacher": "net:fashion-mnist-latent", "steps": 600, "batch_size": 32,
                                 "fake_score_steps": 1, "lr_generator": 1e-4, "lr_fake_score": 5e-4,
                                 "lr_critic": 5e-4, "ema_decay": 0.95, "critic_data": "data", "teacher_pool": 10000,
                                 "critic_head": "fake_score", "log_every": 10, "eval_every": 100,
                                 "eval_samples": 1000, "checkpoint_every": 100, "regression_weight": 0.0,
                                 # the fake score on the generator update's law: Hellinger's FD 0.94 against 1.30
                                 # (teacher 0.90; 3 seeds, benchmarks.md "fake score's noise law, latent")
                                 "fake_score_sigmas": "karras",
                                 "out": "runs/distill-fmnist-latent"},
        "tiny-images": {"steps": 4, "batch_size": 8, "teacher_pool": 16, "log_every": 2, "eval_every": 2,
                        "eval_samples": 16, "checkpoint_every": 2, "critic_head": "fake_score", "lr_generator": 1e-4,
                        "lr_fake_score": 1e-4, "lr_critic": 1e-4},
    },
    "teacher": {
        "toy": {},
        "tiny": {"steps": 20, "batch_size": 64, "num_points": 512, "hidden": 32, "depth": 1, "log_every": 5,
                 "checkpoint_every": 10, "eval_samples": 128},
        # sized for 2 CPU cores: ~0.36 s/step, the shipped teacher (see assets/fashion-mnist/README.md)
        "fashion-mnist": {"data": "fashion-mnist", "steps": 6000, "batch_size": 64, "lr": 5e-4, "ema_decay": 0.999,
                          "log_every": 50, "checkpoint_every": 500, "eval_samples": 64, "out": "runs/teacher-fmnist"},
        "mnist": {"data": "mnist", "steps": 3000, "batch_size": 64, "lr": 5e-4, "log_every": 50,
                  "checkpoint_every": 500, "eval_samples": 64, "out": "runs/teacher-mnist"},
        "digits": {"data": "digits", "steps": 2000, "batch_size": 64, "lr": 5e-4, "base_channels": 16,
                   "channel_mult": "1,2", "log_every": 50, "checkpoint_every": 500, "eval_samples": 64,
                   "out": "runs/teacher-digits"},
        # captions ("a photo of an ankle boot", 8 templates) through all-MiniLM-L6-v2: ~0.46 s/step here
        "fashion-mnist-text": {"data": "fashion-mnist", "text_encoder": "minilm", "steps": 4000, "batch_size": 64,
                               "lr": 5e-4, "ema_decay": 0.999, "log_every": 50, "checkpoint_every": 500,
                               "eval_samples": 80, "out": "runs/teacher-fmnist-text"},
        "tiny-images": {"data": "digits", "steps": 4, "batch_size": 8, "base_channels": 8, "channel_mult": "1,2",
                        "log_every": 2, "checkpoint_every": 2, "eval_samples": 8},
        # a latent text-to-image teacher: an SD3-shaped flow transformer (width 128, 4 joint blocks, 49 latent
        # tokens) on the 4x7x7 latents of `dibregman train-vae --data fashion-mnist --out runs/vae-fmnist`
        "fashion-mnist-latent": {"data": "fashion-mnist", "backbone": "sd3", "vae": "runs/vae-fmnist/vae",
                                 "text_encoder": "minilm+pooled", "hidden": 128, "depth": 4, "patch_size": 1,
                                 "steps": 8000, "batch_size": 64, "lr": 4e-4, "ema_decay": 0.999, "log_every": 50,
                                 "checkpoint_every": 500, "eval_samples": 80, "out": "runs/teacher-fmnist-latent"},
    },
}

_CHOICES = {
    "critic_data": ("teacher", "data"),
    "precision": ("fp32", "bf16"),
    "weighting": ("dmd", "sigma2", "none"),
    "omega_normalize": ("batch", "bins", "none"),
    "generator_mode": ("score", "discriminator"),
    "lr_schedule": ("constant", "cosine"),
    "nonfinite": ("strict", "skip"),
    "backbone": ("auto", "sd3"),
    "parallel": ("ddp", "fsdp"),
}


def _choices(key: str) -> tuple[str, ...] | None:
    """The values option ``key`` takes, where it is a name: fixed ones, or a plug-in point's registered names."""
    if key == "critic_head":
        from .critics import CRITIC_HEADS  # below it: the heads import this module

        return tuple(CRITIC_HEADS)
    if key in ("generator_sigmas", "fake_score_sigmas"):
        from .sigmas import SIGMA_SAMPLERS

        return tuple(SIGMA_SAMPLERS)
    return _CHOICES.get(key)


_POSITIVE_INT = ("steps", "batch_size", "fake_score_steps", "student_steps", "teacher_pool", "hidden", "depth",
                 "log_every", "eval_every", "eval_samples", "checkpoint_every", "keep_checkpoints", "num_points",
                 "base_channels", "layers_per_block", "patch_size")
_POSITIVE = ("lr_generator", "lr_fake_score", "lr_critic", "lr", "sigma_g", "r_clip_min", "r_clip_max")
_MAY_BE_INFINITE = ("sigma_g",)  # inf: a flow student's pure-noise start
def _allowed_inf(key: str, value: float) -> bool:
    return key in _MAY_BE_INFINITE and value == math.inf


_UNIT = ("beta1", "beta2", "ema_decay", "label_dropout")
_FLOAT32_MAX = 3.4028234663852886e38
# eval_samples = 0 (auto): point teachers get many samples (their mixture-exact metrics are O(N), so their
# sampling spread shrinks as 1/sqrt(N); 10^5 cost ~1 s), image teachers a count their networks sample in minutes.
AUTO_EVAL_SAMPLES = {"points": 100_000, "images": 2000}


def eval_samples(cfg_value: int, shape: tuple[int, ...] | list[int]) -> int:
    """The number of evaluation samples a run uses: ``cfg_value``, or the automatic choice for ``shape``."""
    return int(cfg_value) or AUTO_EVAL_SAMPLES["images" if len(shape) == 3 else "points"]


def field_types(cls: type) -> dict[str, type]:
    return {f.name: type(f.default) for f in fields(cls)}


def coerce(cls: type, key: str, value: Any) -> Any:
    """Convert ``value`` to the type of field ``key`` or raise a ConfigError that names both."""
    types = field_types(cls)
    if key not in types:
        name = str(key).replace("-", "_")
        close = difflib.get_close_matches(name, types, n=3, cutoff=0.6)  # typos: lr_generater
        close += [k for k in types if k not in close and name and (name in k or k in name)]  # lr -> lr_*
        hint = f" (did you mean {', '.join(close[:4])}?)" if close else ""
        raise ConfigError(f"unknown option {key!r} for {cls.__name__}{hint}; valid: {', '.join(types)}")
    want = types[key]
    try:
        if want is str and not isinstance(value, str | os.PathLike):  # str() of a list or table is no path
            raise TypeError
        if want is float and isinstance(value, bool):
            raise TypeError
        if want is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if want is int and ((isinstance(value, float) and not value.is_integer()) or isinstance(value, bool)):
            raise ValueError
        if want is int and isinstance(value, str) and not value.strip().lstrip("-").isdigit():
            raise ValueError
        out = os.fspath(value) if want is str else want(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: float(10**400)
        kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[want]
        raise ConfigError(f"option {key!r} must be {kind}; got {value!r}") from None
    if isinstance(out, float) and not math.isfinite(out) and not _allowed_inf(key, out):
        raise ConfigError(f"option {key!r} must be finite; got {value!r}")
    return out


_VALIDATED: collections.OrderedDict[tuple, dict[str, Divergence]] = collections.OrderedDict()  # newest last
_VALIDATED_KEEP = 16


def _values(cfg: DistillConfig | TeacherConfig) -> tuple:
    return (type(cfg).__name__, *sorted(asdict(cfg).items()))


def validate(cfg: DistillConfig | TeacherConfig) -> None:
    """Check every option of ``cfg`` (a ``ConfigError`` names the first bad one) and resolve its divergence specs.

    Once per config: the CLI, the API and the loop each call this, and values that passed before are not
    checked again (a pure function of the values: configs equal to one that passed pass). A ``py:`` divergence
    is imported again each time: the user's file may have changed."""
    key = _values(cfg)
    if key in _VALIDATED:
        _VALIDATED.move_to_end(key)
        return
    _check(cfg, asdict(cfg))
    divergences = {}
    if isinstance(cfg, DistillConfig):
        for name in ("divergence", "critic_loss"):
            try:
                divergences[name] = divergence_from_spec(getattr(cfg, name), (cfg.r_clip_min, cfg.r_clip_max))
            except ValueError as e:
                raise ConfigError(f"option {name!r}: {e}") from None
        if any(spec.startswith("py:") for spec in (cfg.divergence, cfg.critic_loss)):
            return
    _VALIDATED[key] = divergences
    while len(_VALIDATED) > _VALIDATED_KEEP:
        _VALIDATED.popitem(last=False)


def resolved_divergence(cfg: DistillConfig, key: str = "divergence") -> Divergence:
    """The ``Divergence`` that ``cfg.<key>`` (``divergence`` or ``critic_loss``) names, parsed once by ``validate``."""
    validate(cfg)
    found = _VALIDATED.get(_values(cfg))
    if found is None:  # a py: member (never kept) or one pushed out of the cache
        return divergence_from_spec(getattr(cfg, key), (cfg.r_clip_min, cfg.r_clip_max))
    return found[key]


def _check(cfg: DistillConfig | TeacherConfig, d: dict[str, Any]) -> None:
    for key, value in d.items():
        choices = _choices(key)
        if choices is not None and value not in choices:
            raise ConfigError(f"option {key!r} must be one of {', '.join(choices)}; got {value!r}")
        auto = key == "eval_samples" and value == 0 and isinstance(cfg, DistillConfig)  # 0: chosen per teacher
        if key in _POSITIVE_INT and value < 1 and not auto:
            raise ConfigError(f"option {key!r} must be a positive integer; got {value}")
        if key in _POSITIVE and not value > 0:
            raise ConfigError(f"option {key!r} must be > 0; got {value}")
        # torch fails mid-step converting a larger one to float32 (a flow student's sigma_g = inf is exact)
        if key in _POSITIVE and value > _FLOAT32_MAX and not _allowed_inf(key, value):
            raise ConfigError(f"option {key!r} must be below {_FLOAT32_MAX:.3g} (float32); got {value}")
        if key in _UNIT and not 0 <= value < 1:
            raise ConfigError(f"option {key!r} must be in [0, 1); got {value}")
    for key, top in _MAX_INT.items():  # sizes beyond these would exhaust memory or run for ever, mid-run
        if key in d and d[key] > top:
            raise ConfigError(f"option {key!r} must be at most {top}; got {d[key]}")
    if not 0 <= cfg.seed < MAX_SEED:  # torch seeds are 64-bit, and seeds are offset and scaled per draw
        raise ConfigError(f"option 'seed' must be an integer in [0, 2**40); got {cfg.seed}")
    check_out(cfg.out)
    check_device(cfg.device)
    if isinstance(cfg, DistillConfig) and not (1e-4 <= cfg.sigma_g <= 1e4 or cfg.sigma_g == math.inf):
        raise ConfigError(f"option 'sigma_g' must be in [0.0001, 10000] (float32 preconditioning; as "
                          f"artifacts.SIGMA_RANGE loads) or inf (pure noise, flow teachers); got {cfg.sigma_g}")
    if isinstance(cfg, TeacherConfig):
        channel_mult(cfg.channel_mult)
    if isinstance(cfg, DistillConfig):
        if cfg.sigma_min < 0 or cfg.sigma_max < 0 or (cfg.sigma_max and cfg.sigma_min >= cfg.sigma_max):
            raise ConfigError(f"need 0 <= sigma_min < sigma_max (0: the teacher's own); got {cfg.sigma_min}, "
                              f"{cfg.sigma_max}")
        if math.isinf(cfg.sigma_g) and cfg.student_steps > 1:
            raise ConfigError("sigma_g = inf (pure noise) takes one student step for now; use student_steps = 1 or "
                              "a finite sigma_g")
        if not (cfg.student_sigma_min == 0 or 1e-4 <= cfg.student_sigma_min < cfg.sigma_g):
            raise ConfigError(f"option 'student_sigma_min' must be 0 (0.16 x the teacher's sigma_data) or in "
                              f"[0.0001, sigma_g); got {cfg.student_sigma_min} with sigma_g {cfg.sigma_g}")
        if not cfg.fake_score_p_std > 0:
            raise ConfigError(f"option 'fake_score_p_std' must be > 0; got {cfg.fake_score_p_std}")
        if not 0 <= cfg.generator_t_min < cfg.generator_t_max <= 1:
            raise ConfigError("need 0 <= generator_t_min < generator_t_max <= 1; got "
                              f"{cfg.generator_t_min}, {cfg.generator_t_max}")
        if not cfg.r_clip_min < 1 < cfg.r_clip_max:
            raise ConfigError(f"the ratio clip [r_clip_min, r_clip_max] must contain 1; got "
                              f"[{cfg.r_clip_min}, {cfg.r_clip_max}]")
        if min(cfg.gan_weight, cfg.regression_weight, cfg.regression_pairs, cfg.grad_clip, cfg.fit_steps,
               cfg.guidance) < 0:
            raise ConfigError("gan_weight, regression_weight, regression_pairs, grad_clip, fit_steps and guidance "
                              "must be >= 0")
        if cfg.lora_rank < 0 or cfg.lora_alpha < 0:
            raise ConfigError(f"lora_rank and lora_alpha must be >= 0 (0: full fine-tuning, and alpha = rank); got "
                              f"{cfg.lora_rank}, {cfg.lora_alpha}")
        if cfg.parallel == "fsdp" and (cfg.lora_rank or cfg.compile):
            raise ConfigError("parallel = fsdp shards fully trained networks without torch.compile; LoRA students "
                              "(lora_rank) and compile run with parallel = ddp")


MAX_SEED = 2**40
_MAX_INT = {"batch_size": 2**20, "lora_rank": 4096, "eval_samples": 10**7, "teacher_pool": 10**7,
            "regression_pairs": 10**7, "num_points": 10**8,
            "fake_score_steps": 1000, "student_steps": 16,
            "hidden": 2**16, "depth": MAX_REPEATS, "base_channels": 4096, "layers_per_block": 64}


def check_out(out: str, option: str = "out") -> None:
    """A run folder name that can be made and written: not empty (``Path("")`` is the working folder), and
    encodable (undecodable bytes from the command line fail only when the report is written)."""
    if not str(out).strip():
        raise ConfigError(f"option {option!r} is empty, which would write into the working folder; name a folder, "
                          "e.g. --out runs/my-run")
    try:
        os.fsencode(out)
        str(out).encode("utf-8")
    except UnicodeError:
        shown = str(out).encode("utf-8", "backslashreplace").decode()
        raise ConfigError(f"option {option!r} ({shown}) is not valid UTF-8; choose a folder name in UTF-8") from None


def check_device(name: str) -> None:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``: what ``dist.resolve_device`` can place a run on
    (``meta`` holds no data; ``cpu:5`` names no device)."""
    import re

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")


def channel_mult(spec: str) -> tuple[int, ...]:
    """``"1,2,2"`` -> ``(1, 2, 2)``; anything else is a ConfigError."""
    try:
        mult = tuple(int(m) for m in spec.split(","))
    except ValueError:
        mult = ()
    if not mult or min(mult) < 1 or len(mult) > MAX_LEVELS:
        raise ConfigError(f"option 'channel_mult' must be 1 to {MAX_LEVELS} positive integers separated by commas, "
                          f"e.g. 1,2,2; got {spec!r}")
    return mult


def divergence_from_spec(spec: str, clip: tuple[float, float] = (0.1, 20.0)) -> Divergence:
    """A registered member (``forward_kl``, ``power:0.5``) or, for the user's own convex ``h``,
    ``py:<module>:<function>``: the function is imported (from the working directory too) and its
    ``h''`` taken by autograd. The spec string is what a config file and a resumed run store.

    Either is checked on a dense grid of ratios over ``clip`` (the run's ``[r_clip_min, r_clip_max]``):
    its weight ``omega = h''(r) r`` must be finite in float32, >= 0 (``h`` convex) and not 0 everywhere, and
    its density-ratio loss finite (as a critic loss); a ``h`` that raises is a ValueError naming it."""
    from ..divergences import from_h, get_divergence

    if not spec.startswith("py:"):
        return _checked(get_divergence(spec), spec, clip)
    from ..plugins import load_callable

    h = load_callable(spec, "a convex function h(r) on tensors")
    return _checked(from_h(h, name=spec), spec, clip)  # fails now, not hours later, if h is not convex


def _checked(div: Divergence, spec: str, clip: tuple[float, float]) -> Divergence:
    lo, hi = (float(c) for c in clip)
    if not 0 < lo < hi or not math.isfinite(hi):
        return div  # the clip itself is refused by validate
    log_r = torch.linspace(math.log(lo), math.log(hi), 2001, dtype=torch.float64)  # h'' every ~0.2% of r
    where = f"over the ratio clip [{lo:g}, {hi:g}]"
    try:
        omega = div.omega(log_r)
        loss = div.dre_loss(log_r, log_r.flip(0))
    except ValueError as e:
        if "not convex" in str(e):  # from_h: h'' < 0
            raise ValueError(f"{e} {where} (r_clip_min, r_clip_max)") from None
        raise ValueError(f"{spec!r} failed on a tensor of ratios ({type(e).__name__}: {_first_line(e)}); it must "
                         "map a float tensor r > 0 to a tensor of the same shape, e.g. lambda r: r * r.log()") from None
    except Exception as e:  # a function that is no h: print, os.system, one that fails on tensors
        if isinstance(e, RuntimeError) and "does not require grad" in str(e):  # autograd: h' is a constant
            raise ValueError(f"divergence {spec!r}: h''(r) = 0 {where} (h is linear, or h' constant): every sample "
                             "would get weight 0; use a strictly convex h") from None
        raise ValueError(f"{spec!r} failed on a tensor of ratios ({type(e).__name__}: {_first_line(e)}); it must "
                         "map a float tensor r > 0 to a tensor of the same shape, e.g. lambda r: r * r.log()") from None
    if not isinstance(omega, torch.Tensor) or omega.shape != log_r.shape:
        raise ValueError(f"{spec!r} does not return one value per ratio")
    bad = ~torch.isfinite(omega.float())
    if bool(bad.any()):
        r = float(log_r[bad.nonzero()[0, 0]].exp())
        raise ValueError(f"divergence {spec!r}: its weight omega = h''(r) r is not finite in float32 at r = {r:.4g} "
                         f"{where}; choose another member or parameter, or a narrower clip")
    if bool((omega < 0).any()):
        r = float(log_r[(omega < 0).nonzero()[0, 0]].exp())
        raise ValueError(f"divergence {spec!r}: h''(r) < 0 at r = {r:.4g}, so h is not convex {where}")
    if not bool((omega > 0).any()):
        raise ValueError(f"divergence {spec!r}: h''(r) = 0 {where} (h is linear, or h' constant): every sample would "
                         "get weight 0; use a strictly convex h")
    if not bool(torch.isfinite(loss.float()).all()):
        raise ValueError(f"divergence {spec!r}: its density-ratio loss h'(r) r - h(r) - h'(r) is not finite in "
                         f"float32 {where} (as a critic loss it would stop the critic)")
    return div


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else "no message"


def read_file(path: str | Path) -> dict[str, Any]:
    from ..io import read_json_or_toml

    try:
        values = read_json_or_toml(path, "config file")
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a table of options; got {type(values).__name__}")
    return values


def resolve(cls: type, preset: str | None = None, file: str | Path | None = None,
            overrides: dict[str, Any] | None = None) -> Any:
    """Build and check a config from the layers; unknown keys and bad values raise ConfigError."""
    kind = "distill" if cls is DistillConfig else "teacher"
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS[kind]:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS[kind])}")
        values.update(PRESETS[kind][preset])
    if file is not None:
        doc = read_file(file)
        for key, value in doc.items():  # every key of the file, also one a flag overrides
            coerce(cls, key, value)
            _strict_type(cls, key, value, file)
        values.update(doc)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = cls(**{k: coerce(cls, k, v) for k, v in values.items()})
    validate(cfg)
    return cfg


def _strict_type(cls: type, key: str, value: Any, file: str | Path) -> None:
    """A config file holds typed values: ``steps = 2.0`` or ``"steps": "10"`` is a mistake there (flags are
    text, so the command line converts; a file does not)."""
    want = field_types(cls)[key]
    ok = {int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, int | float) and not isinstance(value, bool),
          bool: isinstance(value, bool), str: isinstance(value, str)}[want]
    if not ok:
        kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[want]
        hint = {int: "e.g. 10: no quotes, no decimal point", float: "e.g. 0.001, without quotes",
                bool: "true or false, without quotes", str: "in quotes"}[want]
        raise ConfigError(f"option {key!r} in {file} must be {kind}; got {value!r} ({type(value).__name__}); write "
                          f"{hint}")


# Options that may change between a run and its resumption without changing what is computed.
RESUMABLE = frozenset({"steps", "log_every", "eval_every", "eval_samples", "checkpoint_every", "keep_checkpoints",
                       "out", "device", "nonfinite", "grad_checkpointing", "compile", "tensorboard",
                       "classifier"})


# What a run computed before each of these options existed (its checkpoint has no entry for it): resuming it
# with another value would change the run, e.g. continue a one-step run as a two-step one
LEGACY = {"student_steps": 1, "student_sigma_min": 0.0, "regression_weight": 0.0, "lr_schedule": "constant",
          "backbone": "auto", "vae": "", "patch_size": 1, "lora_rank": 0, "lora_alpha": 0.0,
          "generator_sigmas": "karras", "fake_score_sigmas": "lognormal", "parallel": "ddp"}


def check_resumable(saved: dict[str, Any], cfg: Any, where: str) -> None:
    """Refuse to resume a run under a config that would compute something else; name the differences."""
    saved = {**LEGACY, **saved}  # a checkpoint older than an option ran at what the code did before it existed
    diff = {k: (saved[k], v) for k, v in to_dict(cfg).items() if k not in RESUMABLE and k in saved and saved[k] != v}
    if diff:
        changes = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"cannot resume {where} with a different config ({changes}); only "
                          f"{', '.join(sorted(RESUMABLE))} may change. Use another --out for a new run.")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
