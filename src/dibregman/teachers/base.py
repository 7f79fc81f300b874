"""What every teacher offers the distillation code, whatever it was built from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from ..precond import Precond

Tensor = torch.Tensor


@runtime_checkable
class Teacher(Protocol):
    """A frozen denoiser in the EDM convention.

    ``shape`` is one sample's shape; ``num_classes`` is 0 for an unconditional teacher. ``network`` is
    the trainable denoiser the students start from: a ``Precond`` (a diffusers teacher's ``DiffusersDenoiser``
    is one); ``None`` for an analytic teacher, which has none.

    Optional capabilities, each read through its function below: an exact sampler
    (``sample``, ``exact_sampler``), an exact density (``exact_mixture``), the data it was trained on
    (``data_spec``, ``data_spec``), a guidance scale (``guidance``, ``guidable``), text conditions (``text``
    and ``class_names``, ``text_spec``, ``class_names``) and a VAE for latents (``codec``, ``latent_codec``).
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


def exact_sampler(teacher: Any) -> Callable[..., Tensor] | None:
    """``teacher.sample(n, generator=...)`` if the teacher draws exact samples of its law (analytic ones), else
    None: its samples then come from its 35-NFE sampler, and its data from ``data_spec``."""
    sample = getattr(teacher, "sample", None)
    return sample if callable(sample) else None


def data_spec(teacher: Any) -> str | None:
    """The ``--data`` spec the teacher was trained on (its held-out split is the evaluation reference), or None."""
    return getattr(teacher, "data_spec", None) or None


def guidable(teacher: Any) -> bool:
    """Whether the teacher takes a classifier-free guidance scale (``guidance``, 1 = none): class- or
    text-conditional network teachers."""
    try:
        teacher.guidance  # noqa: B018 (a property may refuse: a diffusers teacher without text)
    except AttributeError:
        return False
    return True


def set_guidance(teacher: Any, scale: float) -> None:
    """Guide the teacher at ``scale``; also 1 where it is guidable, since a teacher object may come from a run
    with another scale. A ``ValueError`` when ``scale != 1`` and it cannot be guided."""
    if scale != 1.0 and not (guidable(teacher) and (teacher.num_classes or text_spec(teacher))):
        raise ValueError(f"guidance = {scale}: this teacher takes no guidance scale (teachers trained here that are "
                         "class- or text-conditional do, and diffusers text pipelines); leave it at 1")
    if guidable(teacher):
        teacher.guidance = float(scale)


def text_spec(teacher: Any) -> dict[str, Any] | None:
    """A text-conditional teacher's ``text`` (its encoder spec, token length, caption templates), else None."""
    return getattr(teacher, "text", None) or None


def take_text_encoder(teacher: Any) -> Any:
    """The text encoder a teacher loaded to build itself (its ``loaded_text_encoder``), handed over once: a run
    encodes its prompts with it instead of loading the encoder (CLIP, T5: seconds and gigabytes) a second
    time; the teacher drops its reference, so the encoder is freed once the prompts are encoded. ``None``
    when there is none (or it was taken)."""
    encoder = getattr(teacher, "loaded_text_encoder", None)
    if encoder is not None:
        teacher.__dict__["loaded_text_encoder"] = None
    return encoder


def class_names(teacher: Any) -> tuple[str, ...]:
    """The names of the teacher's classes (the words its captions use), or ``()``."""
    return tuple(getattr(teacher, "class_names", ()) or ())
