"""Teachers from a spec string ``<format>:<argument>``: ``gmm:<built-in name or .json/.toml>``, ``net:<teacher
folder>``, ``diffusers:<local diffusers folder>``, ``edm:<EDM network snapshot .pkl>``, ``py:<module>:<function>``
(your own code returns the teacher object), or a format of your own registered in ``TEACHER_FORMATS``."""

from __future__ import annotations

from pathlib import Path

from ..assets import shipped_names
from ..registry import Registry
from .base import (
    Teacher,
    class_names,
    data_spec,
    exact_mixture,
    exact_sampler,
    guidable,
    latent_codec,
    set_guidance,
    take_text_encoder,
    text_spec,
)
from .objects import ModuleTeacher, check_teacher

__all__ = ["TEACHER_FORMATS", "ModuleTeacher", "Teacher", "check_teacher", "class_names", "data_spec", "exact_mixture",
           "exact_sampler", "guidable", "latent_codec", "load_teacher", "set_guidance", "take_text_encoder",
           "text_spec"]


TEACHER_FORMATS = Registry("teacher format")  # the prefix of a spec string, `<format>:<argument>`


def load_teacher(spec: str) -> Teacher:
    """The teacher a spec string names: ``<format>:<argument>`` of a registered format (``TEACHER_FORMATS``),
    or a bare folder made by ``dibregman train-teacher``."""
    kind, _, arg = spec.partition(":")
    if kind == "object":
        raise ValueError(f"{spec!r} names a teacher that was passed to db.distill as a Python object, which a spec "
                         "string cannot rebuild: pass the object again (db.distill(teacher=obj, resume=True), "
                         "db.evaluate_run(run, teacher=obj)), or on the command line --teacher with a spec of "
                         "the same teacher")
    if kind in TEACHER_FORMATS and arg:
        entry = TEACHER_FORMATS.get(kind)
        made = entry.make(arg)
        if not entry.check:
            return made
        try:
            return check_teacher(made)
        except (TypeError, ValueError) as e:
            raise ValueError(f"the teacher {spec} returned: {e}") from None
    if Path(spec).is_dir():  # a bare folder made by `dibregman train-teacher`
        return _net(spec)
    raise ValueError(f"cannot read teacher spec {spec!r}: use {TEACHER_FORMATS.describe(', ')}")


@TEACHER_FORMATS.register("gmm", usage="gmm:<built-in or spec.json/.toml>", help="an analytic Gaussian mixture, "
                          "e.g. gmm:ring8_imbalanced", check=False)
def _gmm(arg: str) -> Teacher:
    from .gmm import get_mixture

    return get_mixture(arg)


@TEACHER_FORMATS.register("net", usage="net:<folder>", help="a folder from dibregman train-teacher, or a shipped "
                          "teacher: " + ", ".join(f"net:{n}" for n in shipped_names("teacher")), check=False)
def _net(arg: str) -> Teacher:
    from ..assets import shipped
    from .trained import load_teacher as load_net

    packaged = None if Path(arg).exists() else shipped(arg, "teacher")  # net:fashion-mnist
    return load_net(packaged or arg)


@TEACHER_FORMATS.register("diffusers", usage="diffusers:<folder>", help="a local diffusers pipeline or model "
                          "folder", check=False)
def _diffusers(arg: str) -> Teacher:
    from .diffusers import load_diffusers_teacher

    return load_diffusers_teacher(arg)


@TEACHER_FORMATS.register("edm", usage="edm:<snapshot.pkl>", help="an EDM network snapshot, converted once into "
                          "<file>.teacher beside it and read safely", check=False)
def _edm(arg: str) -> Teacher:
    from .edm import load_edm_teacher

    return load_edm_teacher(arg)


@TEACHER_FORMATS.register("py", usage="py:<module>:<function>", help="your function, called with no arguments, "
                          "returns a teacher object")
def _py(arg: str) -> Teacher:
    from ..plugins import load_callable

    return load_callable(f"py:{arg}", "a function that returns a teacher")()
