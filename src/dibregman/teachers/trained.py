"""Teachers we trained ourselves: an EDM-preconditioned MLP or U-Net, or a diffusers transformer under its own
flow-matching conventions (a latent teacher, with its VAE), saved as a folder.

Folder format (version 1)::

    model.safetensors   the network's state dict (EMA weights), float32 (or float16, loaded as float32); keys
                        "backbone.<...>"
    teacher.json        {"format": "dibregman-teacher", "version": 1,
                         "arch": {"kind": "mlp" | "unet" | "text_unet" | "edm_songunet", <constructor arguments>}
                                 or a DiffusersDenoiser's arch (kind "diffusers": model and scheduler configs),
                         "sigma_data": float, "shape": [d], "data": str,
                         "command": str (optional), "metrics": {...} (optional),
                         "sigma_min", "sigma_max": float (optional, default 0.002 and 80)}
    vae/                a latent teacher's AutoencoderKL (save_pretrained) with its own manifest.json, whose
                        SHA-256 teacher.json records ("vae_manifest_sha256"): the teacher denoises its scaled
                        latents, and images are its decodes (teachers/latent.py)

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
from ..nets import BACKBONES, arch_of, build_backbone, image_shape
from ..nets.text_unet import TextUNet
from ..precond import Precond
from .diffusers import ARCH_KIND, DiffusersDenoiser, DiffusersTeacher
from .latent import VAE_FOLDER, LatentCodec, load_pinned_vae, save_pinned_vae
from .objects import check_saveable

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


def save_teacher(folder: str | Path, net: Precond | DiffusersDenoiser, meta: dict[str, Any] | None = None,
                 codec: LatentCodec | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``net`` (a Precond around a backbone of ``dibregman.nets.BACKBONES``, or a ``DiffusersDenoiser``) and
    ``meta`` (``data``, ``shape``, ``command``, ``metrics``, any other JSON-able keys) as a teacher folder, with
    ``codec``'s VAE in ``vae/`` when ``net`` denoises its latents; returns the folder. ``dtype``: of the stored
    floating-point weights (``torch.float16`` halves a shipped folder; loading always gives float32).

    Each file is written atomically, the VAE and weights first, so ``teacher.json`` only ever describes complete
    weights of the run that wrote it."""
    diffusers_net = isinstance(net, DiffusersDenoiser)
    if not diffusers_net:
        check_saveable(net, "save_teacher's network")
    if codec is not None and not diffusers_net:
        raise TypeError("a VAE is saved with a latent teacher, whose network is a DiffusersDenoiser")
    folder = Path(folder)
    meta = dict(meta or {})
    reserved = {"format", "version", "arch", "sigma_data"} & meta.keys()
    if reserved:
        raise ValueError(f"meta must not set {sorted(reserved)}: save_teacher derives them from the network")
    b = net.backbone
    if diffusers_net:
        shape, arch = list(net.shape), net.arch()
    else:
        arch = arch_of(b)
        shape = image_shape(arch) or ([int(arch["dim"])] if "dim" in arch else meta.get("shape"))
        if not isinstance(shape, list):
            raise ValueError(f"the shape of a {type(b).__name__}'s samples is neither in its arch (dim, or the "
                             "image_shape of its BACKBONES entry) nor given: pass meta={'shape': [...]}")
    doc = {"shape": shape, **meta, "format": FORMAT, "version": VERSION, "arch": arch,
           "sigma_data": float(net.sigma_data)}
    json.dumps(doc)  # fail on non-JSON meta before touching the folder
    if codec is not None:
        doc["vae_manifest_sha256"] = save_pinned_vae(codec, folder, dtype)  # teacher.json pins its VAE
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    atomic_save_safetensors(folder / WEIGHTS_FILE, state, metadata={"format": FORMAT})
    write_json(folder / META_FILE, doc)
    return folder


def load_teacher(folder: str | Path) -> NetworkTeacher:
    """Read a folder written by ``save_teacher`` (or ``dibregman train-teacher``) onto the CPU."""
    folder = require_files(folder, "teacher", (META_FILE, WEIGHTS_FILE), "train one with `dibregman train-teacher`")
    meta_path, weights_path = folder / META_FILE, folder / WEIGHTS_FILE
    doc = _read_meta(meta_path)
    if doc["arch"]["kind"] == ARCH_KIND:
        return _load_diffusers_teacher(folder, doc)
    try:
        net = Precond(build_backbone(doc["arch"]), doc["sigma_data"])
    except ValueError as e:
        raise ValueError(f"{str(meta_path)!r}: {e}") from None
    _load_weights(net, weights_path, meta_path)
    return NetworkTeacher(net, doc["shape"], float(doc.get("sigma_min", 0.002)),
                          float(doc.get("sigma_max", 80.0)), meta=doc)


def _load_diffusers_teacher(folder: Path, doc: dict[str, Any]) -> DiffusersTeacher:
    """A trained diffusers-model teacher: its network rebuilt from the arch, its VAE from ``vae/`` (if any), its
    text encoder from the spec it records, so the unconditional input is the empty prompt's (as it was trained)."""
    import diffusers

    meta_path = folder / META_FILE
    arch = doc["arch"]
    try:
        net = DiffusersDenoiser.from_arch(arch, doc["sigma_data"])
    except ValueError as e:
        raise ValueError(f"{str(meta_path)!r}: {e}") from None
    _load_weights(net, folder / WEIGHTS_FILE, meta_path)
    codec = None
    if "vae_manifest_sha256" in doc or (folder / VAE_FOLDER).exists():
        from ..integrity import CheckpointError

        try:
            codec = load_pinned_vae(folder / VAE_FOLDER, doc.get("vae_manifest_sha256"), "this teacher", META_FILE)
        except CheckpointError as e:
            raise ValueError(f"{e}; re-create the teacher folder") from None
    encoder = None
    if net.backbone.text:
        from ..text import load_text_encoder

        text = doc.get("text")
        if not isinstance(text, dict) or not isinstance(text.get("encoder"), str):
            raise ValueError(f"{str(meta_path)!r}: a text-conditional network needs its key 'text' with the encoder "
                             "spec it was trained with; re-create the teacher folder")
        encoder = load_text_encoder(text["encoder"], text.get("length"))
    scheduler = getattr(diffusers, arch["scheduler_class"]).from_config(arch["scheduler_config"])
    meta = {"sigma_min": 0.002, "sigma_max": 80.0, **doc}  # sampled on EDM's range, as our other teachers
    teacher = DiffusersTeacher(net.unet, scheduler, doc["sigma_data"], source=str(folder), text_encoder=encoder,
                               codec=codec, options=arch.get("options"), meta=meta)
    if list(teacher.shape) != doc["shape"]:
        raise ValueError(f"{str(meta_path)!r}: shape {doc['shape']} is not the network's {list(teacher.shape)}")
    return teacher


def _read_meta(path: Path) -> dict[str, Any]:
    doc = read_tagged_json(path, FORMAT, "re-create the teacher folder")
    if doc.get("version") != VERSION:
        raise ValueError(f"{str(path)!r} has teacher format version {doc.get('version')!r}; this dibregman "
                         f"reads version {VERSION}: upgrade dibregman or re-create the teacher")
    sd = doc.get("sigma_data")
    if isinstance(sd, bool) or not isinstance(sd, int | float) or not math.isfinite(sd) or sd <= 0:
        raise ValueError(f"{str(path)!r}: sigma_data must be a positive number; got {sd!r}")
    arch = doc.get("arch")
    if not isinstance(arch, dict) or not (arch.get("kind") in BACKBONES or arch.get("kind") == ARCH_KIND):
        kind = arch.get("kind") if isinstance(arch, dict) else arch
        raise ValueError(f"{str(path)!r}: unknown arch kind {kind!r}; this version knows {', '.join(BACKBONES)}, "
                         f"{ARCH_KIND} (a backbone of your own: register it in dibregman.nets.BACKBONES first)")
    if arch["kind"] == ARCH_KIND:
        shape = doc.get("shape")
        if not isinstance(shape, list) or len(shape) != 3:
            raise ValueError(f"{str(path)!r}: a diffusers network's shape must be [C, H, W]; got {shape!r}")
        return doc
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
    from ..integrity import CheckpointError, load_module

    try:
        load_module(net, weights_path, hint=f"the arch in {META_FILE} describes another network (files copied "
                                            "from different teachers?)")
    except CheckpointError as e:  # a teacher folder is user input: a ValueError, like its other problems
        raise ValueError(f"{e}; re-create the teacher folder") from None
