"""Finished generators on disk: ``model.safetensors`` (EMA weights) + ``generator.json`` (how to rebuild)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .generator import OneStepGenerator
from .io import atomic_save_safetensors, read_tagged_json, write_json
from .nets import arch_of as nets_arch_of
from .nets import build_backbone
from .precond import Precond
from .teachers.diffusers import ARCH_KIND as DIFFUSERS_KIND
from .teachers.diffusers import DiffusersDenoiser
from .train.checkpoint import CheckpointError, load_module

FORMAT = "dibregman-generator"
_REMAKE = "re-create it with `dibregman distill --resume` on its run folder (it rewrites generator/)"


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


def save_generator(folder: str | Path, generator: OneStepGenerator, meta: dict[str, Any]) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    atomic_save_safetensors(folder / "model.safetensors", tensors)
    write_json(folder / "generator.json", {
        "format": FORMAT, "version": 1, "arch": arch_of(generator.denoiser),
        "sigma_data": generator.denoiser.sigma_data, "sigma_g": generator.sigma_g, **meta})
    return folder


def load_generator(folder: str | Path) -> tuple[OneStepGenerator, dict[str, Any]]:
    """A generator saved by ``save_generator`` (or a run folder holding ``generator/``)."""
    folder = Path(folder)
    if (folder / "generator").is_dir():
        folder = folder / "generator"
    info_path = folder / "generator.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{folder} holds no generator.json: pass a run folder written by "
                                "`dibregman distill` or its generator/ subfolder")
    info = read_tagged_json(info_path, FORMAT, _REMAKE)
    try:  # a hand-edited or damaged file: name it rather than fail with a KeyError deep inside
        gen = OneStepGenerator(build_precond(info["arch"], info["sigma_data"]), info["sigma_g"])
        info["shape"] = [int(s) for s in info["shape"]]
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{info_path} is damaged (bad or missing entry {e}); {_REMAKE}") from None
    try:
        load_module(gen, folder / "model.safetensors")
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {_REMAKE}") from None
    return gen.eval().requires_grad_(False), info
