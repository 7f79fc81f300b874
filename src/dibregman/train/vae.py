"""Train a small diffusers ``AutoencoderKL`` on an image set: the VAE of a latent teacher trained here.

Loss: mean absolute reconstruction error of a posterior sample plus ``kl_weight`` times the KL divergence to
N(0, I) summed over the latent (Stable Diffusion's VAE recipe without its perceptual and GAN terms, which need
pretrained networks). After training, the latents' mean and standard deviation over the training set become
the config's ``shift_factor`` and ``scaling_factor`` (``z = (E(x) - shift) * scale`` has zero mean and unit
variance), as Stable Diffusion chose its 0.18215, so a latent teacher on it takes ``sigma_data = 1``.

Output folder ``out``: ``vae/`` (``save_pretrained``, safetensors; what ``train-teacher --vae`` and the
latent teachers read), ``vae.json`` (command, data, settings, held-out reconstruction error) and
``reconstructions.png`` (held-out images over their reconstructions; digits has no test split, so its last
1000 training images stand in). A run takes minutes, so it is not resumable: ``vae/`` is written last, and an
interrupted run leaves none and starts over.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..data.images import load_images, test_split
from ..dist import resolve_device
from ..grids import save_grid
from ..io import fsync_dir, write_json

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


def train_vae(data: str, out: str | Path, steps: int = 2000, batch_size: int = 64, lr: float = 1e-3,
              channels: tuple[int, ...] = (16, 32, 64), latent_channels: int = 4, kl_weight: float = 1e-6,
              seed: int = 0, device: str = "auto", progress: bool | None = None,
              command: str | None = None) -> Path:
    """Train a VAE on ``data`` (an image spec) and write ``out`` (module docstring); returns ``out / "vae"``."""
    from tqdm import tqdm

    out = Path(out)
    if (out / "vae").exists():
        raise FileExistsError(f"{str(out / 'vae')!r} already exists: choose another --out or remove it")
    for name, v in (("steps", steps), ("batch_size", batch_size), ("latent_channels", latent_channels)):
        if v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v}")
    if not lr > 0 or not kl_weight >= 0:
        raise ValueError(f"need lr > 0 and kl_weight >= 0; got {lr}, {kl_weight}")
    if not channels or min(channels) < 1:
        raise ValueError(f"channels must be positive integers, one per level; got {channels}")
    images = load_images(data).images
    res, levels = images.shape[2], len(channels) - 1
    if images.shape[2] != images.shape[3] or res % 2**levels:
        raise ValueError(f"{data} has {images.shape[2]}x{images.shape[3]} images; {len(channels)} levels need square "
                         f"images whose side is a multiple of {2**levels}")
    held = test_split(data)
    test = load_images(held).images[:1000] if held else images[-1000:]
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        vae = small_vae(images.shape[1], res, channels, latent_channels).to(dev).train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    show = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    for _ in tqdm(range(steps), disable=not show, desc="vae", dynamic_ncols=True):
        x = images[torch.randint(len(images), (batch_size,), generator=gen)].to(dev)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(dev)
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean() + kl_weight * post.kl().mean()
        if not torch.isfinite(loss):
            raise ValueError("the VAE loss became NaN or infinite: lower --lr (nothing was written)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    vae.eval()
    with torch.no_grad():
        mean = torch.cat([vae.encode(x.to(dev)).latent_dist.mean.cpu() for x in images[:10000].split(500)])
        shift, scale = float(mean.mean()), 1.0 / float(mean.std())
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        recon = torch.cat([vae.decode(vae.encode(x.to(dev)).latent_dist.mean).sample.clamp(-1, 1).cpu()
                           for x in test.split(500)])
    l1 = float((recon - test).abs().mean())
    mse = float((recon - test).square().mean())
    out.mkdir(parents=True, exist_ok=True)
    save_grid(out / "reconstructions.png", torch.cat([test[:16], recon[:16]]), nrow=16)
    write_json(out / META_FILE, {
        "data": data, "command": command, "steps": steps, "batch_size": batch_size, "lr": lr,
        "channels": list(channels), "latent_channels": latent_channels, "kl_weight": kl_weight, "seed": seed,
        "latent_shape": list(mean.shape[1:]), "shift_factor": shift, "scaling_factor": scale,
        "test_data": held or f"{data} (last 1000 training images)", "test_l1": l1, "test_mse": mse,
        "test_psnr_db": 10 * math.log10(4.0 / mse) if mse > 0 else None,  # images span [-1, 1]: peak-to-peak 2
        "parameters": sum(p.numel() for p in vae.parameters()), "train_seconds": seconds})
    tmp = out / "vae.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    vae.cpu().save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(out / "vae")  # last, whole or absent: a finished run is one with a vae/
    fsync_dir(out)
    return out / "vae"
