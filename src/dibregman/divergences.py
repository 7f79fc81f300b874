"""The Bregman / f-divergence family (docs/divergences.md).

Every member is a convex ``h`` on the density ratio ``r = q/p`` (student over teacher). The generator
only needs the weight ``omega(r) = h''(r) r``, which each member gives exactly in log space (it is fed
``log r``, never ``r``, so no member can overflow). The critic needs ``h`` and ``h'`` for the Bregman
density-ratio losses. A user's own ``h`` (any convex callable on tensors) works too: ``h'`` and ``h''``
come from autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .registry import Registry

Tensor = torch.Tensor
Fn = Callable[[Tensor], Tensor]

# Ratio models are exp(s); past |s| = 30 the generic DRE terms would only produce overflow.
_S_CLAMP = 30.0


@dataclass(frozen=True)
class Divergence:
    """One member of the family. ``h`` and ``h_prime`` act on ``r``; ``log_omega`` on ``log r``."""

    name: str
    h: Fn
    h_prime: Fn
    log_omega: Fn
    # Optional numerically stable DRE terms in s = log r_hat (the logistic loss is the example).
    dre_p: Fn | None = None
    dre_q: Fn | None = None

    def omega(self, log_r: Tensor) -> Tensor:
        """``h''(r) r``, the per-sample generator weight (no gradient flows through it)."""
        return self.log_omega(log_r).exp()

    def bregman(self, r: Tensor) -> Tensor:
        """Pointwise ``h(r) - h(1) - h'(1)(r - 1)``: nonnegative, zero exactly at ``r = 1``."""
        one = torch.ones_like(r)
        return self.h(r) - self.h(one) - self.h_prime(one) * (r - 1)

    def dre_loss(self, s_p: Tensor, s_q: Tensor) -> Tensor:
        """Per-sample Bregman density-ratio loss for a ratio model ``r_hat = exp(s)`` (section 5):
        ``h'(r) r - h(r)`` on teacher samples plus ``-h'(r)`` on student samples. Minimised at
        ``r_hat = q/p``. Batches of equal size; returns ``[B]``."""
        if self.dre_p is not None and self.dre_q is not None:
            return self.dre_p(s_p) + self.dre_q(s_q)
        r_p = s_p.clamp(-_S_CLAMP, _S_CLAMP).exp()
        r_q = s_q.clamp(-_S_CLAMP, _S_CLAMP).exp()
        return self.h_prime(r_p) * r_p - self.h(r_p) - self.h_prime(r_q)


# --- the registered members -------------------------------------------------------------------------


def reverse_kl() -> Divergence:
    return Divergence(
        "reverse_kl",
        h=lambda r: r * r.log(),
        h_prime=lambda r: r.log() + 1,
        log_omega=torch.zeros_like,
    )


def forward_kl() -> Divergence:
    return Divergence("forward_kl", h=lambda r: -r.log(), h_prime=lambda r: -1 / r, log_omega=torch.neg)


def pearson() -> Divergence:
    return Divergence("pearson", h=lambda r: (r - 1) ** 2 / 2, h_prime=lambda r: r - 1, log_omega=lambda s: s)


def logistic() -> Divergence:
    return Divergence(
        "logistic",
        h=lambda r: r * r.log() - (1 + r) * torch.log1p(r),
        h_prime=lambda r: r.log() - torch.log1p(r),
        log_omega=lambda s: -F.softplus(s),
        dre_p=F.softplus,
        dre_q=lambda s: F.softplus(-s),
    )


def power(alpha: float = 0.5) -> Divergence:
    a = float(alpha)
    if a == 0 or a <= -1:
        raise ValueError(f"power divergence needs alpha > -1 and alpha != 0 (alpha -> 0 is reverse_kl); got {a}")
    return Divergence(
        f"power:{a:g}",
        h=lambda r: (r ** (1 + a) - r) / a,
        h_prime=lambda r: ((1 + a) * r**a - 1) / a,
        log_omega=lambda s: math.log1p(a) + a * s,
    )


def hellinger() -> Divergence:
    return Divergence(
        "hellinger",
        h=lambda r: (r.sqrt() - 1) ** 2,
        h_prime=lambda r: 1 - r.rsqrt(),
        log_omega=lambda s: -s / 2 - math.log(2.0),
    )


def jeffreys() -> Divergence:
    return Divergence(
        "jeffreys",
        h=lambda r: (r - 1) * r.log(),
        h_prime=lambda r: r.log() + 1 - 1 / r,
        log_omega=lambda s: F.softplus(-s),
    )


def softened_rkl() -> Divergence:
    return Divergence(
        "softened_rkl",
        h=lambda r: (1 + r) * ((1 + r) / 2).log(),
        h_prime=lambda r: ((1 + r) / 2).log() + 1,
        log_omega=lambda s: -F.softplus(-s),
    )


DIVERGENCES = Registry("divergence")  # named members; a parameter (power's alpha) is given as name:value
for _name, _make, _help in (
        ("reverse_kl", reverse_kl, "h = r log r, DMD's"), ("forward_kl", forward_kl, "h = -log r"),
        ("pearson", pearson, "h = (r - 1)^2 / 2"), ("logistic", logistic, "h = r log r - (1 + r) log(1 + r)"),
        ("hellinger", hellinger, "h = (sqrt r - 1)^2"), ("jeffreys", jeffreys, "h = (r - 1) log r"),
        ("softened_rkl", softened_rkl, "h = (1 + r) log((1 + r) / 2)")):
    DIVERGENCES.register(_name, _make, help=_help, check=False)
DIVERGENCES.register("power", power, usage="power:<alpha>", help="h = (r^(1+alpha) - r) / alpha, alpha > -1 and != 0",
                     check=False, param="alpha")


def from_h(h: Fn, name: str = "custom", h_prime: Fn | None = None, h_second: Fn | None = None) -> Divergence:
    """A member from the user's own convex ``h``; ``h'`` and ``h''`` by autograd when not given."""

    def grad_of(fn: Fn) -> Fn:
        def d(r: Tensor) -> Tensor:
            with torch.enable_grad():
                # Differentiate through ``r`` itself when it carries a graph (h'' = d h'/dr, and a
                # critic trained on a custom h needs the gradient of h'(r_hat)); detaching it there
                # would cut that graph.
                x = r if r.requires_grad else r.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=r.requires_grad)
            return g

        return d

    hp = h_prime or grad_of(h)
    hpp = h_second or grad_of(hp)

    def log_omega(log_r: Tensor) -> Tensor:
        r = log_r.clamp(-_S_CLAMP, _S_CLAMP).exp()
        w = hpp(r) * r
        if bool((w < 0).any()):
            raise ValueError(f"divergence {name!r}: h''(r) < 0 somewhere, so h is not convex")
        return w.log()

    return Divergence(name, h=h, h_prime=hp, log_omega=log_omega)


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """``"power:0.5"`` -> ``("power", {"alpha": 0.5})``; a plain name has no parameters."""
    name, _, arg = spec.partition(":")
    if not arg:
        return name, {}
    try:
        alpha = float(arg)
    except ValueError:
        raise ValueError(f"divergence parameter in {spec!r} must be a number, e.g. 'power:0.5'") from None
    if not math.isfinite(alpha):
        raise ValueError(f"the parameter of {spec!r} must be a finite number, e.g. 'power:0.5'")
    return name, {"alpha": alpha}


def get_divergence(spec: str | Divergence | Fn) -> Divergence:
    """A registered name (``"forward_kl"``, ``"power:0.5"``), a ``Divergence``, or a convex callable ``h``."""
    if isinstance(spec, Divergence):
        return spec
    if callable(spec):
        return from_h(spec, name=getattr(spec, "__name__", "custom"))
    name, params = parse_spec(spec)
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {spec!r}; choose one of {', '.join(DIVERGENCES)} "
                         "(power takes a parameter: 'power:0.5'), or your own convex h as py:<module>:<function> "
                         "(in Python, a callable h works too)")
    entry = DIVERGENCES.get(name)
    param = entry.meta.get("param")
    if params and not param:
        raise ValueError(f"divergence {name!r} takes no parameter; got {spec!r}")
    made = entry.make(**({param: params["alpha"]} if params else {}))
    if not isinstance(made, Divergence):
        raise TypeError(f"divergence {name!r} made a {type(made).__name__}, not a dibregman Divergence (from_h makes "
                        "one of a convex h)")
    return made


def names() -> list[str]:
    return list(DIVERGENCES)
