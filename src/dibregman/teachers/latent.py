"""The VAE of a latent pipeline (Stable Diffusion and kin): images in, scaled latents out, and back.

A latent teacher's denoiser, its students and their fake scores all work on the *scaled* latents the
pipeline's UNet sees, ``z = (E(x) - shift_factor) * scaling_factor`` (``shift_factor`` 0 where the VAE config has
none, as in SD 1.x/2.x); images are only made where a person or a metric looks at them: grids, evaluation,
``sample``. Decoding inverts that map as the pipelines do (``D(z / scaling_factor + shift_factor)``) and
clamps to [-1, 1], the range their image post-processing keeps. Encoding takes the posterior mean (no
sampling noise), so a real image always gives the same latent.

The VAE is frozen: eval mode whatever the caller does, parameters without gradients, never optimised, and
saved beside a latent student's weights so ``dibregman sample`` decodes without the teacher folder.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..sampling import batch_for

Tensor = torch.Tensor

VAE_CLASSES = ("AutoencoderKL",)
VAE_FOLDER = "vae"  # the subfolder name in a pipeline folder and in a latent generator's folder


class LatentCodec(nn.Module):
    """A frozen ``AutoencoderKL`` with its pipeline's latent scaling: ``encode`` / ``decode`` in batches."""

    def __init__(self, vae: nn.Module, batch_size: int | None = None):
        super().__init__()
        name = type(vae).__name__
        if name not in VAE_CLASSES:
            raise ValueError(f"unsupported VAE class {name}; supported: {', '.join(VAE_CLASSES)}")
        cfg = vae.config
        if cfg.get("latents_mean") is not None or cfg.get("latents_std") is not None:
            raise ValueError(f"this {name} normalises latents per channel (latents_mean / latents_std in its config), "
                             "which only some pipelines apply; not supported yet: only scaling_factor / shift_factor")
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(cfg.get("scaling_factor") or 1.0)
        self.shift_factor = float(cfg.get("shift_factor") or 0.0)
        self.factor = 2 ** (len(cfg["block_out_channels"]) - 1)  # every down block but the last halves the size
        self.latent_channels = int(cfg["latent_channels"])
        self.image_channels = int(cfg["out_channels"])
        self.batch_size = batch_size  # None: sized from the image (sampling.batch_for)

    def train(self, mode: bool = True) -> LatentCodec:
        return super().train(False)

    def image_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The decoded image's ``(C, H, W)`` for latents of ``latent_shape``."""
        _, h, w = latent_shape
        return self.image_channels, int(h) * self.factor, int(w) * self.factor

    def _device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] ``[N, C, H, W]`` -> scaled latents (posterior mean), on the images' device."""
        size = self.batch_size or batch_for(images.shape[1:], 64)
        out = [((self.vae.encode(x.to(self._device(), torch.float32)).latent_dist.mean - self.shift_factor)
                * self.scaling_factor).to(images.device) for x in images.split(size)]
        return torch.cat(out) if out else images.new_zeros((0, self.latent_channels, 1, 1))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1] ``[N, C, H, W]``, on the latents' device."""
        size = self.batch_size or batch_for(self.image_shape(tuple(latents.shape[1:])), 64)
        out = [self.vae.decode(z.to(self._device(), torch.float32) / self.scaling_factor + self.shift_factor)
               .sample.clamp(-1, 1).to(latents.device) for z in latents.split(size)]
        if not out:
            return latents.new_zeros((0, *self.image_shape(tuple(latents.shape[1:]))))
        return torch.cat(out)

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """Write the VAE as a diffusers model folder (config + safetensors weights of ``dtype``; ``read_vae``
        loads float32 whatever was stored)."""
        vae = self.vae if dtype == torch.float32 else copy.deepcopy(self.vae).to(dtype)
        vae.save_pretrained(str(folder), safe_serialization=True)
        return Path(folder)


def save_pinned_vae(codec: LatentCodec, folder: str | Path, dtype: torch.dtype = torch.float32) -> str:
    """Write ``codec``'s VAE to ``folder/vae`` with a manifest of its own (a manifest names files of its folder
    only), whole or absent (written beside, then renamed); returns that manifest's SHA-256, which the owner's
    JSON (``teacher.json``, ``generator.json``) records to pin this VAE."""
    import shutil

    from ..integrity import MANIFEST, file_sha256, write_manifest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    partial, final = folder / f"{VAE_FOLDER}.partial", folder / VAE_FOLDER
    shutil.rmtree(partial, ignore_errors=True)
    codec.save(partial, dtype)
    write_manifest(partial, sorted(p.name for p in partial.iterdir()))
    shutil.rmtree(final, ignore_errors=True)  # an older copy (a resumed run's)
    partial.rename(final)
    return file_sha256(final / MANIFEST)


def load_pinned_vae(vae: str | Path, sha256: Any, owner: str, record: str) -> LatentCodec:
    """The VAE in folder ``vae``, checked against its manifest and that manifest against ``sha256`` (what
    ``record``, the JSON file of ``owner`` that pins it, holds); a ``CheckpointError`` says which check failed."""
    from ..integrity import MANIFEST, CheckpointError, file_sha256, verify_manifest

    vae = Path(vae)
    if not vae.is_dir() or not verify_manifest(vae, ("config.json",), what="VAE folder"):
        raise CheckpointError(f"{vae} (or its {MANIFEST}) is missing")
    if file_sha256(vae / MANIFEST) != sha256:  # a VAE swapped in whole, manifest too
        raise CheckpointError(f"{vae} is not the VAE {owner} was saved with (its manifest's SHA-256 differs from "
                              f"{record}'s)")
    return load_codec(vae)


def vae_sha256(folder: str | Path) -> str:
    """One SHA-256 over a VAE folder's config and weights (what a resumed latent teacher run checks)."""
    import hashlib

    from ..integrity import file_sha256

    folder = Path(folder)
    names = ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]
    return hashlib.sha256(" ".join(f"{n}:{file_sha256(folder / n)}" for n in names).encode()).hexdigest()


def read_vae(folder: str | Path) -> Any:
    """The ``AutoencoderKL`` saved in ``folder`` (a diffusers model folder), on the CPU in float32, offline."""
    import diffusers

    from .diffusers import _read_json, lazy_loading

    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no VAE: expected config.json with its weights "
                                "(vae.save_pretrained)")
    name = _read_json(config).get("_class_name")
    if name not in VAE_CLASSES:
        raise ValueError(f"{str(config)!r}: unsupported VAE class {name!r}; supported: {', '.join(VAE_CLASSES)}")
    if not list(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{str(folder)!r} has no safetensors weights for its VAE (pickled .bin weights can "
                                "run code when loaded): save it with vae.save_pretrained(folder, "
                                "safe_serialization=True)")
    return getattr(diffusers, name).from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32,
                                                    low_cpu_mem_usage=lazy_loading(), use_safetensors=True)


def load_codec(folder: str | Path) -> LatentCodec:
    return LatentCodec(read_vae(folder))
