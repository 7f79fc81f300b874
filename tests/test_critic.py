"""The critic learns log r = log q_sigma / p_sigma (METHOD.md section 5).

Two known 1-D Gaussians, ``p = N(0, 1)`` (teacher) and ``q = N(1, 0.7^2)`` (student); a small
noise-conditioned MLP critic is trained with ``losses.critic_loss`` for several Bregman DRE losses,
and its ``log r = -logit`` is compared with the exact ``log q_sigma(x) - log p_sigma(x)`` on the bulk
of both densities (x in [-0.75, 2]; log r spans [-2.3, 1.3] there).
"""

from __future__ import annotations

import math

import pytest
import torch
from gaussians import log_ratio

from dibregman.divergences import from_h, get_divergence
from dibregman.losses import critic_loss
from dibregman.nets.mlp import MLP
from dibregman.ratio import Critic, log_r_from_logit, logit_from_log_r
from dibregman.schedules import LogUniform

pytestmark = pytest.mark.usefixtures("one_thread")

P, Q = (0.0, 1.0), (1.0, 0.49)  # (mean, variance)
X_EVAL = torch.linspace(-0.75, 2.0, 111)


def _train(dre, steps: int, sigma_sampler, seed: int = 0, batch: int = 256) -> Critic:
    torch.manual_seed(seed)
    critic = Critic(MLP(1, hidden=64, depth=2, out_dim=1))
    opt = torch.optim.Adam(critic.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x_p = P[0] + math.sqrt(P[1]) * torch.randn(batch, 1, generator=g)
        x_q = Q[0] + math.sqrt(Q[1]) * torch.randn(batch, 1, generator=g)
        n_p, n_q = torch.randn(batch, 1, generator=g), torch.randn(batch, 1, generator=g)
        loss = critic_loss(critic, x_p, x_q, sigma_sampler(batch, g), n_p, n_q, dre).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return critic


def _errors(critic: Critic, sigma: float) -> tuple[float, float]:
    with torch.no_grad():
        est = log_r_from_logit(critic(X_EVAL.unsqueeze(1), torch.full((len(X_EVAL),), sigma)))
    err = (est.double() - log_ratio(X_EVAL.double(), sigma, Q, P)).abs()
    return err.mean().item(), err.max().item()


def _rlogr(r):  # reverse_kl's h as a user's callable: h' by autograd inside the DRE loss
    return r * r.log()


# Measured at 400 steps over seeds 0-2: mean abs error 0.014-0.026, max abs error 0.035-0.104,
# against 0.95 mean |log r| (what a constant critic gets wrong).
DRES = {
    "logistic": lambda: get_divergence("logistic"),
    "pearson": lambda: get_divergence("pearson"),  # LSIF
    "reverse_kl": lambda: get_divergence("reverse_kl"),  # KLIEP / UKL
    "power:0.5": lambda: get_divergence("power:0.5"),
    "custom_rlogr": lambda: from_h(_rlogr),
}


@pytest.mark.parametrize("dre", sorted(DRES))
def test_critic_learns_log_ratio_fixed_sigma(dre):
    sigma = 0.2
    critic = _train(DRES[dre](), 400, lambda b, g: torch.full((b,), sigma))
    mae, worst = _errors(critic, sigma)
    assert mae < 0.08 and worst < 0.3, (mae, worst)


def test_critic_is_noise_conditioned():
    """Trained on sigma ~ LogUniform(0.1, 1), the logistic critic is right at every sigma.
    Measured (600 steps, seeds 0-1): mean abs error <= 0.036, max <= 0.10."""
    critic = _train(get_divergence("logistic"), 600, LogUniform(0.1, 1.0))
    for sigma in (0.1, 0.3, 1.0):
        mae, worst = _errors(critic, sigma)
        assert mae < 0.1 and worst < 0.3, (sigma, mae, worst)
    # the truths at the two ends differ far more than that, so ignoring sigma would fail.
    gap = (log_ratio(X_EVAL.double(), 0.1, Q, P) - log_ratio(X_EVAL.double(), 1.0, Q, P)).abs().mean()
    assert gap > 0.3


def test_logit_and_log_r_are_inverse_and_sign_convention():
    t = torch.randn(100, dtype=torch.float64) * 10
    assert torch.equal(log_r_from_logit(logit_from_log_r(t)), t)
    assert torch.equal(logit_from_log_r(log_r_from_logit(t)), t)
    # logit says "from p": log r = log q/p = -logit.
    assert torch.equal(log_r_from_logit(t), -t)


def test_critic_output_shape_and_input_scaling():
    torch.manual_seed(0)
    critic = Critic(MLP(16, hidden=16, depth=1, out_dim=1), sigma_data=0.5)
    x = torch.randn(5, 1, 4, 4)
    out = critic(x, torch.full((5,), 0.7))
    assert out.shape == (5,)
    assert torch.equal(critic(x, 0.7), out)  # a scalar sigma broadcasts
    # the backbone sees c_in x with c_in = 1 / sqrt(sigma^2 + sigma_data^2)
    c_in = 1 / math.sqrt(0.7**2 + 0.25)
    torch.testing.assert_close(critic.backbone(c_in * x, torch.full((5,), math.log(0.7) / 4)).reshape(5), out)


@pytest.mark.parametrize("kind", ["standalone", "head on a fake score", "class-conditional", "image head"])
def test_one_call_on_both_halves_is_two_calls(kind):
    """``critic_loss`` scores the teacher's and the student's halves in one call: the same loss and gradients
    as two calls, for every critic kind (per-sample layers only: no batch statistics)."""
    from dibregman.nets.unet import UNet
    from dibregman.precond import Precond
    from dibregman.ratio import FeatureCritic, feature_head

    torch.manual_seed(0)
    cond = None
    if kind == "standalone":
        critic, shape = Critic(MLP(2, 16, 1, out_dim=1), 1.0), (2,)
    elif kind == "head on a fake score":
        critic, shape = FeatureCritic(Precond(MLP(2, 16, 1), 1.0), feature_head(16, False)), (2,)
    elif kind == "class-conditional":
        critic, shape = Critic(MLP(2, 16, 1, out_dim=1, num_classes=3), 1.0), (2,)
        cond = torch.randint(3, (8,))
    else:
        unet = UNet(channels=1, resolution=8, base=8, mult=(1, 2), norm_groups=4, num_classes=0)
        critic, shape = FeatureCritic(Precond(unet, 0.5), feature_head(unet.feature_channels, True)), (1, 8, 8)
    xs = [torch.randn(8, *shape) for _ in range(4)]
    sigma = torch.rand(8) + 0.1
    dre = get_divergence("hellinger")
    one = critic_loss(critic, *xs[:2], sigma, *xs[2:], dre, cond)
    s = sigma.view(-1, *[1] * len(shape))
    two = dre.dre_loss(log_r_from_logit(critic(xs[0] + s * xs[2], sigma, cond)),
                       log_r_from_logit(critic(xs[1] + s * xs[3], sigma, cond)))
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)
    params = [p for p in critic.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(one.mean(), params), torch.autograd.grad(two.mean(), params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_generator_update_reads_a_fake_score_heads_features_from_one_pass():
    """A critic head on the fake score takes its features from the fake score's own forward in the generator
    update: the same numbers as two passes, for the MLP and the U-Net backbones."""
    from dibregman.losses import GeneratorLoss
    from dibregman.nets.unet import UNet
    from dibregman.precond import Precond
    from dibregman.ratio import FeatureCritic, feature_head

    torch.manual_seed(0)
    mlp = Precond(MLP(2, 16, 1), 1.0)
    unet = Precond(UNet(channels=1, resolution=8, base=8, mult=(1, 2)), 0.5)
    for fake, teacher, x in ((mlp, Precond(MLP(2, 16, 1), 1.0), torch.randn(6, 2)),
                             (unet, unet, torch.randn(6, 1, 8, 8))):
        sigma = torch.rand(6) + 0.1
        out, feats = fake.forward_with_features(x, sigma)
        assert torch.equal(out, fake(x, sigma)) and torch.equal(feats, fake.features(x, sigma))
        spatial = feats.ndim == 4
        critic = FeatureCritic(fake, feature_head(feats.shape[1], spatial))
        loss = GeneratorLoss(get_divergence("hellinger"))
        n = torch.randn_like(x)
        calls, features = [], fake.features
        fake.features = lambda *a, calls=calls, features=features, **k: calls.append(1) or features(*a, **k)
        shared = loss(x, sigma, n, teacher, fake, critic)
        assert not calls  # no second pass for the critic
        del fake.features
        critic.reads = lambda net: False  # the two-pass path
        apart = loss(x, sigma, n, teacher, fake, critic)
        assert torch.equal(shared.loss, apart.loss) and torch.equal(shared.log_r, apart.log_r)
