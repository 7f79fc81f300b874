"""Finished generators on disk: ``model.safetensors`` (EMA weights) + ``generator.json`` (how to rebuild)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from .generator import OneStepGenerator
from .io import atomic_save_safetensors, write_json
from .nets.mlp import MLP
from .precond import Precond
from .train.checkpoint import CheckpointError, load_module

FORMAT = "dibregman-generator"


def build_mlp_precond(arch: dict[str, Any], sigma_data: float) -> Precond:
    if arch.get("kind", "mlp") != "mlp":
        raise ValueError(f"unknown network kind {arch.get('kind')!r}; this version builds 'mlp'")
    return Precond(MLP(**{k: v for k, v in arch.items() if k != "kind"}), sigma_data)


def arch_of(net: nn.Module) -> dict[str, Any]:
    backbone = net.backbone if isinstance(net, Precond) else net
    return {"kind": "mlp", **backbone.arch()}


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
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{info_path} is not valid JSON ({e})") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{info_path} is not a dibregman generator (format {info.get('format')!r})")
    gen = OneStepGenerator(build_mlp_precond(info["arch"], info["sigma_data"]), info["sigma_g"])
    load_module(gen, folder / "model.safetensors")
    return gen.eval().requires_grad_(False), info
