"""Teachers from a spec string: ``gmm:<built-in name or .json/.toml>``, ``net:<teacher folder>``,
``diffusers:<local diffusers folder>``, ``edm:<EDM network snapshot .pkl>`` or ``py:<module>:<function>`` (your
own code returns the teacher object)."""

from __future__ import annotations

from pathlib import Path

from .base import Teacher, exact_mixture, latent_codec
from .objects import ModuleTeacher, check_teacher

__all__ = ["ModuleTeacher", "Teacher", "check_teacher", "exact_mixture", "latent_codec", "load_teacher"]


def load_teacher(spec: str) -> Teacher:
    kind, _, arg = spec.partition(":")
    if kind == "gmm" and arg:
        from .gmm import get_mixture

        return get_mixture(arg)
    if kind == "net" and arg:
        from ..assets import shipped
        from .trained import load_teacher as load_net

        packaged = None if Path(arg).exists() else shipped(arg, "teacher")  # net:fashion-mnist
        return load_net(packaged or arg)
    if kind == "diffusers" and arg:
        from .diffusers import load_diffusers_teacher

        return load_diffusers_teacher(arg)
    if kind == "edm" and arg:  # converted once into <file>.teacher beside the pickle, read safely
        from .edm import load_edm_teacher

        return load_edm_teacher(arg)
    if kind == "py" and arg:  # your own code builds it: py:<module>:<function>, called with no arguments
        from ..plugins import load_callable

        made = load_callable(spec, "a function that returns a teacher")()
        try:
            return check_teacher(made)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the teacher {spec} returned: {e}") from None
    if kind == "object":
        raise ValueError(f"{spec!r} names a teacher that was passed to db.distill as a Python object, which a spec "
                         "string cannot rebuild: pass the object again (db.distill(teacher=obj, resume=True), "
                         "db.evaluate_run(run, teacher=obj)), or on the command line --teacher with a spec of "
                         "the same teacher")
    if Path(spec).is_dir():  # a bare folder made by `dibregman train-teacher`
        from .trained import load_teacher as load_net

        return load_net(spec)
    raise ValueError(f"cannot read teacher spec {spec!r}: use 'gmm:<built-in or file.json>' (e.g. "
                     "gmm:ring8_imbalanced), 'net:<folder written by dibregman train-teacher>', "
                     "'diffusers:<local folder with a UNet2DModel and its scheduler config>', "
                     "'edm:<EDM network-snapshot .pkl>' or 'py:<module>:<function returning a teacher>'")
