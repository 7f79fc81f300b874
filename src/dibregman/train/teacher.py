"""Train an EDM teacher with exact resume: an MLP on a point cloud, or a U-Net on images (class-conditional
when the images have labels, with label dropout so that classifier-free guidance works).

``backbone = "sd3"`` trains a caption-conditioned diffusers ``SD3Transformer2DModel`` as Stable Diffusion 3 is
trained: rectified flow (``x_t = (1 - t) x0 + t n``, velocity prediction, ``FlowMatchEulerDiscreteScheduler``'s
conventions, converted to our denoiser at the edge by ``DiffusersDenoiser``) with SD3's logit-normal ``t``
(``logit t = log sigma ~ N(0, 1)``). The loss is EDM's weighted ``||D - x0||^2``, which is
``(sigma^2 + 1) / (sigma + 1)^2`` (between 1/2 and 1) times the flow-matching loss ``||v - (n - x0)||^2`` at
unit ``sigma_data``. With ``vae`` (an ``AutoencoderKL`` folder, ``dibregman train-vae``) the images are encoded
once to the VAE's scaled latents and the teacher denoises those: a latent teacher, saved with its VAE.

Run folder ``cfg.out``: ``config.json``, ``stats.jsonl`` (``loss/teacher``, ``time/step_s``),
``checkpoints/step-XXXXXXXX/`` (the same format as distillation, see ``checkpoint.py``), and at the end
``teacher/`` (see ``teachers/trained.py``), usable as ``--teacher net:<out>/teacher``.

One CPU ``torch.Generator`` seeded from ``cfg.seed`` draws everything (data, initial weights, batches,
sigmas, noise, evaluation), so a run is a function of its config, and a resumed run is bit-identical to
an uninterrupted one on the same device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..data.images import absolute_spec, is_image_spec, load_images
from ..data.toy2d import load_points
from ..grids import save_grid
from ..integrity import INTEGRITY, MANIFEST, write_manifest
from ..losses import denoising_loss
from ..nets.mlp import MLP
from ..nets.text_unet import TextUNet
from ..nets.unet import UNet
from ..precond import Precond
from ..run_folder import RunFolder
from ..sampling import nfe, sample
from ..schedules import LogNormal
from ..teachers.diffusers import DiffusersDenoiser
from ..teachers.latent import LatentCodec, load_codec, vae_sha256
from ..teachers.trained import save_teacher
from ..text.encoder import BUILTIN, POOLED
from ..text.prompts import TRAIN_TEMPLATES
from .checkpoint import entry, load_latest, save_checkpoint
from .config import ConfigError, TeacherConfig, channel_mult, check_resumable, validate
from .driver import RunDriver
from .ema import EMA
from .guard import NonFiniteGuard, holds_run_lock, keeps_caller_rng, prepare_run_dir


@dataclass
class _Data:
    """The training set as the network sees it (latents for a latent teacher), and its conditions."""
    points: torch.Tensor
    labels: torch.Tensor | None  # None: unconditional
    class_names: tuple[str, ...]
    captions: torch.Tensor | None  # [templates, classes, length, dim]: a text teacher's
    null_caption: torch.Tensor | None  # the dropped caption's states
    codec: LatentCodec | None
    sigma_data: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.points.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.labels is not None else 0

    def to(self, device: torch.device) -> _Data:
        move = (lambda t: t.to(device) if t is not None else None)  # noqa: E731
        return dataclasses.replace(self, points=move(self.points), labels=move(self.labels),
                                   captions=move(self.captions), null_caption=move(self.null_caption))


@holds_run_lock
@keeps_caller_rng
def train_teacher(cfg: TeacherConfig, progress: bool | None = None, *, resume: bool = False,
                  command: str | None = None) -> Path:
    """Train, checkpoint and evaluate a teacher; returns the teacher folder ``cfg.out/teacher``.

    ``resume=True`` continues from the newest checkpoint in ``cfg.out`` (``cfg.steps`` may be raised).
    ``command`` (the CLI line) is recorded in ``teacher.json``."""
    validate(cfg)
    dist.init()  # under torchrun: every process draws the global batch from `gen` and keeps its slice
    device = dist.resolve_device(cfg.device)
    local = dist.local_slice(cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)  # everything below is drawn from it, in this order
    data = _load_data(cfg, gen)  # bad data fails before the run folder is made
    # process 0 makes and locks the folder; if it cannot, the others stop quietly (dist.PeerStopped)
    out = dist.on_main(lambda: prepare_run_dir(Path(cfg.out), resume), Path(cfg.out))
    net = _network(cfg, data, gen).to(device).train()
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    d = data.to(device)
    sigma_sampler = LogNormal(0.0, 1.0) if cfg.backbone == "sd3" else LogNormal()  # SD3's logit-normal t
    guard = NonFiniteGuard("strict", resume_hint=None)  # no skip mode for teachers
    vae_sha = vae_sha256(cfg.vae) if d.codec is not None else None
    step = 0

    def restore(state: dict, meta: dict) -> None:  # a missing or mistyped entry is damage (load_latest)
        nonlocal step
        opt.load_state_dict(entry(state, "optimizer", dict, "state.pt"))
        gen.set_state(entry(state, "rng", torch.Tensor, "state.pt"))
        step, ema.num_updates = meta["step"], entry(meta, "ema_updates", int, "state.json")

    def check(meta: dict) -> None:
        check_resumable(meta.get("config", {}), cfg, str(out))
        if meta.get("vae_sha256") != vae_sha:  # the same path, another VAE: other latents
            raise ConfigError(f"cannot resume {out}: the VAE in {cfg.vae} is not the one this run started with "
                              "(its files' SHA-256 differs); use another --out for a new run")

    loaded = load_latest(out / RunFolder.CHECKPOINTS, {"teacher": net, "ema": ema.module}, check,
                         restore) if resume else None
    if loaded is not None:
        guard.resumed_from = loaded[0]
    driver = RunDriver(out, cfg.steps, cfg.log_every, cfg.checkpoint_every, desc="teacher", progress=progress,
                       tensorboard=cfg.tensorboard)
    driver.begin(step, asdict(cfg), resume, loaded[0] if loaded is not None else None)

    def update(at: int) -> None:
        x, sigma, n, cond = _batch(cfg, d, gen, local, device, sigma_sampler)
        with amp:
            loss = denoising_loss(net, x, sigma, n, cond).float().mean()
        guard.step(opt, loss, net, "teacher", at + 1, 0.0, out)
        ema.update(net)
        driver.stats.add({"loss/teacher": loss})

    def save(at: int) -> None:
        save_checkpoint(out / RunFolder.CHECKPOINTS, at, {"teacher": net, "ema": ema.module},
                        {"optimizer": opt.state_dict(), "rng": gen.get_state()},
                        {"config": asdict(cfg), "ema_updates": ema.num_updates,
                         **({"vae_sha256": vae_sha} if vae_sha else {})}, cfg.keep_checkpoints)

    driver.run(step, update, save, after=lambda _, row: {"loss": row["loss/teacher"]} if row else None)
    if not dist.is_main():  # rank 0 evaluates and writes the teacher folder
        return out / "teacher"
    return _write_teacher(cfg, out, ema.module, d, gen, device, command)


def _batch(cfg: TeacherConfig, d: _Data, gen: torch.Generator, local: slice, device: torch.device,
           sigma_sampler: LogNormal) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One step's draws (this process's share): data, sigma, noise, and the condition with dropout."""
    idx = torch.randint(len(d.points), (cfg.batch_size,), generator=gen)[local].to(device)
    sigma = sigma_sampler(cfg.batch_size, gen)[local]
    n = torch.randn((cfg.batch_size, *d.shape), generator=gen)[local]
    cond = None
    if d.labels is not None:  # drop some labels to the "no label" class num_classes
        drop = (torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout)[local].to(device)
        cond = torch.where(drop, d.num_classes, d.labels[idx])
        if d.captions is not None:  # a caption of each label, its template drawn; dropped: no text
            t = torch.randint(len(d.captions), (cfg.batch_size,), generator=gen)[local].to(device)
            cond = torch.where(drop[:, None, None], d.null_caption, d.captions[t, d.labels[idx]])
    return d.points[idx], sigma.to(device), n.to(device), cond


def _load_data(cfg: TeacherConfig, gen: torch.Generator) -> _Data:
    """The training set, checked against the config (every refusal before the run folder is made)."""
    labels, class_names = None, ()
    if is_image_spec(cfg.data):
        data = load_images(cfg.data)
        points, class_names = data.images, data.class_names
        labels = data.labels if cfg.conditional else None
        _check_images(cfg, points, data.labels, labels)
    elif cfg.text_encoder or cfg.vae or cfg.backbone != "auto":
        raise ConfigError("text_encoder, vae and backbone = 'sd3' are for image teachers; leave them at their "
                          "defaults for a point cloud")
    else:
        points = load_points(cfg.data, cfg.num_points, gen)
    codec = _codec(cfg.vae, points) if cfg.vae else None
    if codec is not None:  # a latent teacher: the images as the VAE's scaled latents (posterior means), once
        points = codec.encode(points)
    if cfg.backbone == "sd3" and points.shape[2] % cfg.patch_size:
        raise ConfigError(f"patch_size {cfg.patch_size} does not divide the {points.shape[2]}x{points.shape[3]} "
                          f"{'latents' if codec else 'images'}")
    captions, null_caption = _captions(cfg.text_encoder, class_names) if cfg.text_encoder else (None, None)
    sigma_data = float(points.std())
    if not sigma_data > 1e-6 or not math.isfinite(sigma_data):  # constant images or points (float rounding)
        raise ConfigError(f"{cfg.data} has standard deviation {sigma_data:g} (every value the same, or beyond "
                          "float32): "
                          "a diffusion teacher needs data that varies; check the data")
    return _Data(points, labels, tuple(class_names), captions, null_caption, codec, sigma_data)


def _check_images(cfg: TeacherConfig, points: torch.Tensor, all_labels: torch.Tensor | None,
                  labels: torch.Tensor | None) -> None:
    if points.shape[2] != points.shape[3]:
        raise ConfigError(f"{cfg.data} has {points.shape[2]}x{points.shape[3]} images; the U-Net takes square "
                          "images: crop or resize them to one square size first")
    halvings = len(channel_mult(cfg.channel_mult)) - 1  # each level after the first halves the resolution
    res = points.shape[2]
    if cfg.backbone != "sd3" and (res % 2**halvings or res < 2**halvings):
        raise ConfigError(f"{cfg.data} has {res}x{res} images; a U-Net with channel_mult {cfg.channel_mult} halves "
                          f"them {halvings} times, so their size must be a multiple of {2**halvings} (e.g. "
                          f"{max(2**halvings, 8 * 2**halvings // 2)}): resize them, or use fewer levels "
                          "(e.g. --channel-mult 1,2)")
    if cfg.text_encoder and labels is None:
        raise ConfigError(f"text_encoder = {cfg.text_encoder!r} captions the labels of {cfg.data}, which has none"
                          + ("" if all_labels is None else " (conditional = false)"))
    if (cfg.backbone == "sd3") != cfg.text_encoder.endswith(POOLED):
        raise ConfigError("backbone = 'sd3' is caption-conditioned and takes a pooled text embedding beside the "
                          f"token states: set text_encoder to minilm{POOLED} (or <folder>{POOLED}); the U-Net "
                          f"takes the token states alone (no {POOLED})")
    if cfg.vae and cfg.backbone != "sd3":
        raise ConfigError("vae is for backbone = 'sd3' (a latent teacher is a diffusers transformer saved with its "
                          "VAE); leave vae empty for a U-Net on pixels")
    if cfg.backbone == "sd3" and cfg.hidden % 32:
        raise ConfigError(f"backbone = 'sd3' uses 32-wide attention heads: hidden must be a multiple of 32; "
                          f"got {cfg.hidden}")


def _network(cfg: TeacherConfig, d: _Data, gen: torch.Generator) -> Precond | DiffusersDenoiser:
    """The untrained teacher: an SD3 transformer, a text or class U-Net, or an MLP (by the data and config)."""
    shape, images = d.shape, len(d.shape) == 3
    with torch.random.fork_rng(devices=[]):  # layers initialise from the global RNG: seed it from ours
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        if cfg.backbone == "sd3":
            net = _sd3_network(shape, d.captions.shape[-1], cfg, d.sigma_data)
        else:
            if d.captions is not None:
                backbone = TextUNet(shape[0], shape[1], cfg.base_channels, channel_mult(cfg.channel_mult),
                                    cfg.layers_per_block, text_dim=d.captions.shape[-1],
                                    text_length=d.captions.shape[-2])
            elif images:
                backbone = UNet(shape[0], shape[1], cfg.base_channels, channel_mult(cfg.channel_mult),
                                cfg.layers_per_block, cfg.attention, d.num_classes)
            else:
                backbone = MLP(shape[0], cfg.hidden, cfg.depth)
            net = Precond(backbone, d.sigma_data)
    if cfg.grad_checkpointing:
        if not images:
            raise ConfigError("grad_checkpointing is for U-Net teachers (image data); an MLP needs none")
        net.backbone.unet.enable_gradient_checkpointing()
    return net


def _write_teacher(cfg: TeacherConfig, out: Path, net: Precond | DiffusersDenoiser, d: _Data, gen: torch.Generator,
                   device: torch.device, command: str | None) -> Path:
    """Evaluation and the teacher folder (after the last checkpoint, so resume does not see its draws)."""
    # a data file is recorded by absolute path: the teacher is distilled from other working directories
    data = str(Path(cfg.data).resolve()) if Path(cfg.data).suffix in (".npy", ".csv") else absolute_spec(cfg.data)
    meta = {"data": data, "shape": list(d.shape), "train_config": asdict(cfg)}
    images = len(d.shape) == 3
    if images:
        meta["class_names"] = list(d.class_names) if d.num_classes else []
        grid_cond = None  # a text teacher's grid: the first template's caption of each class
        if d.captions is not None:
            grid_cond = d.captions[0, torch.arange(cfg.eval_samples, device=device) % d.num_classes]
        grid = _image_samples(net, d.shape, d.num_classes, gen, cfg.eval_samples, device, grid_cond)
        if d.codec is not None:
            grid = d.codec.decode(grid)
        if d.captions is not None:
            encoder = cfg.text_encoder.removesuffix(POOLED)
            if encoder not in BUILTIN:  # a folder by absolute path: distilled from other directories
                encoder = str(Path(encoder).resolve())
            meta["text"] = {"encoder": encoder + (POOLED if cfg.text_encoder.endswith(POOLED) else ""),
                            "length": _text_length(cfg.text_encoder, d.captions), "templates": list(TRAIN_TEMPLATES)}
        meta["metrics"] = {"eval_nfe": nfe("heun", 18)}
    else:
        meta["metrics"] = _evaluate(net, d.points, gen, cfg.eval_samples)
    if command is not None:
        meta["command"] = command
    meta[INTEGRITY] = MANIFEST  # checksums of the files a distillation loads, verified there (checkpoint.py)
    folder = save_teacher(out / "teacher", net, meta, codec=d.codec)
    write_manifest(folder, ["model.safetensors", "teacher.json"])  # teacher.json pins vae/'s own manifest
    if images:
        save_grid(folder / "samples.png", grid, nrow=max(d.num_classes, 8))
    return folder


@torch.no_grad()
def _image_samples(net: Precond, shape: tuple[int, ...], num_classes: int, gen: torch.Generator, count: int,
                   device: torch.device, cond: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` 35-NFE Heun samples; a conditional teacher's cycle through the classes (a column each),
    a text teacher's through captions of them (``cond``)."""
    noise = torch.randn((count, *shape), generator=gen).to(device)
    if cond is None and num_classes:
        cond = torch.arange(count) % num_classes
    return sample(net.eval(), noise, num_steps=18, cond=None if cond is None else cond.to(device)).cpu()


def _captions(encoder: str, class_names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of every training caption, ``[templates, classes, length, dim]``, and of "no text"
    ``[length, dim]``: all zeros for the U-Net (as the shipped text teacher was trained), the empty prompt's
    states for an SD3 transformer (a ``DiffusersTeacher``'s unconditional input, as in Stable Diffusion)."""
    from ..text import caption_prompts, load_text_encoder

    try:
        enc = load_text_encoder(encoder)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    hidden = enc.encode(caption_prompts(class_names, TRAIN_TEMPLATES).prompts)
    null = enc.unconditional()[0] if encoder.endswith(POOLED) else torch.zeros_like(hidden[0])  # sd3 : U-Net
    return hidden.reshape(len(TRAIN_TEMPLATES), len(class_names), *hidden.shape[1:]), null


def _text_length(encoder: str, captions: torch.Tensor) -> int:
    """The encoder's token budget (a pooled encoder's states carry one more, packed, token)."""
    return captions.shape[-2] - (1 if encoder.endswith(POOLED) else 0)


def _codec(folder: str, images: torch.Tensor) -> LatentCodec:
    try:
        codec = load_codec(folder)
    except (OSError, ValueError) as e:
        raise ConfigError(f"vae = {folder!r}: {e} (train one with `dibregman train-vae --data <images> --out <dir>` "
                          "and pass <dir>/vae)") from None
    if codec.image_channels != images.shape[1] or images.shape[2] % codec.factor:
        raise ConfigError(f"vae = {folder!r} takes {codec.image_channels}-channel images whose side is a multiple of "
                          f"{codec.factor}; the data has shape {tuple(images.shape[1:])}")
    return codec


def _sd3_network(shape: tuple[int, ...], text_dim: int, cfg: TeacherConfig, sigma_data: float
                 ) -> DiffusersDenoiser:
    """An ``SD3Transformer2DModel`` of width ``cfg.hidden`` (32-wide heads), ``cfg.depth`` joint blocks, taking
    ``shape`` latents and ``text_dim``-wide token states with a pooled embedding of the same width, under a
    ``FlowMatchEulerDiscreteScheduler`` (shift 1: this is the training law, not a sampling grid)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    side = shape[1] // cfg.patch_size
    transformer = SD3Transformer2DModel(
        sample_size=shape[1], patch_size=cfg.patch_size, in_channels=shape[0], out_channels=shape[0],
        num_layers=cfg.depth, attention_head_dim=32, num_attention_heads=cfg.hidden // 32,
        joint_attention_dim=text_dim, caption_projection_dim=cfg.hidden, pooled_projection_dim=text_dim,
        pos_embed_max_size=side)
    return DiffusersDenoiser(transformer, FlowMatchEulerDiscreteScheduler(), sigma_data)


@torch.no_grad()
def _evaluate(net: Precond, points: torch.Tensor, gen: torch.Generator, count: int) -> dict[str, Any]:
    """Energy distance between ``count`` 35-NFE Heun samples of the teacher and ``count`` data points."""
    from ..metrics.toy import energy_distance

    count = min(count, len(points))
    device = points.device
    noise = torch.randn(count, points.shape[1], generator=gen).to(device)
    samples = sample(net.eval(), noise, num_steps=18)
    data = points[torch.randperm(len(points), generator=gen)[:count].to(device)]
    return {"energy_distance": float(energy_distance(samples.cpu(), data.cpu())), "eval_samples": count,
            "eval_nfe": nfe("heun", 18)}
