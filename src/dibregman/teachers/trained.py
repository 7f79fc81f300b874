"""Teachers we trained ourselves: an EDM-preconditioned MLP or U-Net saved as a folder.

Folder format (version 1)::

    model.safetensors   the Precond's state dict (EMA weights), float32; keys "backbone.<...>"
    teacher.json        {"format": "dibregman-teacher", "version": 1,
                         "arch": {"kind": "mlp" | "unet" | "edm_songunet", <constructor arguments>},
                         "sigma_data": float, "shape": [d], "data": str,
                         "command": str (optional), "metrics": {...} (optional),
                         "sigma_min", "sigma_max": float (optional, default 0.002 and 80)}

Weights are read only through safetensors (never pickle); every mismatch raises a message that names
the file and what to do.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..io import atomic_save_safetensors, read_tagged_json, require_files, write_json
from ..nets import KINDS, arch_of, build_backbone, image_shape
from ..nets.edm_unet import SongUNet
from ..nets.mlp import MLP
from ..nets.text_unet import TextUNet
from ..nets.unet import UNet
from ..precond import Precond

Tensor = torch.Tensor

FORMAT = "dibregman-teacher"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "teacher.json"


class NetworkTeacher(nn.Module):
    """A frozen denoiser ``D(x, sigma, cond)`` (the Teacher protocol) around a trained ``Precond``.

    Calls run without autograd unless ``no_grad=False`` (for losses that differentiate through the
    teacher with respect to its input), and the network stays in eval mode (``.train()`` is a no-op).
    The parameters are frozen (``requires_grad`` off), so a loss that differentiates through the teacher's
    features (a GAN term on a teacher-feature critic) builds no gradients on it; the students' copies of
    ``network`` are made trainable where they are built (``train/components.py: build``).
    """

    def __init__(self, net: Precond, shape: Sequence[int], sigma_min: float = 0.002, sigma_max: float = 80.0,
                 meta: dict[str, Any] | None = None, no_grad: bool = True):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data = float(net.sigma_data)
        self.num_classes = int(getattr(net.backbone, "num_classes", 0))
        self.meta: dict[str, Any] = dict(meta or {})
        self.data_spec: str | None = self.meta.get("data")  # where its training points came from
        self.no_grad = no_grad
        self.guidance = 1.0  # classifier-free guidance scale of a conditional teacher (1: none)
        self.class_names: tuple[str, ...] = tuple(self.meta.get("class_names") or ())
        # a text teacher: {"encoder": spec, "length": tokens, "templates": its training captions}
        self.text: dict[str, Any] | None = self.meta.get("text") if isinstance(net.backbone, TextUNet) else None

    @property
    def network(self) -> Precond:
        return self.net

    def train(self, mode: bool = True) -> NetworkTeacher:
        return super().train(False)  # a teacher is frozen; keep eval-mode behaviour whatever the caller does

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """``D(x, sigma, cond)``; with ``guidance`` w != 1 and a condition, classifier-free guidance
        ``D_u + w (D_c - D_u)`` (the unconditional call drops labels to "no label", text to no text)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.no_grad):
            d = self.net(x, sigma, cond)
            if cond is None or self.guidance == 1.0:
                return d
            return torch.lerp(self.net(x, sigma, None), d, self.guidance)


def save_teacher(folder: str | Path, net: Precond, meta: dict[str, Any] | None = None) -> Path:
    """Write ``net`` (a Precond around an MLP, UNet or EDM SongUNet) and ``meta`` (``data``, ``shape``, ``command``,
    ``metrics``, any other JSON-able keys) as a teacher folder; returns the folder.

    Each file is written atomically, weights first, so ``teacher.json`` only ever describes complete
    weights of the run that wrote it."""
    if not isinstance(net.backbone, MLP | UNet | TextUNet | SongUNet):
        raise TypeError("save_teacher stores MLP, UNet, TextUNet and SongUNet backbones; "
                        f"got {type(net.backbone).__name__}")
    folder = Path(folder)
    meta = dict(meta or {})
    reserved = {"format", "version", "arch", "sigma_data"} & meta.keys()
    if reserved:
        raise ValueError(f"meta must not set {sorted(reserved)}: save_teacher derives them from the network")
    b = net.backbone
    shape = [b.dim] if isinstance(b, MLP) else [b.channels, b.resolution, b.resolution]
    doc = {"shape": shape, **meta, "format": FORMAT, "version": VERSION,
           "arch": arch_of(b), "sigma_data": float(net.sigma_data)}
    json.dumps(doc)  # fail on non-JSON meta before touching the folder
    atomic_save_safetensors(folder / WEIGHTS_FILE, net.state_dict(), metadata={"format": FORMAT})
    write_json(folder / META_FILE, doc)
    return folder


def load_teacher(folder: str | Path) -> NetworkTeacher:
    """Read a folder written by ``save_teacher`` (or ``dibregman train-teacher``) onto the CPU."""
    folder = require_files(folder, "teacher", (META_FILE, WEIGHTS_FILE), "train one with `dibregman train-teacher`")
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    doc = _read_meta(meta_path)
    try:
        net = Precond(build_backbone(doc["arch"]), doc["sigma_data"])
    except ValueError as e:
        raise ValueError(f"{str(meta_path)!r}: {e}") from None
    _load_weights(net, weights_path, meta_path)
    return NetworkTeacher(net, doc["shape"], float(doc.get("sigma_min", 0.002)),
                          float(doc.get("sigma_max", 80.0)), meta=doc)


def _read_meta(path: Path) -> dict[str, Any]:
    doc = read_tagged_json(path, FORMAT, "re-create the teacher folder")
    if doc.get("version") != VERSION:
        raise ValueError(f"{str(path)!r} has teacher format version {doc.get('version')!r}; this dibregman "
                         f"reads version {VERSION}: upgrade dibregman or re-create the teacher")
    sd = doc.get("sigma_data")
    if isinstance(sd, bool) or not isinstance(sd, int | float) or not math.isfinite(sd) or sd <= 0:
        raise ValueError(f"{str(path)!r}: sigma_data must be a positive number; got {sd!r}")
    arch = doc.get("arch")
    if not isinstance(arch, dict) or arch.get("kind") not in KINDS:
        kind = arch.get("kind") if isinstance(arch, dict) else arch
        raise ValueError(f"{str(path)!r}: unknown arch kind {kind!r}; this version knows {', '.join(KINDS)}")
    expected = image_shape(arch)
    if expected is not None:
        if doc.get("shape", expected) != expected:
            raise ValueError(f"{str(path)!r}: shape {doc.get('shape')} does not match the network's {expected}")
        return {**doc, "shape": expected}
    shape = doc.get("shape", [arch.get("dim")])
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise ValueError(f"{str(path)!r}: shape must be a list of positive integers; got {shape!r}")
    if math.prod(shape) != arch.get("dim"):
        raise ValueError(f"{str(path)!r}: shape {shape} has {math.prod(shape)} values but arch dim is "
                         f"{arch.get('dim')!r}")
    return {**doc, "shape": shape}


def _load_weights(net: Precond, weights_path: Path, meta_path: Path) -> None:
    from ..train.checkpoint import CheckpointError, load_module

    try:
        load_module(net, weights_path, hint=f"the arch in {META_FILE} describes another network (files copied "
                                            "from different teachers?)")
    except CheckpointError as e:  # a teacher folder is user input: a ValueError, like its other problems
        raise ValueError(f"{e}; re-create the teacher folder") from None
