"""What every teacher offers the distillation code, whatever it was built from."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

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
