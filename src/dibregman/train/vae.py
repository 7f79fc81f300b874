"""Train a small diffusers ``AutoencoderKL`` on an image set: the VAE of a latent teacher trained here.

Loss: mean absolute reconstruction error of a posterior sample plus ``kl_weight`` times the KL divergence to
N(0, I) summed over the latent (Stable Diffusion's VAE recipe without its perceptual and GAN terms, which need
pretrained networks). After training, the latents' mean and standard deviation over the training set become
the config's ``shift_factor`` and ``scaling_factor`` (``z = (E(x) - shift) * scale`` has zero mean and unit
variance), as Stable Diffusion chose its 0.18215, so a latent teacher on it takes ``sigma_data = 1``.

Output folder ``out``: ``vae/`` (``save_pretrained``, safetensors; what ``train-teacher --vae`` and the
latent teachers read), ``vae.json`` (command, data, settings, held-out reconstruction error) and
``reconstructions.png`` (held-out images over their reconstructions; digits has no test split, so its last
1000 training images stand in). While it trains, ``out`` is a run folder (``train_vae``), resumable bit-exactly;
``vae/`` is written last, so a folder with one holds a finished VAE.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ..data.images import load_images, test_split
from ..dist import resolve_device
from ..grids import save_grid
from ..io import fsync_dir, write_json
from ..run_folder import RunFolder
from .checkpoint import entry, load_latest, same_arguments, save_checkpoint
from .driver import RunDriver
from .guard import NonFiniteGuard, holds_run_lock, keeps_caller_rng, prepare_run_dir

Tensor = torch.Tensor

META_FILE = "vae.json"


def small_vae(image_channels: int, resolution: int, channels: tuple[int, ...] = (16, 32, 64),
              latent_channels: int = 4) -> Any:
    """An ``AutoencoderKL`` halving the image ``len(channels) - 1`` times (28 px -> 7 with three levels)."""
    from diffusers import AutoencoderKL

    groups = math.gcd(*channels, 8)
    return AutoencoderKL(in_channels=image_channels, out_channels=image_channels, latent_channels=latent_channels,
                         block_out_channels=tuple(channels), layers_per_block=1, norm_num_groups=groups,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), sample_size=resolution)


@holds_run_lock  # until the VAE is written: a second process cannot start on the folder before
@keeps_caller_rng
def train_vae(data: str, out: str | Path, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
              channels: tuple[int, ...] = (16, 32, 64), latent_channels: int = 4, kl_weight: float = 1e-6,
              seed: int = 0, device: str = "auto", progress: bool | None = None,
              command: str | None = None, resume: bool = False, checkpoint_every: int = 500) -> Path:
    """Train a VAE on ``data`` (an image spec) and write ``out`` (module docstring); returns ``out / "vae"``.

    While it trains, ``out`` is a run folder like distillation's (``config.json``, ``stats.jsonl`` with
    ``loss/vae``, ``vae/l1`` and ``vae/kl``, ``checkpoints/`` every ``checkpoint_every`` steps and on
    SIGINT/SIGTERM); ``resume=True`` continues an interrupted run bit-exactly (same arguments). A non-finite loss
    or gradient stops it with the last checkpoint named."""
    out = Path(out)
    if (out / "vae").exists():
        raise FileExistsError(f"{str(out / 'vae')!r} already exists: choose another --out or remove it")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("latent_channels", latent_channels),
                    ("checkpoint_every", checkpoint_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}")
    if not 0 < lr < 3.4e38 or not kl_weight >= 0:  # float32 parameters take no larger step
        raise ValueError(f"need 0 < lr < 3.4e38 and kl_weight >= 0; got {lr}, {kl_weight}")
    if not channels or min(channels) < 1:
        raise ValueError(f"channels must be positive integers, one per level; got {channels}")
    images = load_images(data).images
    res, levels = images.shape[2], len(channels) - 1
    if images.shape[2] != images.shape[3] or res % 2**levels:
        raise ValueError(f"{data} has {images.shape[2]}x{images.shape[3]} images; {len(channels)} levels need square "
                         f"images whose side is a multiple of {2**levels}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{data} has non-finite pixels (NaN or inf): fix or drop those images")
    held = test_split(data)
    test = load_images(held).images[:1000] if held else images[-1000:]
    dev = resolve_device(device)
    config = {"data": data, "steps": steps, "batch_size": batch_size, "lr": float(lr), "channels": list(channels),
              "latent_channels": latent_channels, "kl_weight": float(kl_weight), "seed": seed, "device": str(dev)}
    vae, seconds = _train(images, out, config, dev, progress, resume, checkpoint_every)
    vae.eval()
    with torch.no_grad():
        mean = torch.cat([vae.encode(x.to(dev)).latent_dist.mean.cpu() for x in images[:10000].split(500)])
        shift, scale = float(mean.mean()), 1.0 / float(mean.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        recon = torch.cat([vae.decode(vae.encode(x.to(dev)).latent_dist.mean).sample.clamp(-1, 1).cpu()
                           for x in test.split(500)])
    l1 = float((recon - test).abs().mean())
    mse = float((recon - test).square().mean())
    save_grid(out / "reconstructions.png", torch.cat([test[:16], recon[:16]]), nrow=16)
    write_json(out / META_FILE, {
        **{k: v for k, v in config.items() if k != "device"}, "command": command,
        "latent_shape": list(mean.shape[1:]), "shift_factor": shift, "scaling_factor": scale,
        "test_data": held or f"{data} (last 1000 training images)", "test_l1": l1, "test_mse": mse,
        "test_psnr_db": 10 * math.log10(4.0 / mse) if mse > 0 else None,  # images span [-1, 1]: peak-to-peak 2
        "parameters": sum(p.numel() for p in vae.parameters()), "train_seconds": seconds})
    tmp = out / "vae.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    vae.cpu().save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(out / "vae")  # last, whole or absent: a finished run is one with a vae/
    shutil.rmtree(out / RunFolder.CHECKPOINTS, ignore_errors=True)  # a finished folder is the VAE alone
    fsync_dir(out)
    return out / "vae"


def _train(images: Tensor, out: Path, config: dict, dev: torch.device, progress: bool | None, resume: bool,
           checkpoint_every: int) -> tuple[Any, float]:
    """The training steps, through the run driver: the trained VAE and the seconds of this invocation's steps.
    One CPU generator seeded from ``seed`` draws the weights, the batches and the posterior noise."""
    gen = torch.Generator().manual_seed(config["seed"])
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))  # layers initialise from the global RNG
    vae = small_vae(images.shape[1], images.shape[2], tuple(config["channels"]), config["latent_channels"])
    vae.to(dev).train()
    out = prepare_run_dir(out, resume)
    opt = torch.optim.Adam(vae.parameters(), lr=config["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config["steps"])
    guard = NonFiniteGuard("strict", resume_hint=None)
    run = {"step": 0}

    def restore(state: dict, meta: dict) -> None:
        opt.load_state_dict(entry(state, "optimizer", dict, "state.pt"))
        sched.load_state_dict(entry(state, "scheduler", dict, "state.pt"))
        gen.set_state(entry(state, "rng", torch.Tensor, "state.pt"))
        run["step"] = meta["step"]

    loaded = (load_latest(out / RunFolder.CHECKPOINTS, {"vae": vae}, same_arguments(config, out), restore)
              if resume else None)
    driver = RunDriver(out, config["steps"], max(1, min(50, config["steps"] // 20)), checkpoint_every, desc="vae",
                       progress=progress)
    driver.begin(run["step"], config, resume, loaded[0] if loaded is not None else None)

    def update(step: int) -> None:
        x = images[torch.randint(len(images), (config["batch_size"],), generator=gen)].to(dev)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)
        l1, kl = (vae.decode(z).sample - x).abs().mean(), post.kl().mean()
        loss = l1 + config["kl_weight"] * kl
        guard.step(opt, loss, vae, "VAE", step + 1, 0.0, out)
        sched.step()
        driver.stats.add({"loss/vae": loss.detach(), "vae/l1": l1.detach(), "vae/kl": kl.detach()})

    def save(step: int) -> None:
        save_checkpoint(out / RunFolder.CHECKPOINTS, step, {"vae": vae},
                        {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": gen.get_state()},
                        {"config": config}, keep=1)

    driver.run(run["step"], update, save, after=lambda _, row: {"loss": row["loss/vae"]} if row else None)
    return vae, round(sum(driver.step_times), 1)
