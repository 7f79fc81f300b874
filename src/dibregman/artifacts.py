"""Finished generators on disk: ``model.safetensors`` (EMA weights) + ``generator.json`` (how to rebuild)."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .generator import Generator
from .integrity import (
    INTEGRITY,
    MANIFEST,
    CheckpointError,
    _brief,
    load_module,
    verify_manifest,
    write_manifest,
)
from .io import atomic_save_safetensors, read_tagged_json, write_json
from .nets import arch_of as nets_arch_of
from .nets import build_backbone, image_shape
from .precond import Precond
from .run_folder import RunFolder
from .teachers.diffusers import ARCH_KIND as DIFFUSERS_KIND
from .teachers.diffusers import DiffusersDenoiser
from .teachers.latent import VAE_FOLDER, LatentCodec, load_pinned_vae, save_pinned_vae

FORMAT = "dibregman-generator"
_REMAKE = "re-create it with `dibregman distill --resume` on its run folder (it rewrites generator/)"
# noise levels a generator can be built at: beyond these float32 preconditioning overflows or underflows
SIGMA_RANGE = {"sigma_g": (1e-4, 1e4), "sigma_data": (1e-6, 1e6)}
MAX_SAMPLE_VALUES = 1 << 26  # values in one sample (64 Mi: a 4096x4096x4 image); a larger `shape` is damage


def build_precond(arch: dict[str, Any], sigma_data: float) -> Precond | DiffusersDenoiser:
    """The denoiser ``arch`` describes: a diffusers UNet with its scheduler's conversion (kind "diffusers"),
    else a Precond around one of our backbones (an MLP when it names no kind)."""
    if isinstance(arch, dict) and arch.get("kind") == DIFFUSERS_KIND:
        return DiffusersDenoiser.from_arch(arch, sigma_data)
    return Precond(build_backbone({"kind": "mlp", **arch}), sigma_data)


def arch_of(net: nn.Module) -> dict[str, Any]:
    if isinstance(net, DiffusersDenoiser):  # the conversion is part of the denoiser, not of its backbone
        return net.arch()
    return nets_arch_of(net.backbone if isinstance(net, Precond) else net)


def save_generator(folder: str | Path, generator: Generator, meta: dict[str, Any],
                   codec: LatentCodec | None = None) -> Path:
    """Write ``generator`` (with ``meta``) to ``folder``; a latent student's VAE (``codec``) goes to
    ``folder/vae/``, so its samples decode without the teacher folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    atomic_save_safetensors(folder / "model.safetensors", tensors)
    if codec is not None:
        meta = {**meta, "latent": {"vae": VAE_FOLDER, "image_shape": list(codec.image_shape(meta["shape"])),
                                   "vae_manifest_sha256": save_pinned_vae(codec, folder)}}
    write_json(folder / "generator.json", {
        "format": FORMAT, "version": 1, "arch": arch_of(generator.denoiser),
        "sigma_data": generator.denoiser.sigma_data, "sigma_g": generator.sigma_g,
        **({"sigmas": list(generator.sigmas)} if generator.steps > 1 else {}), **meta, INTEGRITY: MANIFEST})
    write_manifest(folder, ["model.safetensors", "generator.json"])  # last: checksums, verified on load
    return folder


def generator_folder(folder: str | Path) -> Path:
    """The folder holding ``generator.json``: ``folder`` itself or a run folder's ``generator/``."""
    folder = Path(folder)
    return folder / RunFolder.GENERATOR if (folder / RunFolder.GENERATOR).is_dir() else folder


def load_codec_of(folder: str | Path, info: dict[str, Any]) -> LatentCodec | None:
    """A latent generator's VAE (``info`` from ``load_generator``), or None for a pixel or point generator."""
    latent = info.get("latent")
    if not latent:
        return None
    vae = generator_folder(folder) / str(latent.get("vae", VAE_FOLDER)) if isinstance(latent, dict) else None
    if vae is None or vae.parent != generator_folder(folder):
        raise CheckpointError(f"{generator_folder(folder) / 'generator.json'} is damaged (bad entry 'latent'); "
                              f"{_REMAKE}")
    try:
        return load_pinned_vae(vae, latent.get("vae_manifest_sha256"), "this generator", "generator.json")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_REMAKE}") from None


def load_generator(folder: str | Path) -> tuple[Generator, dict[str, Any]]:
    """A generator saved by ``save_generator`` (or a run folder holding ``generator/``)."""
    folder = generator_folder(folder)
    info_path = folder / "generator.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{folder} holds no generator.json: pass a run folder written by "
                                "`dibregman distill` or its generator/ subfolder")
    info = read_tagged_json(info_path, FORMAT, _REMAKE)
    try:  # before anything is built from it: a changed digit is damage, not a different model
        verified = verify_manifest(folder, ("model.safetensors", "generator.json"), what="generator folder")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_REMAKE}") from None
    if info.get(INTEGRITY) is not None and not verified:
        raise CheckpointError(f"{folder / MANIFEST} is missing (generator.json says it has one); {_REMAKE}")
    _check_numbers(info, info_path)
    try:  # a hand-edited or damaged file: name it rather than fail with a KeyError deep inside
        _check_size(info, folder / "model.safetensors", info_path)
        with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten: leave the caller's RNG alone
            gen = Generator(build_precond(info["arch"], info["sigma_data"]), info["sigma_g"], info.get("sigmas"))
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{info_path} is damaged (bad or missing entry {_brief(e)}); {_REMAKE}") from None
    try:
        load_module(gen, folder / "model.safetensors", verify=False)
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_REMAKE}") from None
    return gen.eval().requires_grad_(False), info


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _in_range(value: Any, lo: float, hi: float, key: str) -> bool:
    """``value`` in ``[lo, hi]``; a ``sigma_g`` may also be inf (a flow student's pure-noise start, which
    ``Generator`` accepts only for a flow denoiser)."""
    if key == "sigma_g" and value == math.inf and not isinstance(value, bool):
        return True
    return _positive(value) and lo <= value <= hi


def _check_numbers(info: dict[str, Any], path: Path) -> None:
    """The numbers of ``generator.json`` that shape every sample: finite and in range (a NaN ``sigma_g``
    would give all-NaN samples that look like a working generator)."""
    arch = info.get("arch")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{path} is damaged (bad or missing entry 'arch'); {_REMAKE}")
    for key, (lo, hi) in SIGMA_RANGE.items():
        if key not in info:
            raise CheckpointError(f"{path} is damaged (bad or missing entry {key!r}); {_REMAKE}")
        if not _in_range(info[key], lo, hi, key):
            raise CheckpointError(f"{path} is damaged: {key} must be a finite number > 0 (in [{lo:g}, {hi:g}]"
                                  f"{'; or inf' if key == 'sigma_g' else ''}); got {info[key]!r}; {_REMAKE}")
    sigmas = info.get("sigmas", [info["sigma_g"]])  # a few-step student's noise levels, sigma_g first
    lo, hi = SIGMA_RANGE["sigma_g"]
    if (not isinstance(sigmas, list) or not 1 <= len(sigmas) <= 16
            or not all(_in_range(s, lo, hi, "sigma_g") for s in sigmas)
            or sigmas[0] != info["sigma_g"] or any(b >= a for a, b in pairwise(sigmas))):
        raise CheckpointError(f"{path} is damaged: sigmas must be 1 to 16 decreasing numbers in [{lo:g}, {hi:g}] "
                              "(the first may be inf) "
                              f"starting at sigma_g; got {sigmas!r}; {_REMAKE}")
    shape = info.get("shape")
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
            or math.prod(shape) > MAX_SAMPLE_VALUES):
        raise CheckpointError(f"{path} is damaged: shape must be 1 to 3 positive integers of at most "
                              f"{MAX_SAMPLE_VALUES} values in all; got {shape!r}; {_REMAKE}")
    k = info.get("num_classes", 0)
    if k is None:
        k = 0
    if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 1_000_000:
        raise CheckpointError(f"{path} is damaged: num_classes must be an integer >= 0; got {k!r}; {_REMAKE}")
    expected = image_shape(arch) if arch.get("kind") != "diffusers" else None
    dim = arch.get("dim") if arch.get("kind", "mlp") == "mlp" else None
    if (expected is not None and shape != expected) or (dim is not None and math.prod(shape) != dim):
        raise CheckpointError(f"{path} is damaged: shape {shape} does not match its arch "
                              f"({expected or f'dim {dim}'}); {_REMAKE}")


def _check_size(info: dict[str, Any], weights: Path, path: Path) -> None:
    """Build the network ``arch`` describes on the meta device (no memory) and compare its number of values
    with the weight file's header: a hand-edited ``hidden: 10**9`` is refused before it is allocated."""
    try:
        with safe_open(str(weights), "pt") as f:
            stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - not a dict
    except Exception:  # unreadable: load_module names it
        return
    try:
        with torch.device("meta"):
            described = sum(t.numel() for t in Generator(
                build_precond(info["arch"], info["sigma_data"]), info["sigma_g"]).state_dict().values())
    except (KeyError, TypeError, AttributeError, ValueError):
        raise
    except Exception as e:
        if info["arch"].get("kind", "mlp") in ("mlp", "unet", "text_unet"):  # ours build on meta: a bad arch
            raise ValueError(f"cannot build its arch ({_brief(e)})") from None
        return  # another library's network that cannot be built on the meta device: load_module compares tensors
    if described != stored:
        raise CheckpointError(f"{path} describes a network of {described} values but {weights.name} holds "
                              f"{stored}; {_REMAKE}")
