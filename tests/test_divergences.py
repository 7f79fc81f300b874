"""The divergence family against its definitions (METHOD.md section 4).

``h`` is written out again here from the spec's table, independently of the library, and every weight
``omega(log r)`` is checked against ``h''(r) r`` obtained by double backward through that ``h``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dibregman import divergences as dv

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64

# --- the spec's table, written independently ------------------------------------------------------

POWER_ALPHAS = (-0.5, 0.5, 2.0)


def _power_h(a: float):
    return lambda r: (r ** (1 + a) - r) / a


def _power_log_omega(a: float):
    return lambda s: math.log(1 + a) + a * s


SPEC_H = {
    "reverse_kl": lambda r: r * torch.log(r),
    "forward_kl": lambda r: -torch.log(r),
    "pearson": lambda r: (r - 1) ** 2 / 2,
    "logistic": lambda r: r * torch.log(r) - (1 + r) * torch.log(1 + r),
    "hellinger": lambda r: (torch.sqrt(r) - 1) ** 2,
    "jeffreys": lambda r: (r - 1) * torch.log(r),
    "softened_rkl": lambda r: (1 + r) * torch.log((1 + r) / 2),
    **{f"power:{a:g}": _power_h(a) for a in POWER_ALPHAS},
}

# log omega in closed form, from the table's omega column (numpy, log space).
SPEC_LOG_OMEGA = {
    "reverse_kl": lambda s: np.zeros_like(s),
    "forward_kl": lambda s: -s,
    "pearson": lambda s: s,
    "logistic": lambda s: -np.logaddexp(0.0, s),
    "hellinger": lambda s: -s / 2 - math.log(2.0),
    "jeffreys": lambda s: np.logaddexp(0.0, -s),
    "softened_rkl": lambda s: s - np.logaddexp(0.0, s),
    **{f"power:{a:g}": _power_log_omega(a) for a in POWER_ALPHAS},
}

REGISTERED = sorted(SPEC_H)


def _rlogr(r):  # a plain callable, as a user would write it
    return r * r.log()


def _cubic(r):
    return r**3 - 1


def _cosh_log(r):
    # cosh(log r), written as (r + 1/r)/2: autograd through cosh(log r) itself cancels catastrophically
    # (h'' = (cosh - sinh)(log r) / r^2), a property of that expression, not of the library.
    return (r + 1 / r) / 2


# Custom members (h by user, h' and h'' by autograd inside the library) with their exact omega.
CUSTOM = {
    "rlogr": (_rlogr, lambda r: np.ones_like(r)),
    "cubic": (_cubic, lambda r: 6 * r**2),
    "cosh_log": (_cosh_log, lambda r: r**-2.0),
}


def member(name: str) -> dv.Divergence:
    if name in CUSTOM:
        return dv.from_h(CUSTOM[name][0], name=name)
    return dv.get_divergence(name)


ALL = REGISTERED + sorted(CUSTOM)
R_GRID = torch.logspace(-3, 3, 121, dtype=F64)


def _autograd_omega(h, r: torch.Tensor) -> torch.Tensor:
    x = r.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(h(x).sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad(g.sum(), x)
    return g2 * r


def test_registry_covers_the_spec_table():
    assert set(dv.names()) == {"reverse_kl", "forward_kl", "pearson", "logistic", "power", "hellinger",
                               "jeffreys", "softened_rkl"}
    assert dv.get_divergence("power").name == "power:0.5"  # documented default alpha


@pytest.mark.parametrize("name", REGISTERED)
def test_h_matches_spec_table(name):
    d = member(name)
    torch.testing.assert_close(d.h(R_GRID), SPEC_H[name](R_GRID), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_h_prime_is_derivative_of_h(name):
    d = member(name)
    x = R_GRID.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(d.h(x).sum(), x)
    torch.testing.assert_close(d.h_prime(R_GRID), g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_omega_is_h_second_times_r(name):
    """omega(log r) == h''(r) r, with h'' by double backward through the spec's (or user's) h."""
    d = member(name)
    h = CUSTOM[name][0] if name in CUSTOM else SPEC_H[name]
    expected = _autograd_omega(h, R_GRID)
    torch.testing.assert_close(d.omega(R_GRID.log()), expected, rtol=1e-6, atol=0)
    if name in CUSTOM:  # and against the user's h'' in closed form
        exact = torch.from_numpy(CUSTOM[name][1](R_GRID.numpy()))
        torch.testing.assert_close(d.omega(R_GRID.log()), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", REGISTERED)
def test_log_omega_exact_in_log_space(name):
    """Registered members give log omega exactly out to |log r| = 80 (no overflow, no underflow)."""
    s = np.linspace(-80, 80, 321)
    got = member(name).log_omega(torch.from_numpy(s)).numpy()
    # atol 1e-8 in log space = relative 1e-8 on omega (torch's softplus switches to x past 20: 2e-9 off).
    np.testing.assert_allclose(got, SPEC_LOG_OMEGA[name](s), rtol=0, atol=1e-8)
    # float32 too, where |log omega| <= 80 fits: finite everywhere on [-40, 40].
    s32 = torch.linspace(-40, 40, 161)
    w32 = member(name).omega(s32)
    assert w32.dtype == torch.float32 and torch.isfinite(w32).all() and (w32 > 0).all()


@pytest.mark.parametrize("name", ALL)
def test_omega_finite_far_out(name):
    s = torch.linspace(-80, 80, 321, dtype=F64)
    w = member(name).omega(s)
    assert torch.isfinite(w).all() and (w > 0).all()


@pytest.mark.parametrize("name", ALL)
def test_bregman_nonnegative_zero_only_at_one(name):
    d = member(name)
    b = d.bregman(R_GRID)
    assert (b >= 0).all()
    assert d.bregman(torch.ones(3, dtype=F64)).abs().max() == 0
    away = (R_GRID.log().abs() > 0.05)
    assert (b[away] > 0).all()
    # It is convex's tangent gap: equals h(r) - h(1) - h'(1)(r - 1) with the spec's h.
    if name in SPEC_H:
        h, one = SPEC_H[name], torch.ones(1, dtype=F64)
        x = one.clone().requires_grad_(True)
        (hp1,) = torch.autograd.grad(h(x).sum(), x)
        torch.testing.assert_close(b, h(R_GRID) - h(one) - hp1 * (R_GRID - 1), rtol=1e-9, atol=1e-12)


def test_callable_goes_through_from_h():
    d = dv.get_divergence(_rlogr)
    assert d.name == "_rlogr"
    torch.testing.assert_close(d.omega(torch.linspace(-5, 5, 11, dtype=F64)), torch.ones(11, dtype=F64))
    assert dv.get_divergence(d) is d


def test_from_h_with_given_derivatives_is_used():
    d = dv.from_h(_cubic, h_prime=lambda r: 3 * r**2, h_second=lambda r: 6 * r)
    s = torch.linspace(-3, 3, 7, dtype=F64)
    torch.testing.assert_close(d.omega(s), 6 * s.exp() ** 2)


def test_from_h_rejects_concave():
    d = dv.from_h(lambda r: -(r**2), name="concave")
    with pytest.raises(ValueError, match="not convex"):
        d.omega(torch.zeros(4, dtype=F64))


def test_get_divergence_errors_and_parsing():
    with pytest.raises(ValueError) as e:
        dv.get_divergence("kl")
    for n in dv.names():
        assert n in str(e.value)
    d = dv.get_divergence("power:0.5")
    assert d.name == "power:0.5"
    s = torch.tensor([-1.0, 0.0, 2.0], dtype=F64)
    torch.testing.assert_close(d.omega(s), 1.5 * (0.5 * s).exp())
    assert dv.get_divergence("power:-0.5").name == "power:-0.5"
    assert dv.parse_spec("power:2") == ("power", {"alpha": 2.0})
    assert dv.parse_spec("pearson") == ("pearson", {})
    for bad in ("power:abc", "power:0", "power:-1", "power:-2", "pearson:0.5", "reverse_kl:1"):
        with pytest.raises(ValueError):
            dv.get_divergence(bad)


# --- density-ratio estimation losses ---------------------------------------------------------------

RATIOS = [(0.3, 0.7), (0.9, 0.05), (0.02, 0.6), (0.5, 0.5), (1e-3, 2e-3)]


def _expected_dre(d: dv.Divergence, p: float, q: float, s: torch.Tensor) -> torch.Tensor:
    """``p * term_p(s) + q * term_q(s)`` up to a constant; ``dre_loss(a, b) = term_p(a) + term_q(b)``."""
    c = torch.zeros_like(s)
    return p * d.dre_loss(s, c) + q * d.dre_loss(c, s)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("p", "q"), RATIOS)
def test_dre_loss_minimised_at_log_q_over_p(name, p, q):
    """The pointwise expected DRE loss has its unique minimum at s = log(q/p)."""
    d = member(name)
    s_star = math.log(q / p)
    # derivative zero at s*, positive curvature (by autograd: custom members differentiate through h').
    s = torch.tensor([s_star], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(_expected_dre(d, p, q, s).sum(), s, create_graph=True)
    (g2,) = torch.autograd.grad(g.sum(), s)
    assert abs(g.item()) < 1e-9 * max(p, q) * max(1.0, g2.abs().item()), (g.item(), g2.item())
    assert g2.item() > 0
    # and a scan: the grid minimiser is the grid point nearest s*.
    grid = torch.linspace(s_star - 3, s_star + 3, 601, dtype=F64)
    vals = _expected_dre(d, p, q, grid)
    assert abs(grid[vals.argmin()].item() - s_star) <= 0.5 * (grid[1] - grid[0]).item() + 1e-12


def test_dre_closed_forms():
    """The generic Bregman DRE term gives the named estimators of METHOD.md section 5 exactly."""
    g = torch.Generator().manual_seed(0)
    s_p, s_q = torch.randn(64, generator=g, dtype=F64) * 2, torch.randn(64, generator=g, dtype=F64) * 2
    r_p, r_q = s_p.exp(), s_q.exp()
    l_p, l_q = -s_p, -s_q  # logits: "from p"
    sp = torch.nn.functional.softplus
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # noqa: E731
    close(dv.get_divergence("logistic").dre_loss(s_p, s_q), sp(-l_p) + sp(l_q))
    close(dv.get_divergence("reverse_kl").dre_loss(s_p, s_q), r_p - s_q - 1)  # KLIEP / UKL
    close(dv.get_divergence("pearson").dre_loss(s_p, s_q), (r_p**2 - 1) / 2 - r_q + 1)  # LSIF
    for a in POWER_ALPHAS:
        want = r_p ** (1 + a) - (1 + 1 / a) * r_q**a + 1 / a
        close(dv.get_divergence(f"power:{a:g}").dre_loss(s_p, s_q), want)
    # and the custom-h path agrees with the registered member of the same h.
    close(dv.from_h(_rlogr).dre_loss(s_p, s_q), dv.get_divergence("reverse_kl").dre_loss(s_p, s_q))


def test_logistic_dre_stable_for_large_logits():
    s = torch.tensor([-200.0, -50.0, 50.0, 200.0])
    out = dv.get_divergence("logistic").dre_loss(s, s)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, s.abs())  # softplus(s) + softplus(-s) = |s| + 2 log(1 + e^-|s|)


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.floats(-50, 50, allow_nan=False), min_size=1, max_size=16))
def test_omega_finite_positive_property(log_rs):
    s = torch.tensor(log_rs, dtype=F64)
    for name in ALL:
        w = member(name).omega(s)
        assert torch.isfinite(w).all() and (w > 0).all(), name


@settings(max_examples=60, deadline=None, database=None)
@given(st.floats(-20, 20, allow_nan=False))
def test_bregman_nonnegative_property(log_r):
    r = torch.tensor([math.exp(log_r)], dtype=F64)
    for name in ALL:
        assert member(name).bregman(r).item() >= -1e-12 * max(1.0, r.item() ** 3), name
