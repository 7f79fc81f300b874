"""What every teacher offers the distillation code, whatever it was built from."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..precond import Precond

Tensor = torch.Tensor


@runtime_checkable
class Teacher(Protocol):
    """A frozen denoiser in the EDM convention.

    ``shape`` is one sample's shape; ``num_classes`` is 0 for an unconditional teacher. ``network`` is
    the trainable denoiser the students start from: a ``Precond``, or a module with its interface (a
    diffusers teacher's ``DiffusersDenoiser``); ``None`` for an analytic teacher, which has none.
    """

    shape: tuple[int, ...]
    sigma_min: float
    sigma_max: float
    sigma_data: float
    num_classes: int

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor: ...

    @property
    def network(self) -> Precond | None: ...


MIXTURE_MEMBERS = ("log_prob", "assign", "mahalanobis2", "weights", "num_components")


def exact_mixture(teacher: Any) -> Any:
    """``teacher`` if it is an analytic mixture with every member the exact metrics and diagnostics read
    (``log_prob``, ``assign``, ``mahalanobis2``, ``weights``, ``num_components``), else None."""
    return teacher if all(hasattr(teacher, m) for m in MIXTURE_MEMBERS) else None


def latent_codec(teacher: Any) -> Any:
    """The teacher's VAE if it denoises latents (``codec`` with ``encode``, ``decode``, ``image_shape``), else
    None: a latent teacher's samples are decoded wherever images are shown or measured."""
    codec = getattr(teacher, "codec", None)
    return codec if codec is not None and all(hasattr(codec, m) for m in ("encode", "decode", "image_shape")) \
        else None
