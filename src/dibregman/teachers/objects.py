"""Teachers handed over as Python objects: the contract checked once at the edge (``check_teacher``), a wrapper
that makes a plain module or function a teacher (``ModuleTeacher``), and the label a run records for one
(``object_spec``), since an object cannot be rebuilt from a spec string."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..precond import Precond
from .base import Teacher

Tensor = torch.Tensor

OBJECT_PREFIX = "object:"  # the `teacher` a run records for an object: object:<name>
PREDICTIONS = ("x0", "eps")


class ModuleTeacher(nn.Module):
    """Any denoiser as a teacher, in the variance-exploding convention ``x_sigma = x0 + sigma n``.

    ``fn(x, sigma, cond)`` (an ``nn.Module`` or a plain function; ``x`` is ``[B, *shape]``, ``sigma`` is
    ``[B]``, ``cond`` is ``None`` or ``[B]`` integer labels) predicts the clean sample (``prediction="x0"``,
    EDM's ``D``) or the noise (``"eps"``: ``D = x - sigma eps``); a plain function must follow ``x``'s device
    and dtype (``.to()`` moves modules only: write ``mu.to(x)`` for a tensor it closes over). ``network`` is
    what the students start
    from: a ``dibregman.precond.Precond`` around one of ``dibregman.nets``' backbones (so the student can be
    saved and sampled later); it defaults to ``fn`` when ``fn`` is one. Without it, a point teacher's students
    start from an MLP fitted to its samples; an image teacher needs one. Calls run without autograd and the
    module's parameters are frozen (the students train copies).
    """

    def __init__(self, fn: Callable[..., Tensor], shape: Sequence[int], *, sigma_data: float = 0.5,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, num_classes: int = 0,
                 prediction: str = "x0", network: Precond | None = None):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}")
        if network is None and isinstance(fn, Precond) and prediction == "x0":
            network = fn
        if isinstance(fn, nn.Module):
            fn.eval().requires_grad_(False)
        if network is not None:
            network.eval().requires_grad_(False)
        self.fn, self._network = fn, network  # modules register: .to() moves them, the fingerprint reads them
        self.shape: tuple[int, ...] = tuple(int(s) for s in shape)
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)
        self.num_classes = int(num_classes)
        self.prediction = prediction
        self.name = getattr(fn, "__name__", type(fn).__name__)

    @property
    def network(self) -> Precond | None:
        return self._network

    def train(self, mode: bool = True) -> ModuleTeacher:
        return super().train(False)  # frozen, as every teacher

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            out = self.fn(x, sigma, cond)
            if self.prediction == "eps":
                out = x - sigma.reshape(-1, *([1] * (x.dim() - 1))) * out
            return out


def _number(obj: Any, name: str) -> float:
    value = getattr(obj, name, None)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise TypeError(f"the teacher's {name} must be a positive finite number; got {value!r}")
    return float(value)


def check_saveable(net: Precond, what: str) -> None:
    """A ``Precond`` the students can be saved from and rebuilt: exactly a ``Precond`` (a subclass's own calls
    would not be), with EDM's coefficients at its ``sigma_data`` (what ``arch`` and ``sigma_data`` rebuild) around
    a backbone registered in ``dibregman.nets.BACKBONES`` whose ``arch()`` is JSON."""
    from ..nets import BACKBONES, registered
    from ..schedules import EDMParameterisation

    if not registered(net.backbone):
        raise TypeError(f"{what} is a Precond around a {type(net.backbone).__name__}; the student is saved by its "
                        "architecture, so the backbone must be registered in dibregman.nets.BACKBONES "
                        f"({', '.join(BACKBONES)}, or one of your own with an arch_kind)")
    if type(net) is not Precond or net.parameterisation != EDMParameterisation(net.sigma_data):
        raise TypeError(f"{what} is a {type(net).__name__} with {net.parameterisation!r}; a saved student is rebuilt "
                        f"as Precond(backbone, sigma_data) with EDM's coefficients, so it must be one (a diffusers "
                        "model's VP or flow convention comes with a diffusers: teacher)")
    try:
        json.dumps(net.backbone.arch())
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what}: its {type(net.backbone).__name__}.arch() must be JSON-able ({e})") from None


def check_teacher(obj: Any) -> Teacher:
    """``obj`` if it meets the teacher contract (``dibregman.teachers.Teacher``), else a ``TypeError`` or
    ``ValueError`` that names the member to fix. One call on two noisy inputs checks what it returns."""
    if isinstance(obj, str):
        raise TypeError(f"a teacher object is expected; got the string {obj!r} (a spec string goes to "
                        "db.load_teacher, or as teacher= to db.distill)")
    if not callable(obj) or not hasattr(obj, "to"):
        raise TypeError(f"a teacher object must be a torch.nn.Module (it is called as D(x, sigma, cond) and moved "
                        f"to the run's device); got {type(obj).__name__}: wrap a function or module with "
                        "dibregman.ModuleTeacher(fn, shape=...)")
    shape = getattr(obj, "shape", None)
    if (not isinstance(shape, tuple | list) or len(shape) not in (1, 3)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise TypeError(f"the teacher's shape must be one sample's shape: (d,) for points or (channels, height, "
                        f"width) for images; got {shape!r}")
    lo, hi, _ = (_number(obj, k) for k in ("sigma_min", "sigma_max", "sigma_data"))
    if lo >= hi:
        raise ValueError(f"the teacher's sigma_min ({lo}) must be below its sigma_max ({hi})")
    classes = getattr(obj, "num_classes", None)
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 0:
        raise TypeError(f"the teacher's num_classes must be an integer >= 0 (0: unconditional); got {classes!r}")
    if not hasattr(obj, "network"):
        raise TypeError("the teacher has no `network` member: set it to None (the students start from a fitted "
                        "MLP; points only) or to a dibregman Precond the students start from")
    net = obj.network
    from .diffusers import DiffusersDenoiser

    if net is not None and not isinstance(net, Precond):
        raise TypeError(f"the teacher's network is a {type(net).__name__}; it must be a dibregman.precond.Precond "
                        "around a backbone of dibregman.nets (so the student can be saved and sampled), or None")
    if isinstance(net, Precond) and not isinstance(net, DiffusersDenoiser):
        check_saveable(net, "the teacher's network")
    if net is None and len(shape) == 3:
        raise ValueError("an image teacher needs a network for the students to start from: pass network=Precond("
                         "backbone, sigma_data) with a backbone of dibregman.nets (e.g. dibregman.nets.unet.UNet)")
    if net is None and classes:
        raise ValueError("a class-conditional teacher needs a network for the students to start from (the MLP "
                         "fitted to a teacher without one is unconditional): pass network=Precond(...)")
    x, sigma, cond = _probe(tuple(shape), lo, hi, classes, obj)
    try:
        out = obj(x, sigma, cond)
    except Exception as e:  # whatever the user's code raises: say where it came from
        raise ValueError(f"calling the teacher on two noisy inputs (shape {tuple(x.shape)}, {x.dtype}, "
                         f"{x.device}) failed: {type(e).__name__}: {e}") from e
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(x.shape):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the teacher returned {got} for inputs of shape {tuple(x.shape)}: D(x, sigma, cond) "
                         "returns its estimate of the clean sample, shaped like x")
    if not torch.isfinite(out).all():
        raise ValueError("the teacher returned NaN or inf on noisy inputs at its sigma_min and sigma_max")
    return obj


def _probe(shape: tuple[int, ...], lo: float, hi: float, classes: int, obj: Any
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Two fixed noisy inputs at the ends of the noise range (the teacher's dtype and device)."""
    like = next((t for t in (*getattr(obj, "parameters", list)(), *getattr(obj, "buffers", list)())
                 if t.is_floating_point()), None)
    dtype, device = (like.dtype, like.device) if like is not None else (torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([hi, lo], dtype=torch.float64)
    x = sigma.reshape(-1, *([1] * len(shape))) * torch.randn((2, *shape), generator=g, dtype=torch.float64)
    cond = torch.zeros(2, dtype=torch.long, device=device) if classes else None
    return x.to(device, dtype), sigma.to(device, dtype), cond


def weights_digest(obj: Any) -> str | None:
    """SHA-256 of a module's state dict, names and bytes in order (a sum would match one with its parts
    permuted); None for an object without one. Persistent tensors only: derived buffers (a mixture's
    factorisations, a cached text embedding) may differ in the last bits between machines. The same on every
    device."""
    state = obj.state_dict() if isinstance(obj, nn.Module) else {}
    if not state:
        return None
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(str((name, t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(obj: Any) -> str:
    """12 hex digits that change when the teacher does: of its weights and buffers where it has any, else of
    its answers on fixed inputs (a function teacher: an edit of its code changes them). A function beside a
    ``network`` (``ModuleTeacher(fn, network=...)``) is fingerprinted by the network alone."""
    digest = weights_digest(obj)
    if digest is None:
        x, sigma, cond = _probe(tuple(obj.shape), float(obj.sigma_min), float(obj.sigma_max), obj.num_classes, obj)
        with torch.no_grad():
            digest = hashlib.sha256(obj(x, sigma, cond).detach().cpu().double().contiguous().numpy().tobytes())
        digest = digest.hexdigest()
    return digest[:12]


def object_spec(obj: Any) -> str:
    """What a run records as its ``teacher`` for an object: ``object:<name>`` (its function's or class's name;
    the checkpoints record its fingerprint)."""
    name = obj.name if isinstance(obj, ModuleTeacher) else type(obj).__qualname__
    return f"{OBJECT_PREFIX}{name}"
