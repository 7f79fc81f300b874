"""The generator gradient (METHOD.md section 3) against the exact gradient of the divergence.

Teacher ``p = N(mu_p, s_p^2)``, student ``G(z) = a + b z`` so ``q = N(a, b^2)``. At a fixed sigma all
of ``D_T``, ``D_F`` and ``log r`` are exact, the expectation over ``(z, n)`` is a Gauss-Hermite
quadrature, and autograd through ``GeneratorLoss`` must give ``d/d(a, b) D_h(q_sigma || p_sigma)``,
the latter by central finite differences of ``E_{p_sigma}[h(q_sigma/p_sigma)] - h(1)``.

The second half checks that ``reverse_kl`` with the default options is DMD's update, written out
here from DMD2's code, and the batch normaliser, the clip and the GAN term.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gaussians import denoiser, f_divergence, gh, log_normal, log_ratio
from torch import nn

from dibregman.divergences import from_h, get_divergence
from dibregman.losses import GeneratorLoss, OmegaBinNormalizer
from dibregman.nets.mlp import MLP
from dibregman.precond import Precond

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64

# h in numpy, from the spec's table (independent of the library).
H = {
    "reverse_kl": lambda r: r * np.log(r),
    "forward_kl": lambda r: -np.log(r),
    "pearson": lambda r: (r - 1) ** 2 / 2,
    "logistic": lambda r: r * np.log(r) - (1 + r) * np.log1p(r),
    "hellinger": lambda r: (np.sqrt(r) - 1) ** 2,
    "jeffreys": lambda r: (r - 1) * np.log(r),
    "softened_rkl": lambda r: (1 + r) * np.log((1 + r) / 2),
    "power:0.5": lambda r: (r**1.5 - r) / 0.5,
    "power:-0.5": lambda r: (r**0.5 - r) / -0.5,
    "power:2": lambda r: (r**3 - r) / 2,
    "custom_cubic": lambda r: r**3 - 1,
}


def member(name: str):
    return from_h(lambda r: r**3 - 1, name=name) if name == "custom_cubic" else get_divergence(name)


# b < s_p keeps q/p's tails integrable for every member (E_p[r^3] is finite iff 3/b^2 > 2/s_p^2 here).
MU_P, S_P, A, B = 0.0, 1.0, 0.3, 0.8
SIGMAS = (0.05, 0.5, 2.0)
# Measured: max relative error 6.8e-8 (forward_kl, sigma 0.05), set by the finite difference (eps^2).
RTOL = 1e-6
K = 64  # Gauss-Hermite nodes per axis of (z, n)


def divergence_grad(name: str, sigma: float, eps: float = 1e-4) -> np.ndarray:
    """Central differences in (a, b) of D_h(q_sigma || p_sigma), by quadrature under p_sigma."""

    def d(a, b):
        return f_divergence(H[name], (a, b * b + sigma**2), (MU_P, S_P**2 + sigma**2))

    return _central_difference(d, eps)


def _central_difference(d, eps: float) -> np.ndarray:
    return np.array([d(A + eps, B) - d(A - eps, B), d(A, B + eps) - d(A, B - eps)]) / (2 * eps)


def surrogate_grad(name: str, sigma: float, mode: str = "score") -> np.ndarray:
    u, w = gh(K)
    z, n = torch.from_numpy(np.repeat(u, K)), torch.from_numpy(np.tile(u, K))
    weights = torch.from_numpy(np.outer(w, w).ravel())
    a = torch.tensor(A, dtype=F64, requires_grad=True)
    b = torch.tensor(B, dtype=F64, requires_grad=True)
    x = (a + b * z).unsqueeze(1)  # G_theta(z), [B, 1]
    sig = torch.full_like(z, sigma)
    q, p = (A, B * B), (MU_P, S_P**2)  # the student's (a, b) held fixed inside s_q and the critic

    def critic(x_sigma, s, cond=None):  # logit = log p_sigma - log q_sigma, differentiable in x
        return -log_ratio(x_sigma.squeeze(1), sigma, q, p)

    loss_fn = GeneratorLoss(member(name), weighting="sigma2", log_r_clip=None, normalize="none", mode=mode)
    out = loss_fn(x, sig, n.unsqueeze(1), denoiser(*p), denoiser(*q), critic)
    (weights * out.loss).sum().backward()
    return np.array([a.grad.item(), b.grad.item()])


def _assert_rel(got: np.ndarray, want: np.ndarray, rtol: float = RTOL) -> None:
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < rtol, f"relative error {err:.2e}: got {got}, want {want}"


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("name", sorted(H))
def test_score_form_is_exact_gradient(name, sigma):
    _assert_rel(surrogate_grad(name, sigma), divergence_grad(name, sigma))


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl", "pearson", "logistic", "hellinger", "power:2"])
def test_discriminator_form_is_same_gradient(name, sigma):
    # Measured: agrees with the score form to 5e-14 relative.
    want = surrogate_grad(name, sigma)
    _assert_rel(surrogate_grad(name, sigma, mode="discriminator"), want, rtol=1e-10)


def test_reference_quadrature_matches_closed_form_kl():
    """The reference itself: quadrature of E_p[h(q/p)] equals KL in closed form (both directions)."""
    q, p = (A, B * B + 0.25), (MU_P, S_P**2 + 0.25)
    kl_qp = 0.5 * (q[1] / p[1] + (q[0] - p[0]) ** 2 / p[1] - 1 + math.log(p[1] / q[1]))
    kl_pq = 0.5 * (p[1] / q[1] + (q[0] - p[0]) ** 2 / q[1] - 1 + math.log(q[1] / p[1]))
    assert abs(f_divergence(H["reverse_kl"], q, p) - kl_qp) < 1e-12
    assert abs(f_divergence(H["forward_kl"], q, p) - kl_pq) < 1e-12
    # The reverse-KL gradient in a also has a closed form: (a - mu_p) / (s_p^2 + sigma^2).
    assert abs(divergence_grad("reverse_kl", 0.5)[0] - (A - MU_P) / (S_P**2 + 0.25)) < 1e-8


# --- two dimensions: the mean-over-dims convention, in both modes -------------------------------------

# p = N(0, I_2); q = N((a, C), diag(b^2, E^2)); theta = (a, b) moves coordinate 1 only, but the ratio
# depends on both coordinates, so the f-divergence does not split (except for KL).
C2, E2 = -0.2, 0.9


def _log_r_2d(x1, x2, sigma, a, b):
    s2 = sigma**2
    return (log_normal(x1, a, b * b + s2) + log_normal(x2, C2, E2 * E2 + s2)
            - log_normal(x1, 0.0, 1 + s2) - log_normal(x2, 0.0, 1 + s2))


def _divergence_grad_2d(name, sigma, eps=1e-4, k=60):
    u, w = gh(k)
    x1, x2 = np.repeat(u, k) * math.sqrt(1 + sigma**2), np.tile(u, k) * math.sqrt(1 + sigma**2)
    ww = np.outer(w, w).ravel()

    def d(a, b):
        return float(np.sum(ww * H[name](np.exp(_log_r_2d(x1, x2, sigma, a, b)))) - H[name](np.ones(1))[0])

    return _central_difference(d, eps)


def _surrogate_grad_2d(name, sigma, mode, k=14):
    u, w = gh(k)
    z1, z2, n1, n2 = (torch.from_numpy(g.ravel()) for g in np.meshgrid(u, u, u, u, indexing="ij"))
    weights = torch.from_numpy(np.einsum("i,j,k,l->ijkl", w, w, w, w).ravel())
    a = torch.tensor(A, dtype=F64, requires_grad=True)
    b = torch.tensor(B, dtype=F64, requires_grad=True)
    x = torch.stack([a + b * z1, C2 + E2 * z2], 1)
    n = torch.stack([n1, n2], 1)
    sig = torch.full_like(z1, sigma)
    d_q1, d_q2 = denoiser(A, B * B), denoiser(C2, E2 * E2)

    def fake(xs, s, cond=None):
        return torch.cat([d_q1(xs[:, :1], s), d_q2(xs[:, 1:], s)], 1)

    def critic(xs, s, cond=None):
        return -_log_r_2d(xs[:, 0], xs[:, 1], sigma, A, B)

    loss_fn = GeneratorLoss(member(name), weighting="sigma2", log_r_clip=None, normalize="none", mode=mode)
    out = loss_fn(x, sig, n, denoiser(0.0, 1.0), fake, critic)
    (weights * out.loss).sum().backward()
    return np.array([a.grad.item(), b.grad.item()])


@pytest.mark.parametrize("name", ["reverse_kl", "pearson", "jeffreys"])
def test_two_dims_mean_over_dims_in_both_modes(name):
    """In d dims the surrogate's gradient is grad D_h / d (DMD's MSE convention), in both modes.
    Measured: 4.1e-8 relative (14 nodes per axis of the 4-D quadrature)."""
    want = _divergence_grad_2d(name, 0.3) / 2
    _assert_rel(_surrogate_grad_2d(name, 0.3, "score"), want)
    _assert_rel(_surrogate_grad_2d(name, 0.3, "discriminator"), want)


# --- reverse_kl is DMD -----------------------------------------------------------------------------


class ConvNet(nn.Module):
    """A tiny image backbone ``F(x, c_noise) -> x.shape``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, c_noise, cond=None):
        t = c_noise.reshape(-1, 1, 1, 1).expand_as(x)
        return self.c2(F.silu(self.c1(torch.cat([x, t], 1))))


def _dmd2_reference(x, x_sigma, sigma, teacher, fake):
    """DMD2's distribution-matching loss, as in its code (Yin et al. 2024), written out independently."""
    with torch.no_grad():
        pred_real = teacher(x_sigma, sigma)
        pred_fake = fake(x_sigma, sigma)
        p_real = x_sigma - pred_real
        p_fake = x_sigma - pred_fake
        dims = list(range(1, x.ndim))
        weighting_factor = torch.abs(x - pred_real).mean(dim=dims, keepdim=True)
        grad = (p_real - p_fake) / weighting_factor
    return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")


@pytest.mark.parametrize("kind", ["vector", "image_mlp", "image_conv"])
def test_reverse_kl_is_dmd(kind):
    torch.manual_seed(0)
    if kind == "vector":
        shape, make = (4,), lambda: Precond(MLP(4, hidden=32, depth=2))
    elif kind == "image_mlp":
        shape, make = (1, 4, 4), lambda: Precond(MLP(16, hidden=32, depth=2))
    else:
        shape, make = (1, 4, 4), lambda: Precond(ConvNet())
    # float64, so that x - (x - grad) does not round away small updates (both sides do that step).
    teacher, fake = make().double(), make().double()
    x0 = torch.randn(32, *shape, dtype=F64)
    sigma = (torch.randn(32, dtype=F64) * 1.2 - 1.2).exp()
    n = torch.randn(32, *shape, dtype=F64)

    x = x0.clone().requires_grad_(True)
    out = GeneratorLoss(get_divergence("reverse_kl"))(x, sigma, n, teacher, fake, critic=None)
    (g_lib,) = torch.autograd.grad(out.loss.mean(), x)

    x_ref = x0.clone().requires_grad_(True)
    x_sigma = x_ref.detach() + sigma.reshape(-1, *[1] * len(shape)) * n
    ref = _dmd2_reference(x_ref, x_sigma, sigma, teacher, fake)
    (g_ref,) = torch.autograd.grad(ref, x_ref)

    assert out.log_r is None and torch.equal(out.omega, torch.ones(32, dtype=F64))
    torch.testing.assert_close(out.loss.mean(), ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_lib, g_ref, rtol=1e-9, atol=1e-12 * g_ref.abs().max().item())
    assert g_ref.abs().max() > 1e-4  # a real, nonzero update


def _critic(logits):
    """A fixed logit per sample plus a differentiable x-dependent part (slope 0.1 per coordinate)."""
    return lambda xs, s, cond=None: logits + 0.1 * xs.sum(1)


def _setup(seed=1, batch=64, dim=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=F64)
    n = torch.randn(batch, dim, generator=g, dtype=F64)
    sigma = (torch.randn(batch, generator=g, dtype=F64) - 1).exp()
    logits = 2.5 * torch.randn(batch, generator=g, dtype=F64)  # some beyond the clip on both sides
    return x, n, sigma, denoiser(0.0, 1.0), denoiser(0.4, 0.5), logits


def test_batch_normalised_omega_has_mean_one():
    x, n, sigma, teacher, fake, logits = _setup()
    critic = _critic(logits)
    grads = {}
    for norm in ("none", "batch"):
        xr = x.clone().requires_grad_(True)
        out = GeneratorLoss(get_divergence("pearson"), weighting="none", normalize=norm)(
            xr, sigma, n, teacher, fake, critic)
        (grads[norm],) = torch.autograd.grad(out.loss.sum(), xr)
    omega = out.omega  # reported before normalisation
    assert omega.std() > 0.1  # pearson's omega = r is not constant here
    x_sigma = x + sigma[:, None] * n
    expected_none = omega[:, None] * (fake(x_sigma, sigma) - teacher(x_sigma, sigma)) / x.shape[1]
    torch.testing.assert_close(grads["none"], expected_none, rtol=1e-12, atol=1e-14)
    implied = omega * (grads["batch"] / grads["none"]).mean(1)  # the normalised omega actually applied
    torch.testing.assert_close(implied.mean(), torch.tensor(1.0, dtype=F64), rtol=1e-10, atol=0)
    torch.testing.assert_close(implied, omega / omega.mean(), rtol=1e-10, atol=0)


def test_batch_normaliser_all_reduces():
    """Two 'ranks' joined by an all-reduce normalise each half exactly as the full batch."""
    x, n, sigma, teacher, fake, logits = _setup()
    div = get_divergence("forward_kl")
    full = GeneratorLoss(div)(x, sigma, n, teacher, fake, _critic(logits))
    halves = [slice(0, 32), slice(32, 64)]
    stats = [torch.stack([full.omega[h].sum(), torch.tensor(32.0, dtype=F64)]) for h in halves]
    for i, h in enumerate(halves):
        part = GeneratorLoss(div)(x[h], sigma[h], n[h], teacher, fake, _critic(logits[h]),
                                  reduce_sum=lambda t, o=stats[1 - i]: t + o)
        torch.testing.assert_close(part.loss, full.loss[h], rtol=1e-12, atol=0)
    alone = GeneratorLoss(div)(x[:32], sigma[:32], n[:32], teacher, fake, _critic(logits[:32]))
    assert not torch.allclose(alone.loss, full.loss[:32])  # without the all-reduce it differs


def test_log_r_clip_default():
    x, n, sigma, teacher, fake, logits = _setup()
    critic = _critic(logits)
    loss_fn = GeneratorLoss(get_divergence("jeffreys"))
    assert loss_fn.log_r_clip == pytest.approx((math.log(0.1), math.log(20.0)))
    out = loss_fn(x, sigma, n, teacher, fake, critic)
    raw = -critic(x + sigma[:, None] * n, sigma)
    assert (raw < math.log(0.1)).any() and (raw > math.log(20.0)).any()
    torch.testing.assert_close(out.log_r, raw.clamp(math.log(0.1), math.log(20.0)), rtol=0, atol=0)
    torch.testing.assert_close(out.omega, 1 + (-out.log_r).exp(), rtol=1e-12, atol=0)  # jeffreys: 1 + 1/r
    unclipped = GeneratorLoss(get_divergence("jeffreys"), log_r_clip=None)(x, sigma, n, teacher, fake, critic)
    torch.testing.assert_close(unclipped.log_r, raw, rtol=0, atol=0)


def test_gan_term_adds_softplus():
    x, n, sigma, teacher, fake, logits = _setup()
    critic = _critic(logits)
    lam = 0.3
    xs = {k: x.clone().requires_grad_(True) for k in ("plain", "gan")}
    div = get_divergence("hellinger")
    base = GeneratorLoss(div)(xs["plain"], sigma, n, teacher, fake, critic)
    gan = GeneratorLoss(div, gan_weight=lam)(xs["gan"], sigma, n, teacher, fake, critic)
    x_sigma = x + sigma[:, None] * n
    torch.testing.assert_close(gan.loss - base.loss, lam * F.softplus(-critic(x_sigma, sigma)),
                               rtol=1e-12, atol=1e-14)
    (g_plain,) = torch.autograd.grad(base.loss.sum(), xs["plain"])
    (g_gan,) = torch.autograd.grad(gan.loss.sum(), xs["gan"])
    # d/dx lam softplus(-l(x_sigma)) = -lam sigmoid(-l) * dl/dx, and dl/dx = 0.1 per coordinate here.
    extra = -lam * torch.sigmoid(-critic(x_sigma, sigma))[:, None] * 0.1 * torch.ones_like(x)
    torch.testing.assert_close(g_gan - g_plain, extra, rtol=1e-10, atol=1e-14)
    # reverse_kl with a GAN term needs a critic.
    with pytest.raises(ValueError, match="critic"):
        GeneratorLoss(get_divergence("reverse_kl"), gan_weight=lam)(x, sigma, n, teacher, fake, None)


def test_bin_normaliser_running_mean_per_noise_bin():
    """normalize="bins": omega is divided by a running mean of omega in its log-spaced sigma bin."""
    bins = OmegaBinNormalizer(sigma_min=0.01, sigma_max=100.0, num_bins=4, momentum=0.9)
    sigma = torch.tensor([0.02, 0.05, 0.5, 0.9, 20.0, 50.0, 80.0], dtype=F64)
    assert bins.bins(sigma).tolist() == [0, 0, 1, 1, 3, 3, 3]  # edges at 0.1, 1, 10
    omega = torch.tensor([1.0, 3.0, 2.0, 2.0, 1.0, 2.0, 6.0], dtype=F64)
    out = bins(omega, sigma, lambda t: t)
    torch.testing.assert_close(out, omega / torch.tensor([2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0], dtype=F64))
    assert bins.seen.tolist() == [True, True, False, True]
    out2 = bins(torch.tensor([4.0, 4.0], dtype=F64), torch.tensor([0.03, 0.03], dtype=F64), lambda t: t)
    torch.testing.assert_close(out2, torch.full((2,), 4.0 / (0.9 * 2.0 + 0.1 * 4.0), dtype=F64))
    # and through GeneratorLoss
    x, n, sigma, teacher, fake, logits = _setup()
    loss_fn = GeneratorLoss(get_divergence("pearson"), weighting="none", normalize="bins")
    with pytest.raises(ValueError, match="OmegaBinNormalizer"):
        loss_fn(x, sigma, n, teacher, fake, _critic(logits))
    nb = OmegaBinNormalizer(0.002, 80.0)
    xr = x.clone().requires_grad_(True)
    out = loss_fn(xr, sigma, n, teacher, fake, _critic(logits), bins=nb)
    (g,) = torch.autograd.grad(out.loss.sum(), xr)
    x_sigma = x + sigma[:, None] * n
    running = torch.stack([out.omega[nb.bins(sigma) == k].mean() for k in nb.bins(sigma).tolist()])
    want = (out.omega / running)[:, None] * (fake(x_sigma, sigma) - teacher(x_sigma, sigma)) / x.shape[1]
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-14)
