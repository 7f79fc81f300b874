"""Noise conventions, sigma samplers, EDM preconditioning and the samplers, against their definitions.

For a Gaussian ``N(mu, s^2)`` the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` is
linear: ``x(sigma) - mu = (x_T - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2)``, so both the exact
map and every discrete step are known in closed form.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from gaussians import denoiser
from scipy import stats

from dibregman import sampling, schedules
from dibregman.generator import OneStepGenerator
from dibregman.nets.mlp import MLP
from dibregman.precond import Precond

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64

# --- conversions ----------------------------------------------------------------------------------


def test_vp_round_trip_and_definition():
    ab = torch.linspace(1e-4, 1 - 1e-6, 201, dtype=F64)
    sigma = schedules.vp_sigma_from_alpha_bar(ab)
    torch.testing.assert_close(schedules.vp_alpha_bar_from_sigma(sigma), ab, rtol=1e-12, atol=0)
    s = torch.logspace(-3, 2.5, 101, dtype=F64)
    torch.testing.assert_close(schedules.vp_sigma_from_alpha_bar(schedules.vp_alpha_bar_from_sigma(s)), s,
                               rtol=1e-9, atol=0)
    # DDPM's x_t = sqrt(ab) x0 + sqrt(1 - ab) n is the model input for x_sigma = x0 + sigma n.
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(201, 3, generator=g, dtype=F64), torch.randn(201, 3, generator=g, dtype=F64)
    x_t = ab.sqrt()[:, None] * x0 + (1 - ab).sqrt()[:, None] * n
    x_sigma = x0 + sigma[:, None] * n
    x_t_lib = schedules.vp_input_from_x_sigma(x_sigma, sigma[:, None])
    torch.testing.assert_close(x_t_lib, x_t, rtol=1e-9, atol=1e-12)
    # eps- and v-prediction with the true eps / v recover x0 (METHOD.md section 7).
    torch.testing.assert_close(x_sigma - sigma[:, None] * n, x0, rtol=1e-9, atol=1e-9)
    a, b = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
    v = a * n - b * x0
    torch.testing.assert_close(a * x_t - b * v, x0, rtol=1e-9, atol=1e-9)


def test_flow_round_trip_and_definition():
    t = torch.linspace(1e-4, 0.999, 201, dtype=F64)
    sigma = schedules.flow_sigma_from_t(t)
    torch.testing.assert_close(schedules.flow_t_from_sigma(sigma), t, rtol=1e-12, atol=0)
    s = torch.logspace(-3, 2.5, 101, dtype=F64)
    back = schedules.flow_sigma_from_t(schedules.flow_t_from_sigma(s))
    torch.testing.assert_close(back, s, rtol=1e-9, atol=0)
    g = torch.Generator().manual_seed(1)
    x0, n = torch.randn(201, 2, generator=g, dtype=F64), torch.randn(201, 2, generator=g, dtype=F64)
    x_t = (1 - t)[:, None] * x0 + t[:, None] * n
    x_sigma = x0 + sigma[:, None] * n
    torch.testing.assert_close(schedules.flow_input_from_x_sigma(x_sigma, sigma[:, None]), x_t, rtol=1e-9,
                               atol=1e-12)
    v = n - x0  # velocity: x0 = x_t - t v
    torch.testing.assert_close(x_t - t[:, None] * v, x0, rtol=1e-9, atol=1e-12)


def test_karras_sigmas():
    s = schedules.karras_sigmas(18, 0.002, 80.0, rho=7.0)
    assert s.shape == (19,) and s.dtype == F64
    assert s[0].item() == pytest.approx(80.0, rel=1e-12) and s[17].item() == pytest.approx(0.002, rel=1e-12)
    assert s[18].item() == 0.0
    assert (s[1:] < s[:-1]).all()
    spacing = s[:-1] ** (1 / 7)  # equally spaced in sigma^(1/rho)
    step = spacing.diff()
    torch.testing.assert_close(step, torch.full((17,), step[0].item(), dtype=F64), rtol=1e-9, atol=0)
    assert schedules.karras_sigmas(2, 0.1, 10.0).tolist() == pytest.approx([10.0, 0.1, 0.0])


# --- sigma samplers ---------------------------------------------------------------------------------

N_DRAWS = 50_000


def test_lognormal_law():
    g = torch.Generator().manual_seed(0)
    log_s = schedules.LogNormal(p_mean=-1.2, p_std=1.2)(N_DRAWS, g).double().log()
    # standard errors 0.0054 (mean) and 0.0038 (std)
    assert abs(log_s.mean().item() + 1.2) < 0.03 and abs(log_s.std().item() - 1.2) < 0.02
    assert stats.kstest(((log_s + 1.2) / 1.2).numpy(), "norm").pvalue > 1e-3


def test_karras_uniform_law():
    k = schedules.KarrasUniform(sigma_min=0.002, sigma_max=80.0, t_min=0.1, t_max=0.9, rho=7.0)
    s = k(N_DRAWS, torch.Generator().manual_seed(1)).double()
    hi, lo = 80.0 ** (1 / 7), 0.002 ** (1 / 7)
    s_at = lambda t: (hi + t * (lo - hi)) ** 7  # noqa: E731
    assert s.min() >= s_at(0.9) * (1 - 1e-6) and s.max() <= s_at(0.1) * (1 + 1e-6)
    t = (s ** (1 / 7) - hi) / (lo - hi)  # back on the t axis: uniform on [t_min, t_max]
    assert stats.kstest(t.numpy(), "uniform", args=(0.1, 0.8)).pvalue > 1e-3


def test_loguniform_law():
    s = schedules.LogUniform(0.01, 10.0)(N_DRAWS, torch.Generator().manual_seed(2)).double()
    assert s.min() >= 0.01 * (1 - 1e-6) and s.max() <= 10.0 * (1 + 1e-6)
    assert stats.kstest(s.log().numpy(), "uniform", args=(math.log(0.01), math.log(1000.0))).pvalue > 1e-3


def test_samplers_are_seeded_and_registry():
    from dibregman.train.config import DistillConfig
    from dibregman.train.sigmas import SIGMA_SAMPLERS, sigma_sampler

    cfg = DistillConfig(fake_score_p_mean=0.5)
    for name in ("lognormal", "karras", "loguniform"):
        sm = SIGMA_SAMPLERS.get(name).make(cfg, 0.01, 10.0)
        a, b = sm(64, torch.Generator().manual_seed(5)), sm(64, torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and (a > 0).all()
    assert sigma_sampler(cfg, "fake_score_sigmas", 0.01, 10.0) == schedules.LogNormal(p_mean=0.5)
    assert sigma_sampler(cfg, "generator_sigmas", 0.01, 10.0) == schedules.KarrasUniform(0.01, 10.0)
    with pytest.raises(ValueError) as e:
        SIGMA_SAMPLERS.get("uniform")
    for name in ("lognormal", "karras", "loguniform"):
        assert name in str(e.value)


# --- EDM preconditioning ----------------------------------------------------------------------------


class Zero(torch.nn.Module):
    def forward(self, x, c_noise, cond=None):
        return torch.zeros_like(x)


class Recorder(torch.nn.Module):
    """Returns a fixed function of its inputs and remembers them."""

    def forward(self, x, c_noise, cond=None):
        self.seen = (x.clone(), c_noise.clone())
        return torch.sin(x) + c_noise.reshape(-1, *[1] * (x.ndim - 1))


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_precond_identities(sigma_data):
    sigma = torch.logspace(-3, 2, 51, dtype=F64)
    pre = Precond(Zero(), sigma_data=sigma_data)
    c_skip, c_out, c_in, c_noise = pre.coefficients(sigma)
    sd2 = sigma_data**2
    one = torch.ones_like(sigma)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)  # noqa: E731
    close(c_in**2 * (sigma**2 + sd2), one)  # unit-variance network input
    # unit-variance training target (x0 - c_skip x_sigma) / c_out for x0 ~ (0, sd^2)
    close(((1 - c_skip) ** 2 * sd2 + c_skip**2 * sigma**2) / c_out**2, one)
    close((1 - c_skip) * sd2, c_skip * sigma**2)  # c_skip minimises that variance
    close(pre.loss_weight(sigma), 1 / c_out**2)
    close(c_noise, sigma.log() / 4)
    # with F = 0, D = c_skip x is the exact denoiser of N(0, sd^2)
    x = torch.linspace(-3, 3, 51, dtype=F64).unsqueeze(1)
    close(pre(x, sigma), denoiser(0.0, sd2)(x, sigma))


def test_precond_forward_wiring():
    rec = Recorder()
    pre = Precond(rec, sigma_data=0.5)
    x = torch.randn(4, 1, 3, 3, dtype=F64)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=F64)
    out = pre(x, sigma)
    c_skip, c_out, c_in, c_noise = (c.reshape(4, 1, 1, 1) for c in pre.coefficients(sigma))
    torch.testing.assert_close(rec.seen[0], c_in * x)
    torch.testing.assert_close(rec.seen[1], c_noise.reshape(4))
    torch.testing.assert_close(out, c_skip * x + c_out * (torch.sin(c_in * x) + c_noise))
    torch.testing.assert_close(pre(x, 0.3)[1], pre(x, torch.full((4,), 0.3, dtype=F64))[1])  # scalar sigma


# --- samplers on an exact Gaussian denoiser ----------------------------------------------------------

MU, S = 0.3, 0.5
U = torch.linspace(-3, 3, 13, dtype=F64).unsqueeze(1)


def _exact_flow(u: torch.Tensor, sigma_max: float = 80.0) -> torch.Tensor:
    """The PF-ODE's exact map from x_T = sigma_max u to sigma = 0 for N(MU, S^2)."""
    return MU + S / math.sqrt(S**2 + sigma_max**2) * (sigma_max * u - MU)


def _heun_closed_form(u: torch.Tensor, sigmas: np.ndarray) -> torch.Tensor:
    """EDM algorithm 1 on the linear ODE dy/dsigma = f(sigma) y, y = x - MU, f = sigma/(S^2 + sigma^2),
    one step at a time in closed form (an independent implementation)."""
    f = lambda s: s / (S**2 + s**2)  # noqa: E731
    m = 1.0
    for s0, s1 in itertools.pairwise(sigmas):
        h = s1 - s0
        m *= 1 + h / 2 * (f(s0) + f(s1) * (1 + h * f(s0))) if s1 > 0 else 1 + h * f(s0)
    return MU + m * (sigmas[0] * u - MU)


class Counted:
    def __init__(self, d):
        self.d, self.calls = d, 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return self.d(x, sigma, cond)


def test_heun_is_edm_algorithm_one_with_35_nfe():
    d = Counted(denoiser(MU, S**2))
    out = sampling.sample(d, U, num_steps=18, method="heun")
    assert d.calls == sampling.nfe("heun", 18) == 35
    grid = 0.002 ** (1 / 7) + (1 - np.linspace(0, 1, 18)) * (80 ** (1 / 7) - 0.002 ** (1 / 7))
    sigmas = np.concatenate([grid**7, [0.0]])  # EDM's grid, written out again
    torch.testing.assert_close(out, _heun_closed_form(U, sigmas), rtol=1e-12, atol=1e-12)
    # the map is affine; with 18 steps its slope is 5.5% too large for this Gaussian (measured: EDM's
    # grid is coarse around sigma ~ s), its offset right to 1e-3: the mean is right, the std close.
    slope = ((out[-1] - out[0]) / (U[-1] - U[0])).item()
    assert slope / S == pytest.approx(1.0552, abs=2e-3)
    assert out[6].item() == pytest.approx(MU, abs=5e-3)


@pytest.mark.parametrize(("method", "order", "steps"),
                         [("heun", 2, (18, 36, 72)), ("euler", 1, (36, 72, 144))])
def test_samplers_converge_to_exact_flow_at_their_order(method, order, steps):
    exact = _exact_flow(U)
    errs = []
    for n in steps:
        d = Counted(denoiser(MU, S**2))
        errs.append((sampling.sample(d, U, num_steps=n, method=method) - exact).abs().max().item())
        assert d.calls == sampling.nfe(method, n)
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    # Measured: heun 2.18, 2.09; euler 0.99, 1.00.
    assert all(abs(r - order) < 0.25 for r in rates), (errs, rates)


def test_fine_heun_recovers_the_law():
    out = sampling.sample(denoiser(MU, S**2), U, num_steps=256, method="heun")
    torch.testing.assert_close(out, _exact_flow(U), rtol=0, atol=1e-3)  # measured 3.1e-4
    # and the exact flow is N(MU, S^2) up to the sigma_max truncation, which shifts the mean by
    # about MU * S / sigma_max = 1.9e-3 (measured 2.2e-3 in all)
    torch.testing.assert_close(out, MU + S * U, rtol=0, atol=5e-3)


def test_euler_and_unknown_method():
    d = Counted(denoiser(MU, S**2))
    sigmas = schedules.karras_sigmas(5, 0.002, 80.0).to(F64)
    out = sampling.euler(d, U, sigmas)
    assert d.calls == 5
    # Euler on the linear ODE: y *= 1 + h f(sigma) per step, exactly.
    m, s = 1.0, sigmas.numpy()
    for s0, s1 in itertools.pairwise(s):
        m *= 1 + (s1 - s0) * s0 / (S**2 + s0**2)
    torch.testing.assert_close(out, MU + m * (s[0] * U - MU), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="heun"):
        sampling.sample(d, U, method="dpm")


def test_noise_from_seeds_independent_of_batch():
    a = sampling.noise_from_seeds([3, 7, 11], (2, 4))
    b = sampling.noise_from_seeds([7], (2, 4))
    c = sampling.noise_from_seeds([11, 5, 3], (2, 4))
    assert a.shape == (3, 2, 4)
    assert torch.equal(a[1], b[0]) and torch.equal(a[0], c[2]) and torch.equal(a[2], c[0])
    assert not torch.equal(a[0], a[1])
    torch.manual_seed(0)
    net = Precond(MLP(8, hidden=16, depth=1))
    with torch.no_grad():
        x_big = sampling.sample(net, sampling.noise_from_seeds([1, 2, 3, 4], (8,)), num_steps=6)
        x_one = sampling.sample(net, sampling.noise_from_seeds([3], (8,)), num_steps=6)
    torch.testing.assert_close(x_big[2], x_one[0], rtol=1e-5, atol=1e-6)


def test_one_step_generator():
    torch.manual_seed(0)
    den = Precond(MLP(4, hidden=16, depth=1))
    gen = OneStepGenerator(den, sigma_g=2.5)
    z = torch.randn(6, 4)
    torch.testing.assert_close(gen(z), den(2.5 * z, torch.full((6,), 2.5)), rtol=0, atol=0)
    torch.testing.assert_close(sampling.one_step(gen, z), gen(z))
    # from_teacher copies: training the student leaves the teacher alone
    copy = OneStepGenerator.from_teacher(den, sigma_g=2.5)
    torch.testing.assert_close(copy(z), gen(z))
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.equal(copy(z), gen(z))
    # an analytic denoiser at large sigma_g starts at the data's mean, spread s^2/sqrt(s^2+sigma_g^2)
    g = OneStepGenerator(denoiser(MU, S**2), sigma_g=2.5)
    torch.testing.assert_close(g(U), MU + S**2 / (S**2 + 6.25) * (2.5 * U - MU), rtol=1e-12, atol=1e-12)


def test_a_flow_student_from_pure_noise_is_the_limit_of_its_finite_noise_levels():
    """``sigma_g = inf``: ``Precond.from_pure_noise`` is ``lim D(sigma z, sigma)`` of a flow model (``z - v(z, 1)``,
    a one-step SD3 or Flux call), approached as ``1 / sigma``; conventions without that limit refuse it."""
    flow = Precond(Recorder(), parameterisation=schedules.FlowParameterisation(1000))
    z = torch.randn(5, 1, 2, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    limit = flow.from_pure_noise(z)
    torch.testing.assert_close(limit, z - (torch.sin(z) + 1000.0))  # a z + c_out F(b z, T) with (1, -1, 1, 1000)
    gaps = [float((flow(s * z, torch.full((5,), s, dtype=F64)) - limit).abs().max()) for s in (1e2, 1e4, 1e6)]
    assert gaps[0] > 0 and gaps[1] < gaps[0] / 50 and gaps[2] < gaps[1] / 50 and gaps[2] < 1e-2
    gen = OneStepGenerator(flow, sigma_g=math.inf)
    torch.testing.assert_close(gen(z), limit, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one step for now"):
        OneStepGenerator(flow, sigmas=(math.inf, 1.0))
    edm = Precond(Zero())
    with pytest.raises(ValueError, match="no limit at infinite noise"):
        edm.from_pure_noise(z)
    with pytest.raises(ValueError, match="needs a flow-matching denoiser"):
        OneStepGenerator(edm, sigma_g=math.inf)
